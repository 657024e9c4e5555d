"""Sampling the block-causal generator of the adapter job (ds_trainer/causal_denoise.py): block by
block through one KV cache per guidance branch, checked against full-sequence forwards in float64."""
import pytest
import torch

from ds_trainer.causal_denoise import denoise_blockwise
from ds_trainer.sample import GuidanceBranches, denoise, guided_flow, without_references
from ds_trainer.schedulers import FlowSampler
from model.causal import CausalConfig, CausalWanModel, frame_blocks
from model.conditioning import Conditioning
from model.config import ReferencePathsConfig, WAN_TINY
from tests.model.test_wan import randomize

H, W, F = 4, 6, 5
REFS = WAN_TINY.replace(reference_paths=ReferencePathsConfig(clip=True, vae=True, fused=True))


def _branches(cfg, separate: bool) -> GuidanceBranches:
    g = torch.Generator().manual_seed(3)
    refs = dict(ref_vae=torch.randn(1, 1, 16, H, W, generator=g), ref_vae_lens=torch.tensor([H * W]),
                ref_clip=torch.randn(1, 1, 5, cfg.clip_dim, generator=g), ref_clip_lens=torch.tensor([5]))
    full = Conditioning(torch.randn(1, 7, cfg.text_dim, generator=g), **refs)
    negative = Conditioning(torch.randn(1, 7, cfg.text_dim, generator=g), **refs)
    br = GuidanceBranches(full, negative)
    if separate:
        br = GuidanceBranches(full, negative, without_references(full), without_references(negative))
    return br.__class__(*(None if c is None else c.to(dtype=torch.float64) for c in
                          (br.full, br.negative, br.text, br.neither)))


def _model(causal: CausalConfig) -> CausalWanModel:
    torch.manual_seed(0)
    return randomize(CausalWanModel(REFS, causal)).double().eval()


def _noise():
    return torch.randn(1, 16, F, H, W, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


class _Prefixed:
    """model(x, t, cond) for one block, as the full-sequence forward of [finished blocks at t = 0 |
    this block at t] under the block-causal mask, keeping the block's output (the reference)."""

    def __init__(self, model, done):
        self.model, self.done = model, done

    def __call__(self, x, t, cond):
        seq = torch.cat([self.done, x], dim=2)
        tt = torch.cat([torch.zeros(1, self.done.shape[2], dtype=t.dtype), t[:, None].expand(-1, x.shape[2])], 1)
        return self.model(seq, tt, cond)[:, :, self.done.shape[2]:]


def _reference(model, noise, br, guidance, ref_guidance, sampler="unipc", steps=4):
    done = noise[:, :, :0]
    for start, end in frame_blocks(noise.shape[2], model.causal):
        x, s = noise[:, :, start:end], FlowSampler(sampler, steps, 3.0)
        call = _Prefixed(model, done)
        for i in range(len(s)):
            t = s.timesteps[i].to(torch.float32).expand(1)
            x = s.step(guided_flow(call, x, t, br, guidance, ref_guidance), i, x)
        done = torch.cat([done, x], dim=2)
    return done


@pytest.mark.parametrize("causal, guidance, ref_guidance", [
    (CausalConfig(2, independent_first_frame=True), 4.0, None),
    (CausalConfig(1, local_attn_size=3, sink_size=1), 1.0, 2.5),
], ids=["i2v-blocks-cfg", "window-sink-ref-guidance"])
def test_blockwise_sampling_equals_full_forwards_over_the_finished_prefix(causal, guidance, ref_guidance):
    model, noise = _model(causal), _noise()
    br = _branches(REFS, ref_guidance is not None)
    got = denoise_blockwise(model, noise, br, lambda: FlowSampler("unipc", 4, 3.0), guidance, ref_guidance)
    torch.testing.assert_close(got, _reference(model, noise, br, guidance, ref_guidance), rtol=0, atol=1e-10)


def test_one_block_is_the_bidirectional_sampler_and_denoise_dispatches_on_the_model():
    """With every frame in one block there is no cache to read: the plain full-sequence sampler."""
    model, noise = _model(CausalConfig(F)), _noise()
    br = _branches(REFS, False)
    got = denoise(model, noise, br, FlowSampler("euler", 3, 3.0), 4.0, None)  # routed to denoise_blockwise
    x, s = noise, FlowSampler("euler", 3, 3.0)
    for i in range(len(s)):
        t = s.timesteps[i].to(torch.float32).expand(1)
        x = s.step(guided_flow(model, x, t, br, 4.0, None), i, x)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-10)
