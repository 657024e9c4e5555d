"""Block-causal attention layouts (Self-Forcing / LongLive training masks) in plain PyTorch: which
keys each query sees, as integers (`BlockCausalLayout`), as a dense mask for SDPA, as a
FlexAttention `mask_mod`, and a float64-capable reference. The Triton kernels in
`kernels.block_causal_attention` compute the same rule from `BlockCausalLayout.kernel_args()`;
this module imports no Triton, so the causal model and its KV cache load without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class BlockCausalLayout:
    """Which keys each query sees; token indices, frame-major.

    frame_tokens: FT, tokens per latent frame (1560 at 480x832).
    num_frames: F, latent frames of ONE sequence (of each half under teacher forcing).
    frames_per_block: FPB, frames generated together (Self-Forcing: 3).
    independent_first_frame: frame 0 is a block of its own (I2V), then blocks of FPB.
    local_frames: sliding window in frames (keys >= block_end - local_frames * FT); -1: none.
        Must be >= frames_per_block (a block always sees itself).
    sink_frames: the first sink_frames frames stay visible (LongLive's frame sink); causal.
    teacher_forcing: the sequence is [clean | noisy], each num_frames * FT tokens.
    """

    frame_tokens: int
    num_frames: int
    frames_per_block: int
    independent_first_frame: bool = False
    local_frames: int = -1
    sink_frames: int = 0
    teacher_forcing: bool = False

    def __post_init__(self):
        if min(self.frame_tokens, self.num_frames, self.frames_per_block) < 1:
            raise ValueError(f"frame_tokens, num_frames and frames_per_block must be >= 1: {self}")
        if self.local_frames != -1 and self.local_frames < self.frames_per_block:
            raise ValueError(f"local_frames must be -1 (no window) or >= frames_per_block "
                             f"({self.frames_per_block}), got {self.local_frames}")
        if not 0 <= self.sink_frames <= self.num_frames:
            raise ValueError(f"sink_frames must be in [0, num_frames={self.num_frames}], got {self.sink_frames}")

    @property
    def context_len(self) -> int:
        """L0: tokens of one sequence (the clean half under teacher forcing)."""
        return self.frame_tokens * self.num_frames

    @property
    def seq_len(self) -> int:
        """L: tokens the attention runs over."""
        return self.context_len * (2 if self.teacher_forcing else 1)

    @property
    def window_tokens(self) -> int:
        """W: the window in tokens (L0 when there is none, which reaches back to key 0)."""
        return self.context_len if self.local_frames == -1 else self.local_frames * self.frame_tokens

    def blocks(self) -> list[tuple[int, int]]:
        """Token [start, end) of each block of one sequence, in order."""
        first = 1 if self.independent_first_frame else 0
        starts = ([0] if first else []) + list(range(first, self.num_frames, self.frames_per_block))
        ends = starts[1:] + [self.num_frames]
        return [(s * self.frame_tokens, e * self.frame_tokens) for s, e in zip(starts, ends)]

    def query_blocks(self) -> list[tuple[int, int, tuple[tuple[int, int], ...]]]:
        """(q_start, q_end, visible key ranges) for every query block: the rule in plain Python,
        written independently of the kernel's arithmetic (tests, references, per-block loops)."""
        l0, sink = self.context_len, self.sink_frames * self.frame_tokens
        out = []
        for s, e in self.blocks():
            lo = max(0, e - self.window_tokens)
            out.append((s, e, _union([(0, min(sink, e)), (lo, e)])))
        if self.teacher_forcing:
            for s, e in self.blocks():
                lo = max(0, e - self.window_tokens)
                out.append((l0 + s, l0 + e, _union([(0, min(sink, s)), (lo, s), (l0 + s, l0 + e)])))
        return out

    def visible_pairs(self) -> int:
        """Number of (query, key) pairs the mask keeps (for FLOP counts)."""
        return sum((q1 - q0) * sum(k1 - k0 for k0, k1 in ranges) for q0, q1, ranges in self.query_blocks())

    def kernel_args(self) -> list[int]:
        """L0, FT, F, FPB, W, SINK as the kernels take them."""
        return [self.context_len, self.frame_tokens, self.num_frames, self.frames_per_block,
                self.window_tokens, self.sink_frames * self.frame_tokens]


def _union(ranges) -> tuple[tuple[int, int], ...]:
    """Sorted, merged, non-empty ranges."""
    merged: list[list[int]] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return tuple((a, b) for a, b in merged)


def block_causal_mask(layout: BlockCausalLayout, device=None) -> torch.Tensor:
    """[L, L] bool, True where query row i may attend key column j (from `query_blocks`).
    Usable as `F.scaled_dot_product_attention(attn_mask=...)`; FlexAttention: `flex_mask_mod`."""
    mask = torch.zeros(layout.seq_len, layout.seq_len, dtype=torch.bool, device=device)
    for q0, q1, ranges in layout.query_blocks():
        for k0, k1 in ranges:
            mask[q0:q1, k0:k1] = True
    return mask


def flex_mask_mod(layout: BlockCausalLayout, device=None):
    """A FlexAttention `mask_mod(b, h, q_idx, kv_idx)` for `create_block_mask`: per query token
    three key ranges looked up in [L] int tables (no [L, L] tensor). Build the BlockMask once."""
    table = torch.zeros(6, layout.seq_len, dtype=torch.int32)  # (start, end) of ranges 0..2 per query
    for q0, q1, ranges in layout.query_blocks():
        for i, (k0, k1) in enumerate(ranges):
            table[2 * i, q0:q1], table[2 * i + 1, q0:q1] = k0, k1
    r0s, r0e, r1s, r1e, r2s, r2e = table.to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        return (((kv_idx >= r0s[q_idx]) & (kv_idx < r0e[q_idx])) | ((kv_idx >= r1s[q_idx]) & (kv_idx < r1e[q_idx]))
                | ((kv_idx >= r2s[q_idx]) & (kv_idx < r2e[q_idx])))

    return mask_mod


def block_causal_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               layout: Optional[BlockCausalLayout] = None) -> torch.Tensor:
    """Plain PyTorch: dense boolean mask + explicit softmax, any dtype (float64 in tests).
    q, k, v: [B, L, N, D]; returns [B, L, N, D] in q's dtype. No layout: full attention."""
    s = torch.einsum("bqnd,bknd->bnqk", q, k.to(q.dtype)) * q.shape[-1] ** -0.5
    if layout is not None:
        s = s.masked_fill(~block_causal_mask(layout, q.device), float("-inf"))
    return torch.einsum("bnqk,bknd->bqnd", torch.softmax(s, dim=-1), v.to(q.dtype))
