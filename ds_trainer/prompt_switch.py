"""LongLive's prompt switches in a causal rollout: from a given block on, a new prompt conditions
the generator, and the KV cache is re-cached so the frames already made are seen "as if" written
under the new prompt (LongLive's `_recache_after_switch`).

At a switch before block k (frames [0, cur) done):
1. the cross-attention cache is rebuilt from the new prompt (clip_fea and y stay: they are the
   first frame's);
2. the self-attention KV cache is emptied and the last frames the next block can see are run again,
   block by block along the rollout's own block boundaries, at `context_noise` under the new cross
   cache: every frame of [0, cur) with global attention; the last `local_attn_size` frames with a
   window. With a window and `keep_sink` (LongLive's inference default, `global_sink: true`) the
   sink keeps its K, V from the old prompt and only the frames after it are re-cached: the last
   `local_attn_size - sink_size`, never the sink frames again. Without `keep_sink` the re-cached
   window's first frames become the new sink (`global_sink: false`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from model.causal import BlockStep, CausalConfig
from model.conditioning import Conditioning


@dataclass(frozen=True)
class PromptSwitch:
    """From block `block` on (an index into the rollout's frame blocks), condition on `cond`."""

    block: int
    cond: Conditioning


def switch_blocks(switch_at: Sequence[int], blocks: Sequence[tuple[int, int]], prompts: int) -> list[int]:
    """Block indices of the latent frames `switch_at` (`--switch-at`), checked: one more prompt than
    switches, strictly increasing, each the first frame of a block after the first one."""
    if prompts != len(switch_at) + 1:
        raise ValueError(f"{prompts} --prompt for {len(switch_at)} --switch-at: give one prompt more than switches "
                         "(the first runs from frame 0, each next one from its --switch-at frame)")
    starts = {start: i for i, (start, _) in enumerate(blocks)}
    valid = [start for start, _ in blocks[1:]]
    out = []
    for frame in switch_at:
        if frame not in starts or starts[frame] == 0:
            raise ValueError(f"--switch-at {frame}: a switch must be at the first latent frame of a block after "
                             f"the first; this video's blocks start at {valid}")
        if out and starts[frame] <= out[-1]:
            raise ValueError(f"--switch-at {frame}: switches must be in increasing order, got {list(switch_at)}")
        out.append(starts[frame])
    return out


def recache_range(done_frames: int, causal: CausalConfig, keep_sink: bool) -> tuple[int, bool]:
    """(first frame to re-cache, whether the cache keeps its sink) after `done_frames` frames."""
    window, sink = causal.local_attn_size, causal.sink_size
    if window <= 0:
        return 0, False
    if keep_sink and sink > 0 and done_frames > sink:
        return max(sink, done_frames - (window - sink)), True
    return max(0, done_frames - window), False


def recache_after_switch(generator: Callable, caches: list, cross: tuple, latents: torch.Tensor,
                         y: Optional[torch.Tensor], blocks_done: Sequence[tuple[int, int]], causal: CausalConfig,
                         context_noise: float, keep_sink: bool) -> None:
    """Re-write `caches` from the clean `latents` [B, 16, cur, h, w] of `blocks_done` under the new
    `cross` cache (module docstring). generator: what the rollout calls, `(x, t, block=BlockStep)`."""
    done = blocks_done[-1][1]
    lo, kept = recache_range(done, causal, keep_sink)
    for cache in caches:
        cache.reset(keep_sink=kept)
    b = latents.shape[0]
    t = torch.full((b,), float(context_noise), device=latents.device)
    with torch.no_grad():
        for start, end in blocks_done:
            a = max(start, lo)
            if a >= end:
                continue
            ys = y[:, :, a:end] if y is not None else None
            generator(latents[:, :, a:end], t, block=BlockStep(a, caches, cross, ys))
