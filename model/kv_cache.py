"""Self-attention KV cache of the causal Wan: a fixed-size ring buffer with a protected sink.

Per transformer block, k and v buffers [B, C, N, D] are allocated once. C = S + R: the sink
region [0, S) holds the first S tokens ever written (LongLive's frame sink) and is never
overwritten; the ring region [S, C) holds the most recent R tokens, written in place at a
wrapping position. Writing a block is at most three slice copies: no roll, no concatenation,
no reallocation. Attention reads the sink and the (possibly wrapped) ring window in place.

Global attention (no local window) is the special case R = all tokens of the video, S = 0.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

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
        self.lookahead = False
        """In lookahead mode (`lookahead(caches)`), `attend` leaves the cache as it is."""

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

    def attend(self, k: torch.Tensor, v: torch.Tensor) -> CacheView:
        """What a block with keys / values k, v [B, T, N, D] attends to: the cache after appending
        them. Written in place normally; in lookahead mode the cache is left as it is and the view
        is a fresh tensor (so a denoising step can run, with gradients, and be done again)."""
        if self.lookahead:
            return self.peek(k, v)
        self.write(k.to(self.k.dtype), v.to(self.v.dtype))
        return self.view()

    def peek(self, k: torch.Tensor, v: torch.Tensor) -> CacheView:
        """The tokens `write(k, v); view()` would make visible, gathered into new tensors (keys in
        any order: attention does not depend on it) without touching the cache."""
        t, end = k.shape[1], self.total + k.shape[1]
        if t > self.ring + max(0, self.sink - self.total):
            raise ValueError(f"a block of {t} tokens does not fit the cache (ring {self.ring}, sink {self.sink})")
        device = self.k.device
        positions = torch.cat([torch.arange(0, min(end, self.sink), device=device),
                               torch.arange(max(self.sink, end - self.ring), end, device=device)])
        old = positions[positions < self.total]
        slots = torch.where(old < self.sink, old, self.sink + (old - self.sink) % self.ring)
        first_new = int(positions[positions >= self.total][0]) - self.total if t else 0
        k_all = torch.cat([self.k.index_select(1, slots).to(k.dtype), k[:, first_new:]], dim=1)
        v_all = torch.cat([self.v.index_select(1, slots).to(v.dtype), v[:, first_new:]], dim=1)
        return CacheView(k_all, v_all, 0, 0, k_all.shape[1])

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


@contextlib.contextmanager
def lookahead(caches: Sequence[KVCache]) -> Iterator[None]:
    """Inside, forwards through `caches` read them but write nothing: the denoising steps of a
    block before the clean pass that commits it (Self-Forcing's training rollout)."""
    before = [c.lookahead for c in caches]
    for c in caches:
        c.lookahead = True
    try:
        yield
    finally:
        for c, b in zip(caches, before):
            c.lookahead = b
