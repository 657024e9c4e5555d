"""KV-cache attention for causal (streaming) inference, forward only, Triton.

Shapes: B batch, Lq queries of the current block, N heads, D head dim, C cache slots.
q: [B, Lq, N, D]; k_cache, v_cache: [B, C, N, D]. The cache is a frame sink followed by a ring
buffer: slots [0, S) hold the sink (S = sink_len), slots [S, C) a ring of R = C - S slots. The
visible keys of sample b are the sink plus `window_len` ring slots starting at `window_start`,
wrapping at C back to S:

    visible = [0, S)  U  {S + ((window_start - S + i) mod R) : 0 <= i < window_len}
            = [0, S + wrap)  U  [window_start, min(window_start + window_len, C))
    wrap    = max(0, window_start + window_len - C)

(the two sink-adjacent pieces merge), so the kernel reads two contiguous ranges of the cache in
place: no roll, no concatenation, no copy (Self-Forcing / LongLive roll the cache and slice
`k[:, end - window:end]`, which copies). Every query of the block sees every visible key, as
in Self-Forcing's cached path (the current block is written to the cache before attending).
Softmax is order-invariant, so the ring's rotation does not matter.

One program per (query tile, b * n): online softmax (base 2, fp32 m, l, acc) over the key
tiles of both ranges; tiles inside a range take an unmasked path, its two edge tiles are masked
by key index. A sample with no visible key gets a zero output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention_types import Lengths, per_sample, visible_slots
from kernels.triton_common import (LOG2E, autotune_configs, autotuned, check_dtype, interpreting, launch,
                                   tile_constants, visit_tiles)

INTERPRET_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16)


# ------------------------------------------------------------------------------------ helpers
@triton.jit
def _kv_tile(state, args, start, lo, hi, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, ROW: tl.constexpr,
             HEAD_DIM: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over cache tile `start` of the key range [lo, hi); state (m_i, l_i, acc).
    Called by `visit_tiles`: masked edge tiles, unmasked tiles inside the range."""
    m_i, l_i, acc = state
    q, K, V, kv, offs_d, qk_scale = args
    offs_n = start + tl.arange(0, BLOCK_N)
    ptrs = kv + offs_n[:, None] * ROW + offs_d[None, :]
    if MASKED:
        inside = (offs_n >= lo) & (offs_n < hi)
        mask = inside[:, None] & (offs_d[None, :] < HEAD_DIM)
    else:
        mask = offs_d[None, :] < HEAD_DIM
    k = tl.load(K + ptrs, mask=mask, other=0.0).to(DOT)
    v = tl.load(V + ptrs, mask=mask, other=0.0).to(DOT)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        s = tl.where(inside[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=PRECISION)
    return m_new, l_i, acc


# ----------------------------------------------------------------------------- autotune space
KV_CONFIGS = autotune_configs([(64, 64), (128, 32), (128, 64), (128, 128)])


# ------------------------------------------------------------------------------------- kernel
@triton.jit(do_not_specialize=["Lq", "C"])
def _kv_fwd_kernel(Q, KC, VC, O, SINK, WSTART, WLEN, Lq, C, qk_scale,
                   HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(Lq, BLOCK_M), B * N). SINK, WSTART, WLEN: [B] int32."""
    ROW: tl.constexpr = HEADS * HEAD_DIM
    b = tl.program_id(1) // HEADS
    off_b = b.to(tl.int64)
    off_n = tl.program_id(1) % HEADS
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = off_b * Lq * ROW + off_n * HEAD_DIM + offs_m[:, None] * ROW + offs_d[None, :]
    io_mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + q_ptrs, mask=io_mask, other=0.0).to(DOT)
    sink = tl.load(SINK + b)
    start = tl.load(WSTART + b)
    length = tl.load(WLEN + b)
    first_end = tl.minimum(start + length, C)
    wrap = start + length - first_end  # ring slots read from S on
    kv = off_b * C * ROW + off_n * HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    args = (q, KC, VC, kv, offs_d, qk_scale)
    # every query sees the same keys, so a range's union and intersection are the range itself
    lo, hi = sink * 0, sink + wrap
    m_i, l_i, acc = visit_tiles(_kv_tile, (m_i, l_i, acc), args, lo, hi, lo, lo, hi, hi, 0, 0,
                                BLOCK_N, ROW, HEAD_DIM, DOT, PRECISION, False)
    lo, hi = tl.where(length > 0, start, 0), tl.where(length > 0, first_end, 0)
    m_i, l_i, acc = visit_tiles(_kv_tile, (m_i, l_i, acc), args, lo, hi, lo, lo, hi, hi, 0, 0,
                                BLOCK_N, ROW, HEAD_DIM, DOT, PRECISION, False)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(O + q_ptrs, out.to(O.dtype.element_ty), mask=io_mask)


_kv_fwd_tuned = autotuned(_kv_fwd_kernel, KV_CONFIGS, ["Lq", "C", "HEADS", "HEAD_DIM"],
                          rows="BLOCK_M", accumulators=1, scores=1, name="kv_fwd")  # acc | s


# ------------------------------------------------------------------------------- public entry
def _check_ranges(sink: torch.Tensor, start: torch.Tensor, length: torch.Tensor, c: int) -> None:
    """0 <= S <= C, 0 <= window_len <= C - S, S <= window_start < C where window_len > 0."""
    bad = (sink < 0) | (sink > c) | (length < 0) | (length > c - sink) | \
          ((length > 0) & ((start < sink) | (start >= c)))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"sample {i}: sink_len={int(sink[i])}, window_start={int(start[i])}, "
                         f"window_len={int(length[i])} do not fit a cache of {c} slots "
                         f"(need 0 <= sink <= C, 0 <= window_len <= C - sink, sink <= window_start < C)")


def kv_cache_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sink_len: Lengths,
                       window_start: Lengths, window_len: Lengths, check: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over the sink [0, sink_len) and the ring window of
    `window_len` slots from `window_start` (wrapping from C to sink_len), read in place.

    q: [B, Lq, N, D]; k_cache, v_cache: [B, C, N, D]; sink_len, window_start, window_len: int or
    [B] int tensors. Computes in v_cache's dtype; returns [B, Lq, N, D]. Forward only (no grad).
    check: validate the ranges (free for ints; a device sync when they are GPU tensors).
    """
    dtype = v_cache.dtype
    check_dtype("kv_cache_attention", dtype)
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape or \
            (k_cache.shape[0], k_cache.shape[2], k_cache.shape[3]) != (q.shape[0], q.shape[2], q.shape[3]):
        raise ValueError(f"q must be [B, Lq, N, D] and k_cache, v_cache [B, C, N, D]; got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        raise RuntimeError("kv_cache_attention is forward only; use kv_cache_attention_ref for gradients")
    b, lq, n, d = q.shape
    c = k_cache.shape[1]
    named = ((sink_len, "sink_len"), (window_start, "window_start"), (window_len, "window_len"))
    if check:  # on host copies: ints cost no device sync, GPU tensors one
        _check_ranges(*(per_sample(x, b, "cpu", name) for x, name in named), c)
    sink, start, length = (per_sample(x, b, q.device, name) for x, name in named)
    out = torch.empty(b, lq, n, d, device=q.device, dtype=dtype)
    if out.numel() == 0:
        return out
    q, k_cache, v_cache = q.to(dtype).contiguous(), k_cache.contiguous(), v_cache.contiguous()
    consts = dict(HEADS=n, **tile_constants(dtype, d, interpreting(_kv_fwd_kernel)))
    args = [q, k_cache, v_cache, out, sink, start, length, lq, c, d ** -0.5 * LOG2E]
    launch(_kv_fwd_kernel, _kv_fwd_tuned, lambda m: (triton.cdiv(lq, m["BLOCK_M"]), b * n), args, consts,
           INTERPRET_BLOCKS)
    return out


def kv_cache_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sink_len: Lengths,
                           window_start: Lengths, window_len: Lengths) -> torch.Tensor:
    """Plain PyTorch: per sample, gather (concatenate) the visible keys, explicit softmax; any
    dtype (float64 in tests), differentiable. Shapes as `kv_cache_attention`; returns q's dtype."""
    b, c = q.shape[0], k_cache.shape[1]
    per = [per_sample(x, b, "cpu", "len").tolist() for x in (sink_len, window_start, window_len)]
    outs = []
    for i, (s, ws, wl) in enumerate(zip(*per)):
        idx = visible_slots(c, s, ws, wl).to(q.device)
        k, v = k_cache[i, idx].to(q.dtype), v_cache[i, idx].to(q.dtype)  # [K, N, D]
        w = torch.softmax(torch.einsum("qnd,knd->nqk", q[i], k) * q.shape[-1] ** -0.5, dim=-1)
        outs.append(torch.einsum("nqk,knd->qnd", w, v) if len(idx) else torch.zeros_like(q[i]))
    return torch.stack(outs)
