"""Self-Forcing's training rollout (`inference_with_trajectory`) on our causal Wan and KV cache.

Per block of frames: the few denoising steps of the (warped) step list, each predicting x0 and
re-noising it to the next step; only the EXIT step runs with gradients (every earlier step under
no_grad); then the block's clean x0 is run once more at `context_noise` to write the KV cache the
next blocks attend to. Denoising steps read the cache in lookahead mode (model/kv_cache.py), so a
step can be repeated and can carry gradients without the cache being written in place under them.
With `independent_first_frame` (I2V), block 0 is the conditioning image's clean latent.

The exit step is drawn once per rollout (`draw_exit_steps`) and broadcast from rank 0, so every
rank runs the same number of forwards (ZeRO-3 gathers are collectives: a different count hangs).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ds_trainer.distributed import broadcast_object
from ds_trainer.prompt_switch import PromptSwitch
from model.causal import BlockStep, CausalConfig, frame_blocks, recache
from model.conditioning import Conditioning
from model.flow_matching import FlowMatchingScheduler
from model.kv_cache import lookahead


def warped_steps(step_list: list[float], scheduler: FlowMatchingScheduler, warp: bool) -> list[float]:
    """The generator's timesteps: Self-Forcing's warp_denoising_step maps t onto the shifted
    training grid (`cat(timesteps, [0])[1000 - t]`: [1000, 750, 500, 250] -> [1000, 937.5, 833.3, 625])."""
    if not warp:
        return [float(t) for t in step_list]
    grid = torch.cat([scheduler.timesteps, torch.zeros(1, dtype=scheduler.timesteps.dtype)])
    return [float(grid[scheduler.num_train_timesteps - int(t)]) for t in step_list]


def draw_exit_steps(num_blocks: int, num_steps: int, generator: torch.Generator, same_across_blocks: bool,
                    last_step_only: bool) -> list[int]:
    """Index of the step each block exits at (with gradients), identical on every rank."""
    if last_step_only:
        exits = [num_steps - 1] * num_blocks
    else:
        exits = torch.randint(0, num_steps, (num_blocks,), generator=generator).tolist()
        if same_across_blocks:
            exits = [exits[0]] * num_blocks
    return broadcast_object(exits)


def self_forcing_rollout(generator: Callable, model, noise: torch.Tensor, cond: Conditioning,
                         first_latent: Optional[torch.Tensor], causal: CausalConfig, steps: list[float],
                         exits: list[int], scheduler: FlowMatchingScheduler, context_noise: float,
                         grad: bool, rng: torch.Generator,
                         on_block: Optional[Callable[[int, torch.Tensor], None]] = None,
                         switches: Sequence[PromptSwitch] = (), keep_sink: bool = True) -> torch.Tensor:
    """Roll the causal generator over all blocks of `noise` [B, 16, F, h, w]; returns the x0 of
    every block, [B, 16, F, h, w].

    generator: what to call for a forward (a DeepSpeed engine or the model itself), taking
    `(x, t, block=BlockStep)`; model: the CausalWanModel (for its caches and cross-attention
    cache). first_latent [B, 16, 1, h, w]: the image latent (independent_first_frame). y of `cond`
    is sliced per block. Gradients flow only through each block's exit step (when `grad`).
    on_block(index, x0 [B, 16, f, h, w]) is called as each block is done (streaming inference).
    switches: LongLive's prompt switches (ds_trainer/prompt_switch.py): from each one's block on, its
    conditioning, after re-caching the frames done (the sink kept with `keep_sink`)."""
    f = noise.shape[2]
    caches = model.kv_caches_for(noise, f)
    with torch.set_grad_enabled(grad):
        cross = model.cross_attention_cache(cond)
    blocks = frame_blocks(f, causal)
    switch_at = {s.block: s.cond for s in switches}
    out = []
    for index, (start, end) in enumerate(blocks):
        if index in switch_at:
            with torch.set_grad_enabled(grad):
                cross = model.cross_attention_cache(switch_at[index])
            recache(generator, caches, cross, torch.cat(out, dim=2).detach(), cond.y, blocks[:index], causal,
                    context_noise, keep_sink)
        y = cond.y[:, :, start:end] if cond.y is not None else None
        image = require_first(first_latent) if causal.independent_first_frame and index == 0 else None
        x0 = roll_block(generator, caches, cross, noise[:, :, start:end], y, start, steps, exits[index], scheduler,
                        context_noise, grad, rng, clean=image)
        out.append(x0)
        if on_block is not None:
            on_block(index, x0.detach())
    return torch.cat(out, dim=2)


def roll_block(generator, caches: list, cross: tuple, noise: torch.Tensor, y: Optional[torch.Tensor], start: int,
               steps: list[float], exit_index: int, scheduler: FlowMatchingScheduler, context_noise: float,
               grad: bool, rng: torch.Generator, clean: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One block at frame `start`: denoise `noise` [B, 16, f, h, w] over `steps` (gradients at the
    exit step when `grad`), or take `clean` as it is (the I2V image latent), then write it to the
    caches with the clean pass at `context_noise`. Returns the block's x0."""
    step = BlockStep(start, caches, cross, y)
    x0 = clean if clean is not None else _denoise_block(generator, caches, noise, step, steps, exit_index,
                                                        scheduler, grad, rng)
    with torch.no_grad():  # the clean pass that writes this block to the KV cache
        generator(x0.detach(), _full(x0.shape[0], context_noise, x0), block=step)
    return x0


def _denoise_block(generator, caches, x: torch.Tensor, step: BlockStep, steps: list[float], exit_index: int,
                   scheduler: FlowMatchingScheduler, grad: bool, rng: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    for i, t in enumerate(steps):
        last = i == exit_index
        sigma = _full(b, t, x) / scheduler.num_train_timesteps
        with torch.set_grad_enabled(grad and last), lookahead(caches):
            flow = generator(x, _full(b, t, x), block=step)
            x0 = scheduler.x0_from_flow(x, flow, sigma)
        if last:
            return x0
        next_sigma = _full(b, steps[i + 1], x) / scheduler.num_train_timesteps
        noise = torch.randn(x.shape, generator=rng).to(x.device, x.dtype)
        x = scheduler.add_noise(x0.detach(), noise, next_sigma)
    raise AssertionError("unreachable: the exit index is within the step list")


def _full(b: int, value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((b,), float(value), device=like.device)


def require_first(first_latent: Optional[torch.Tensor]) -> torch.Tensor:
    if first_latent is None:
        raise ValueError("independent_first_frame needs the first frame's latent (the I2V image)")
    return first_latent
