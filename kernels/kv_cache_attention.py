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

from typing import Union

import torch
import triton
import triton.language as tl

from kernels.fused_cross_attention import MIN_BLOCK_D, SUPPORTED_DTYPES, prune_by_registers

LOG2E = 1.4426950408889634
INTERPRET_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16)
Lengths = Union[int, torch.Tensor]  # a Python int for every sample, or a [B] int tensor


def _interpreting() -> bool:
    return not isinstance(_kv_fwd_kernel, triton.runtime.JITFunction)


# ------------------------------------------------------------------------------------ helpers
@triton.jit
def _kv_tile(q, K, V, kv, start, lo, hi, m_i, l_i, acc, offs_d, qk_scale,
             ROW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr,
             PRECISION: tl.constexpr, MASKED: tl.constexpr):
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


@triton.jit
def _kv_range(q, K, V, kv, lo, hi, m_i, l_i, acc, offs_d, qk_scale,
              ROW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr,
              PRECISION: tl.constexpr):
    """Keys [lo, hi) of the cache: masked first tile, unmasked middle, masked last tile."""
    t0 = (lo // BLOCK_N) * BLOCK_N
    f0 = tl.minimum(tl.cdiv(lo, BLOCK_N) * BLOCK_N, hi)
    f1 = tl.maximum((hi // BLOCK_N) * BLOCK_N, f0)
    for start in range(t0, f0, BLOCK_N):
        m_i, l_i, acc = _kv_tile(q, K, V, kv, start, lo, hi, m_i, l_i, acc, offs_d, qk_scale,
                                 ROW, HEAD_DIM, BLOCK_N, DOT, PRECISION, True)
    for start in range(f0, f1, BLOCK_N):
        m_i, l_i, acc = _kv_tile(q, K, V, kv, start, lo, hi, m_i, l_i, acc, offs_d, qk_scale,
                                 ROW, HEAD_DIM, BLOCK_N, DOT, PRECISION, False)
    for start in range(f1, hi, BLOCK_N):
        m_i, l_i, acc = _kv_tile(q, K, V, kv, start, lo, hi, m_i, l_i, acc, offs_d, qk_scale,
                                 ROW, HEAD_DIM, BLOCK_N, DOT, PRECISION, True)
    return m_i, l_i, acc


# ----------------------------------------------------------------------------- autotune space
KV_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
              for bm, bn in [(64, 64), (128, 32), (128, 64), (128, 128)] for w in (4, 8) for s in (2, 3)]


def _prune_kv(configs, named_args, **kwargs):
    return prune_by_registers(configs, named_args, rows="BLOCK_M", accumulators=1, scores=1, **kwargs)


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
    m_i, l_i, acc = _kv_range(q, KC, VC, kv, sink * 0, sink + wrap, m_i, l_i, acc, offs_d, qk_scale,
                              ROW, HEAD_DIM, BLOCK_N, DOT, PRECISION)
    m_i, l_i, acc = _kv_range(q, KC, VC, kv, tl.where(length > 0, start, 0), tl.where(length > 0, first_end, 0),
                              m_i, l_i, acc, offs_d, qk_scale, ROW, HEAD_DIM, BLOCK_N, DOT, PRECISION)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(O + q_ptrs, out.to(O.dtype.element_ty), mask=io_mask)


_kv_fwd_tuned = triton.autotune(KV_CONFIGS, key=["Lq", "C", "HEADS", "HEAD_DIM"],
                                prune_configs_by={"early_config_prune": _prune_kv})(_kv_fwd_kernel)


# ------------------------------------------------------------------------------- public entry
_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _per_sample(x: Lengths, b: int, device, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, device=device, dtype=torch.int32)
    if t.dim() == 0:
        return t.expand(b).contiguous()
    if t.shape != (b,):
        raise ValueError(f"{name} must be an int or a [B={b}] tensor, got shape {tuple(t.shape)}")
    return t.contiguous()


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
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"kv_cache_attention supports {SUPPORTED_DTYPES}, got {dtype}; use kv_cache_attention_ref")
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
        _check_ranges(*(_per_sample(x, b, "cpu", name) for x, name in named), c)
    sink, start, length = (_per_sample(x, b, q.device, name) for x, name in named)
    out = torch.empty(b, lq, n, d, device=q.device, dtype=dtype)
    if out.numel() == 0:
        return out
    q, k_cache, v_cache = q.to(dtype).contiguous(), k_cache.contiguous(), v_cache.contiguous()
    interpret_bf16 = _interpreting() and dtype == torch.bfloat16  # bf16 tl.dot is broken there
    consts = dict(HEADS=n, HEAD_DIM=d, BLOCK_D=max(MIN_BLOCK_D, triton.next_power_of_2(d)),
                  DOT=tl.float32 if interpret_bf16 else _DOT_DTYPES[dtype],
                  PRECISION="ieee" if dtype == torch.float32 else "tf32")
    args = [q, k_cache, v_cache, out, sink, start, length, lq, c, d ** -0.5 * LOG2E]
    if _interpreting():
        _kv_fwd_kernel[(triton.cdiv(lq, INTERPRET_BLOCKS["BLOCK_M"]), b * n)](*args, **consts, **INTERPRET_BLOCKS)
    else:
        _kv_fwd_tuned[lambda m: (triton.cdiv(lq, m["BLOCK_M"]), b * n)](*args, **consts)
    return out


def visible_slots(c: int, sink_len: int, window_start: int, window_len: int) -> torch.Tensor:
    """Cache slot indices sample b attends to, in window order: sink, then the ring window."""
    ring = c - sink_len
    window = [sink_len + (window_start - sink_len + i) % ring for i in range(window_len)] if ring else []
    return torch.tensor(list(range(sink_len)) + window, dtype=torch.long)


def kv_cache_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sink_len: Lengths,
                           window_start: Lengths, window_len: Lengths) -> torch.Tensor:
    """Plain PyTorch: per sample, gather (concatenate) the visible keys, explicit softmax; any
    dtype (float64 in tests), differentiable. Shapes as `kv_cache_attention`; returns q's dtype."""
    b, c = q.shape[0], k_cache.shape[1]
    per = [_per_sample(x, b, "cpu", "len").tolist() for x in (sink_len, window_start, window_len)]
    outs = []
    for i, (s, ws, wl) in enumerate(zip(*per)):
        idx = visible_slots(c, s, ws, wl).to(q.device)
        k, v = k_cache[i, idx].to(q.dtype), v_cache[i, idx].to(q.dtype)  # [K, N, D]
        w = torch.softmax(torch.einsum("qnd,knd->nqk", q[i], k) * q.shape[-1] ** -0.5, dim=-1)
        outs.append(torch.einsum("nqk,knd->qnd", w, v) if len(idx) else torch.zeros_like(q[i]))
    return torch.stack(outs)
