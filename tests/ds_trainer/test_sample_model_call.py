"""`wanspeed sample`'s model call: the sampler feeds the model the batch's Conditioning, so the
subject reference moves the sampled latents (once the adapter's value side is non-zero)."""
import torch

from ds_trainer.flow_step import FlowInputs
from ds_trainer.sample import sample_video
from model.conditioning import Conditioning
from model.config import WAN_TINY, ReferencePathsConfig
from model.wan import WanModel


def test_sampling_is_conditioned_on_the_reference():
    torch.manual_seed(0)
    model = WanModel(WAN_TINY.replace(reference_paths=ReferencePathsConfig(vae=True))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    latents = torch.zeros(1, 16, 2, 4, 6)
    cond = Conditioning(torch.randn(1, 5, WAN_TINY.text_dim, generator=g),
                        ref_vae=torch.randn(1, 1, 16, 4, 6, generator=g), ref_vae_lens=torch.tensor([24]))
    out = sample_video(model, FlowInputs(latents, cond), steps=2, shift=5.0, generator=torch.Generator().manual_seed(2))
    assert out.shape == latents.shape and torch.isfinite(out).all()
    other = sample_video(model, FlowInputs(latents, cond.replace(ref_vae=cond.ref_vae * 3)), steps=2, shift=5.0,
                         generator=torch.Generator().manual_seed(2))
    assert (other - out).abs().max() > 1e-4


def test_reference_guidance_scales_the_reference_part_of_the_velocity():
    """g2 = 1 is plain sampling; g2 = 2 moves the sample; with the value paths at their zero init
    the references add exactly 0, so guidance changes nothing (what the demo's untrained model shows)."""
    torch.manual_seed(0)
    model = WanModel(WAN_TINY.replace(reference_paths=ReferencePathsConfig(vae=True))).eval()
    fresh = WanModel(WAN_TINY.replace(reference_paths=ReferencePathsConfig(vae=True))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
        fresh.head.head.weight.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    cond = Conditioning(torch.randn(1, 5, WAN_TINY.text_dim, generator=g),
                        ref_vae=torch.randn(1, 1, 16, 4, 6, generator=g), ref_vae_lens=torch.tensor([24]))
    inputs = FlowInputs(torch.zeros(1, 16, 2, 4, 6), cond)
    run = lambda m, g2: sample_video(m, inputs, 3, 5.0, torch.Generator().manual_seed(2), ref_guidance=g2)  # noqa: E731
    with torch.no_grad():
        plain, one, two = run(model, None), run(model, 1.0), run(model, 2.0)
        torch.testing.assert_close(one, plain, rtol=1e-5, atol=1e-6)
        assert (two - plain).abs().max() > 1e-3
        assert torch.equal(run(fresh, 2.0), run(fresh, None))
