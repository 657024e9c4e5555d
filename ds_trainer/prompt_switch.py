"""LongLive's prompt switches in a causal rollout: from a given block on, a new prompt conditions
the generator, and the KV cache is re-cached so the frames already made are seen "as if" written
under the new prompt (LongLive's `_recache_after_switch`).

At a switch before block k (frames [0, cur) done; the re-cache is model/causal.py's `recache`):
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
from typing import Sequence

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
