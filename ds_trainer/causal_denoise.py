"""Sampling a block-causal generator trained with flow matching (the adapter job's `model.causal`):
autoregressive, one block of frames at a time through the KV cache, as Self-Forcing's causal
diffusion inference does.

Per block: a fresh sampler (diffusers' schedulers are stateful) runs every step of its grid on the
block's noise, each guidance branch reading its own KV cache in lookahead mode (the cache holds the
finished blocks as seen under that branch's conditioning, so the branches keep one cache each, as
Self-Forcing's kv_cache_pos / kv_cache_neg); then the finished block is run once more at
`context_t` (0: clean) under every branch, which writes it to that branch's cache. Guidance is the
bidirectional sampler's (ds_trainer/sample.py: guided_flow), applied per block.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from model.causal import BlockStep, CausalWanModel, frame_blocks
from model.conditioning import Conditioning
from model.kv_cache import lookahead


def branches_used(br, guidance: float, ref_guidance: Optional[float]) -> list[Conditioning]:
    """The conditionings guided_flow calls the model with for these scales."""
    if ref_guidance is not None:
        return [br.full, br.text, br.neither]
    return [br.full] if guidance == 1.0 else [br.full, br.negative]


class _BlockCaller:
    """`model(x, t, cond)` for guided_flow, run as one block through `cond`'s own caches."""

    def __init__(self, model: CausalWanModel, state: dict[int, tuple[list, tuple]]):
        self.model, self.state, self.start = model, state, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        caches, cross = self.state[id(cond)]
        return self.model(x, t, block=BlockStep(self.start, caches, cross))


@torch.no_grad()
def denoise_blockwise(model: CausalWanModel, noise: torch.Tensor, br, make_sampler: Callable, guidance: float,
                      ref_guidance: Optional[float], context_t: float = 0.0,
                      on_block: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
    """Latents [B, 16, F, h, w] from noise, block by block (module docstring). make_sampler(): a new
    ds_trainer.schedulers.FlowSampler; br: the GuidanceBranches of ds_trainer/sample.py."""
    from tqdm import tqdm  # noqa: PLC0415

    from ds_trainer.sample import guided_flow, progress_disabled  # noqa: PLC0415

    b, f = noise.shape[0], noise.shape[2]
    state = {id(c): (model.kv_caches_for(noise, f), model.cross_attention_cache(c))
             for c in branches_used(br, guidance, ref_guidance)}
    every_cache = [cache for caches, _ in state.values() for cache in caches]
    call, out = _BlockCaller(model, state), []
    blocks = frame_blocks(f, model.causal)
    for index, (start, end) in enumerate(tqdm(blocks, desc="sample (blocks)", disable=progress_disabled())):
        call.start, x, sampler = start, noise[:, :, start:end], make_sampler()
        with lookahead(every_cache):
            for i in range(len(sampler)):
                t = sampler.timesteps[i].to(device=x.device, dtype=torch.float32).expand(b)
                x = sampler.step(guided_flow(call, x, t, br, guidance, ref_guidance).to(x.dtype), i, x)
        clean_t = torch.full((b,), float(context_t), device=x.device)
        for caches, cross in state.values():  # commit the finished block to every branch's cache
            model(x, clean_t, block=BlockStep(start, caches, cross))
        out.append(x)
        if on_block is not None:
            on_block(index, x)
    return torch.cat(out, dim=2)
