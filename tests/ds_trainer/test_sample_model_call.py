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
