"""Self-attention KV cache of the causal Wan: a fixed-size ring buffer with a protected sink.

Per transformer block, k and v buffers [B, C, N, D] are allocated once. C = S + R: the sink
region [0, S) holds the first S tokens ever written (LongLive's frame sink) and is never
overwritten; the ring region [S, C) holds the most recent R tokens, written in place at a
wrapping position. Writing a block is at most three slice copies: no roll, no concatenation,
no reallocation. Attention reads the sink and the (possibly wrapped) ring window in place.

Global attention (no local window) is the special case R = all tokens of the video, S = 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class CacheView:
    """What a query block may attend to, read in place: k/v[:, :sink_len] plus `window_len` ring
    tokens starting at buffer index `window_start`, wrapping from the end of the buffer back to
    `sink_len` (kernels.attention_types.visible_slots lists them)."""

    k: torch.Tensor
    v: torch.Tensor
    sink_len: int
    window_start: int
    window_len: int


class KVCache:
    """One block's self-attention cache. Tokens arrive in order; `total` counts them."""

    def __init__(self, batch: int, sink_tokens: int, ring_tokens: int, heads: int, head_dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if ring_tokens <= 0:
            raise ValueError(f"the ring must hold at least one token, got {ring_tokens}")
        self.sink, self.ring = sink_tokens, ring_tokens
        shape = (batch, sink_tokens + ring_tokens, heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.total = 0

    @property
    def capacity(self) -> int:
        return self.sink + self.ring

    def reset(self, keep_sink: bool = False) -> None:
        """Forget everything (or everything but a full sink: LongLive's re-cache with a global sink)."""
        self.total = self.sink if keep_sink and self.total >= self.sink else 0

    def _slot(self, pos: int) -> int:
        """Buffer index of global token position `pos`."""
        return pos if pos < self.sink else self.sink + (pos - self.sink) % self.ring

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append T tokens k, v [B, T, N, D] in place (T <= ring; the sink fills first)."""
        t = k.shape[1]
        pos, done = self.total, 0
        if t > self.ring + max(0, self.sink - pos):
            raise ValueError(f"a block of {t} tokens does not fit the cache (ring {self.ring}, sink {self.sink})")
        while done < t:
            slot = self._slot(pos + done)
            limit = self.sink if slot < self.sink else self.capacity
            n = min(t - done, limit - slot)
            self.k[:, slot:slot + n] = k[:, done:done + n]
            self.v[:, slot:slot + n] = v[:, done:done + n]
            done += n
        self.total += t

    def view(self) -> CacheView:
        """The visible tokens: the sink plus the most recent min(total - S, R) tokens."""
        sink_len = min(self.total, self.sink)
        window_len = min(max(self.total - self.sink, 0), self.ring)
        first = self.total - window_len  # global position of the oldest visible ring token
        start = self._slot(first) if window_len else self.sink
        return CacheView(self.k, self.v, sink_len, start, window_len)


def make_caches(num_layers: int, batch: int, frame_tokens: int, heads: int, head_dim: int, max_frames: int,
                local_frames: int = -1, sink_frames: int = 0, device="cpu", dtype=torch.float32,
                block_frames: Optional[int] = None) -> list[KVCache]:
    """One cache per transformer block. Global attention: a ring as long as the whole video.
    Local window of `local_frames` (including the sink): sink + ring = local_frames frames."""
    if local_frames < 0:
        sink, ring = 0, max_frames * frame_tokens
    else:
        if sink_frames >= local_frames:
            raise ValueError(f"sink_size ({sink_frames}) must be smaller than local_attn_size ({local_frames})")
        sink, ring = sink_frames * frame_tokens, (local_frames - sink_frames) * frame_tokens
        if block_frames is not None and block_frames * frame_tokens > ring:
            raise ValueError(f"a block of {block_frames} frames does not fit local_attn_size {local_frames} "
                             f"minus sink_size {sink_frames}")
    return [KVCache(batch, sink, ring, heads, head_dim, device, dtype) for _ in range(num_layers)]
