"""Block-causal self-attention (Self-Forcing / LongLive training masks), Triton, fwd + bwd.

Shapes: B batch, L tokens, N heads, D head dim; q, k, v: [B, L, N, D]. The mask is given by a
`BlockCausalLayout`: F latent frames of FT tokens each, grouped into blocks of FPB frames
(optionally frame 0 alone: `independent_first_frame`, Self-Forcing's I2V mask). For a query in
the block [s, e) (token indices):

    visible keys = [lo, e)  U  [0, min(SINK, e))        lo = max(0, e - W)
    W = local_frames * FT (a sliding window; no window: W = L), SINK = sink_frames * FT

Teacher forcing: the sequence is [clean (L0 tokens) | noisy (L0 tokens)], L = 2 L0, the same
block partition on both halves. Clean queries use the rule above inside the clean half; a noisy
query of block [s, e) sees the clean context before its block, windowed the same way, and its
own noisy block:  [lo, s) U [0, min(SINK, s)) U [L0 + s, L0 + e)  (Self-Forcing's
`_prepare_teacher_forcing_mask`, generalised to windows and sinks).

LongLive's `local_attn_size` counts the sink frames inside the window (keys
`[0, sink) U [end - (local - sink) FT, end)`): that is local_frames = local_attn_size - sink_size.

Per query row the visible keys are at most three disjoint ranges, A = [0, a1) (sink), B = [b0, b1)
(block-causal window), C = [c0, c1) (own noisy block); every bound is a monotone function of
the row, computed in the kernel from a few integers (no mask tensor, no index tables, so tile
sizes stay free for autotuning). For a query tile, per range, the union over its rows gives the
key tiles to visit and the intersection the tiles that every row sees: those take an unmasked
fast path; the edge tiles are masked elementwise; every other key tile is skipped. Block edges
need not align with tiles (1560 tokens a frame at 480x832).

Forward (tutorial 06 layout): grid (cdiv(L, BLOCK_M), B * N), online softmax in base 2 (scores
scaled by log2(e)/sqrt(D), exp2, fp32 m, l, acc); stores LSE = m + log2(l) [B, N, L].
Backward, dS the gradient of the scaled scores:

    D = rowsum(dO * O)      dS = P * (dP - D)      dP = dO V^T
    dQ = dS K / sqrt(D)     dK = dS^T Q / sqrt(D)  dV = P^T dO

dQ kernel: one program per query tile (same key-tile ranges as the forward); it first takes
D from its O and dO tiles and writes it to `delta`. dK/dV kernel: one program per key tile; the
queries that see key k are again at most two ranges with monotone bounds (the inverse of the
rule above), so it loops only over query tiles that see the key tile. No atomics: deterministic.

Precision: fp32 accumulation; P and dS rounded to the input dtype before their matmuls; fp32
inputs use IEEE dots. Under the Triton interpreter bf16 is upcast to fp32 before `tl.dot`.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.block_causal_layout import BlockCausalLayout, block_causal_attention_ref
from kernels.triton_common import (LOG2E, autotune_configs, autotuned, check_dtype, interpreting, launch,
                                   tile_constants, visit_tiles)

BIG = tl.constexpr(1 << 30)          # "no key": union bounds of rows with an empty range
INTERPRET_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16)  # test lengths (35..84) span several tiles


# ------------------------------------------------------------------------------------ helpers
# Rows of one head of a contiguous [B, L, N, D] tensor sit at base + l * ROW + d, ROW = N * D.
@triton.jit
def _block_bounds(t, FT, NF, FPB, IFF: tl.constexpr):
    """Token [s, e) of the block holding token t (index inside one sequence)."""
    f = t // FT
    if IFF:
        bs = tl.where(f == 0, 0, 1 + (tl.maximum(f - 1, 0) // FPB) * FPB)
        be = tl.where(f == 0, 1, bs + FPB)
    else:
        bs = (f // FPB) * FPB
        be = bs + FPB
    return bs * FT, tl.minimum(be, NF) * FT


@triton.jit
def _last_end_le(x, FT, NF, FPB, IFF: tl.constexpr):
    """Largest block end (token) <= x, for x >= the end of the block of token x - W."""
    fx = x // FT
    if IFF:
        e = tl.where(fx >= 1, 1 + (tl.maximum(fx - 1, 0) // FPB) * FPB, 0)
    else:
        e = (fx // FPB) * FPB
    return tl.where(fx >= NF, NF, e) * FT


@triton.jit
def _row_ranges(offs_q, L, L0, FT, NF, FPB, W, SINK, IFF: tl.constexpr, TF: tl.constexpr, KIND: tl.constexpr):
    """Visible keys of query rows offs_q (rows >= L act as row L - 1) are three disjoint ranges,
    A = [0, a1) (sink), B = [b0, b1) (window), C = [c0, c1) (own noisy block); returns range
    KIND (0, 1, 2) as (start, end) vectors, an empty range with equal bounds. One kind at a time
    keeps two vectors live, not six (register pressure at D = 128)."""
    q = tl.minimum(offs_q, L - 1)
    if TF:
        noisy = q >= L0
        s, e = _block_bounds(tl.where(noisy, q - L0, q), FT, NF, FPB, IFF)
        hi = tl.where(noisy, s, e)
    else:
        s, e = _block_bounds(q, FT, NF, FPB, IFF)
        hi = e
    if KIND == 2:
        if TF:
            return tl.where(noisy, L0 + s, 0), tl.where(noisy, L0 + e, 0)
        return tl.zeros_like(q), tl.zeros_like(q)
    lo = tl.maximum(e - W, 0)
    a1 = tl.minimum(SINK, hi)
    merged = lo <= a1  # sink and window touch: one range B = [0, hi)
    if KIND == 0:
        return tl.zeros_like(q), tl.where(merged, 0, a1)
    b0 = tl.where(merged, 0, lo)
    return b0, tl.maximum(hi, b0)


@triton.jit
def _col_ranges(offs_k, L, L0, FT, NF, FPB, W, SINK, IFF: tl.constexpr, TF: tl.constexpr):
    """Queries that see key columns offs_k (columns >= L act as L - 1): two disjoint ranges
    U = [u0, u1), V = [w0, w1), the exact inverse of `_row_ranges`."""
    k = tl.minimum(offs_k, L - 1)
    if TF:
        noisy = k >= L0
        t = tl.where(noisy, k - L0, k)
    else:
        t = k
    s, e = _block_bounds(t, FT, NF, FPB, IFF)
    hi = tl.where(t < SINK, L0, _last_end_le(t + W, FT, NF, FPB, IFF))  # last query seeing it, +1
    if TF:
        return (tl.where(noisy, L0 + s, s), tl.where(noisy, L0 + e, hi),
                tl.where(noisy, 0, L0 + e), tl.where(noisy, 0, L0 + hi))
    return s, hi, tl.zeros_like(k), tl.zeros_like(k)


@triton.jit
def _visit_range(TILE: tl.constexpr, state, args, x0, x1, VISITS, vrow, BLOCK: tl.constexpr, ROW: tl.constexpr,
                 HEAD_DIM: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, DEBUG: tl.constexpr):
    """`visit_tiles` over one range kind [x0, x1) of a tile's rows (vectors): the union over
    the rows with a nonempty range gives the tiles to visit, the intersection over all rows
    the tiles every row sees whole (unmasked)."""
    nonempty = x1 > x0
    u0 = tl.min(tl.where(nonempty, x0, BIG), 0)
    u1 = tl.max(tl.where(nonempty, x1, 0), 0)
    return visit_tiles(TILE, state, args, x0, x1, u0, tl.max(x0, 0), tl.min(x1, 0), u1, VISITS, vrow,
                       BLOCK, ROW, HEAD_DIM, DOT, PRECISION, DEBUG)


# One tile of each pass, as `visit_tiles` calls it.
@triton.jit
def _fwd_tile(state, args, start, x0, x1, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, ROW: tl.constexpr,
              HEAD_DIM: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over key tile `start`; state (m_i, l_i, acc)."""
    m_i, l_i, acc = state
    q, K, V, kv, L, offs_d, qk_scale = args
    offs_n = start + tl.arange(0, BLOCK_N)
    ptrs = kv + offs_n[:, None] * ROW + offs_d[None, :]
    if MASKED:
        mask = (offs_n[:, None] < L) & (offs_d[None, :] < HEAD_DIM)
    else:
        mask = offs_d[None, :] < HEAD_DIM
    k = tl.load(K + ptrs, mask=mask, other=0.0).to(DOT)
    v = tl.load(V + ptrs, mask=mask, other=0.0).to(DOT)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        s = tl.where((offs_n[None, :] >= x0[:, None]) & (offs_n[None, :] < x1[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new > float("-inf"), m_new, 0.0)  # a row with no key yet
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _dq_tile(dq, args, start, x0, x1, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, ROW: tl.constexpr,
             HEAD_DIM: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """dq += dS k over key tile `start`."""
    q, do, lse, delta, K, V, kv, L, offs_d, qk_scale = args
    offs_n = start + tl.arange(0, BLOCK_N)
    ptrs = kv + offs_n[:, None] * ROW + offs_d[None, :]
    if MASKED:
        mask = (offs_n[:, None] < L) & (offs_d[None, :] < HEAD_DIM)
    else:
        mask = offs_d[None, :] < HEAD_DIM
    k = tl.load(K + ptrs, mask=mask, other=0.0).to(DOT)
    v = tl.load(V + ptrs, mask=mask, other=0.0).to(DOT)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        s = tl.where((offs_n[None, :] >= x0[:, None]) & (offs_n[None, :] < x1[:, None]), s, float("-inf"))
    p = tl.math.exp2(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return dq + tl.dot((p * (dp - delta[:, None])).to(DOT), k, input_precision=PRECISION)


@triton.jit
def _dkdv_tile(state, args, start, x0, x1, MASKED: tl.constexpr, BLOCK_M: tl.constexpr, ROW: tl.constexpr,
               HEAD_DIM: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """dk += dS^T q, dv += P^T dO over query tile `start`; state (dk, dv)."""
    dk, dv = state
    k, v, Q, DO, LSE, DELTA, qb, stat, L, offs_d, qk_scale = args
    offs_m = start + tl.arange(0, BLOCK_M)
    ptrs = qb + offs_m[:, None] * ROW + offs_d[None, :]
    if MASKED:
        mask = (offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM)
        row_ok = offs_m < L
    else:
        mask = offs_d[None, :] < HEAD_DIM
        row_ok = offs_m >= 0
    q = tl.load(Q + ptrs, mask=mask, other=0.0).to(DOT)
    do = tl.load(DO + ptrs, mask=mask, other=0.0).to(DOT)
    lse = tl.load(LSE + stat + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + stat + offs_m, mask=row_ok, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
    if MASKED:
        s_t = tl.where((offs_m[None, :] >= x0[:, None]) & (offs_m[None, :] < x1[:, None]), s_t, float("-inf"))
    p_t = tl.math.exp2(s_t - lse[None, :])
    dv += tl.dot(p_t.to(DOT), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dk += tl.dot((p_t * (dp_t - delta[None, :])).to(DOT), q, input_precision=PRECISION)
    return dk, dv


# ----------------------------------------------------------------------------- autotune space
FWD_CONFIGS = autotune_configs([(64, 64), (128, 32), (128, 64), (128, 128)])
DQ_CONFIGS = autotune_configs([(64, 32), (64, 64), (128, 32), (128, 64)])
DKDV_CONFIGS = autotune_configs([(32, 64), (32, 128), (64, 64), (64, 128)])
_KEY = ["L", "L0", "FT", "NF", "FPB", "W", "SINK", "HEADS", "HEAD_DIM", "IFF", "TF"]
_NO_SPECIALIZE = ["L", "L0", "FT", "NF", "FPB", "W", "SINK"]  # a layout int of 1 stays an int


# ------------------------------------------------------------------------------------ kernels
# Layout arguments: L, L0 (context length), FT, NF (frames), FPB, W (window tokens), SINK (tokens).
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _fwd_kernel(Q, K, V, O, LSE, VISITS, L, L0, FT, NF, FPB, W, SINK, qk_scale,
                HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IFF: tl.constexpr,
                TF: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, DEBUG: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(L, BLOCK_M), B * N): O tile and its LSE (base 2) over the visible keys."""
    ROW: tl.constexpr = HEADS * HEAD_DIM
    off_b = (tl.program_id(1) // HEADS).to(tl.int64)
    off_n = tl.program_id(1) % HEADS
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    base = off_b * L * ROW + off_n * HEAD_DIM
    io_mask = (offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + base + offs_m[:, None] * ROW + offs_d[None, :], mask=io_mask, other=0.0).to(DOT)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    vrow = tl.program_id(0) * tl.cdiv(L, BLOCK_N)
    args = (q, K, V, base, L, offs_d, qk_scale)
    for kind in tl.static_range(3 if TF else 2):
        x0, x1 = _row_ranges(offs_m, L, L0, FT, NF, FPB, W, SINK, IFF, TF, kind)
        m_i, l_i, acc = _visit_range(_fwd_tile, (m_i, l_i, acc), args, x0, x1, VISITS, vrow,
                                     BLOCK_N, ROW, HEAD_DIM, DOT, PRECISION, DEBUG)
    # every valid row sees at least its own key, so l_i > 0 there
    tl.store(O + base + offs_m[:, None] * ROW + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty),
             mask=io_mask)
    tl.store(LSE + (off_b * HEADS + off_n) * L + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < L)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dq_kernel(Q, K, V, O, DO, DQ, LSE, DELTA, VISITS, L, L0, FT, NF, FPB, W, SINK, qk_scale, sm_scale,
                   HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IFF: tl.constexpr,
                   TF: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, DEBUG: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(L, BLOCK_M), B * N): D = rowsum(dO * O) to `delta`, then the dQ tile."""
    ROW: tl.constexpr = HEADS * HEAD_DIM
    off_b = (tl.program_id(1) // HEADS).to(tl.int64)
    off_n = tl.program_id(1) % HEADS
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    base = off_b * L * ROW + off_n * HEAD_DIM
    ptrs = base + offs_m[:, None] * ROW + offs_d[None, :]
    io_mask = (offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM)
    stat = (off_b * HEADS + off_n) * L
    q = tl.load(Q + ptrs, mask=io_mask, other=0.0).to(DOT)
    do = tl.load(DO + ptrs, mask=io_mask, other=0.0)
    delta = tl.sum(tl.load(O + ptrs, mask=io_mask, other=0.0).to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + stat + offs_m, delta, mask=offs_m < L)
    do = do.to(DOT)
    lse = tl.load(LSE + stat + offs_m, mask=offs_m < L, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    vrow = tl.program_id(0) * tl.cdiv(L, BLOCK_N)
    args = (q, do, lse, delta, K, V, base, L, offs_d, qk_scale)
    for kind in tl.static_range(3 if TF else 2):
        x0, x1 = _row_ranges(offs_m, L, L0, FT, NF, FPB, W, SINK, IFF, TF, kind)
        dq = _visit_range(_dq_tile, dq, args, x0, x1, VISITS, vrow, BLOCK_N, ROW, HEAD_DIM, DOT, PRECISION, DEBUG)
    tl.store(DQ + ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=io_mask)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, VISITS, L, L0, FT, NF, FPB, W, SINK, qk_scale, sm_scale,
                     HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IFF: tl.constexpr,
                     TF: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, DEBUG: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(L, BLOCK_N), B * N): dK, dV of one key tile over the query tiles that see it."""
    ROW: tl.constexpr = HEADS * HEAD_DIM
    off_b = (tl.program_id(1) // HEADS).to(tl.int64)
    off_n = tl.program_id(1) % HEADS
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    base = off_b * L * ROW + off_n * HEAD_DIM
    ptrs = base + offs_n[:, None] * ROW + offs_d[None, :]
    io_mask = (offs_n[:, None] < L) & (offs_d[None, :] < HEAD_DIM)
    stat = (off_b * HEADS + off_n) * L
    k = tl.load(K + ptrs, mask=io_mask, other=0.0).to(DOT)
    v = tl.load(V + ptrs, mask=io_mask, other=0.0).to(DOT)
    u0, u1, w0, w1 = _col_ranges(offs_n, L, L0, FT, NF, FPB, W, SINK, IFF, TF)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    vrow = tl.program_id(0) * tl.cdiv(L, BLOCK_M)
    args = (k, v, Q, DO, LSE, DELTA, base, stat, L, offs_d, qk_scale)
    dk, dv = _visit_range(_dkdv_tile, (dk, dv), args, u0, u1, VISITS, vrow, BLOCK_M, ROW, HEAD_DIM, DOT, PRECISION,
                          DEBUG)
    if TF:
        dk, dv = _visit_range(_dkdv_tile, (dk, dv), args, w0, w1, VISITS, vrow, BLOCK_M, ROW, HEAD_DIM, DOT,
                              PRECISION, DEBUG)
    tl.store(DK + ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=io_mask)
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=io_mask)


# live fp32 tiles per program: fwd acc | s; dq dq | p, dp; dkdv dk, dv | p, dp
_fwd_tuned = autotuned(_fwd_kernel, FWD_CONFIGS, _KEY, rows="BLOCK_M", accumulators=1, scores=1,
                       name="bc_fwd")
_bwd_dq_tuned = autotuned(_bwd_dq_kernel, DQ_CONFIGS, _KEY, rows="BLOCK_M", accumulators=1, scores=2,
                          name="bc_bwd_dq")
_bwd_dkdv_tuned = autotuned(_bwd_dkdv_kernel, DKDV_CONFIGS, _KEY, rows="BLOCK_N", accumulators=2, scores=2,
                            name="bc_bwd_dkdv")


# ----------------------------------------------------------------------------------- launcher
def _launch(raw, tuned, grid, args, consts, blocks: Optional[dict] = None):
    """`tuned` with grid(meta) on a GPU; `raw` with fixed blocks (the interpreter's, or `blocks`)."""
    launch(raw, tuned, grid, args, consts, INTERPRET_BLOCKS, blocks)


def _constants(q: torch.Tensor, layout: BlockCausalLayout, debug: bool) -> dict:
    return dict(HEADS=q.shape[2], IFF=layout.independent_first_frame, TF=layout.teacher_forcing, DEBUG=debug,
                **tile_constants(q.dtype, q.shape[-1], interpreting(_fwd_kernel)))


class _BlockCausalAttention(torch.autograd.Function):
    """q, k, v: contiguous [B, L, N, D], one dtype. Saves q, k, v, O and LSE [B, N, L] fp32."""

    @staticmethod
    def forward(ctx, q, k, v, layout):
        b, length, n, d = q.shape
        out = torch.empty_like(q)
        lse = torch.empty(b, n, length, device=q.device, dtype=torch.float32)
        _launch(_fwd_kernel, _fwd_tuned, lambda m: (triton.cdiv(length, m["BLOCK_M"]), b * n),
                [q, k, v, out, lse, lse, length, *layout.kernel_args(), d ** -0.5 * LOG2E],
                _constants(q, layout, False))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout = layout
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        layout = ctx.layout
        b, length, n, d = q.shape
        do = do.contiguous().to(q.dtype)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        delta = torch.empty_like(lse)  # written by the dQ kernel, read by the dK/dV kernel
        consts = _constants(q, layout, False)
        scales = [d ** -0.5 * LOG2E, d ** -0.5]
        _launch(_bwd_dq_kernel, _bwd_dq_tuned, lambda m: (triton.cdiv(length, m["BLOCK_M"]), b * n),
                [q, k, v, out, do, dq, lse, delta, lse, length, *layout.kernel_args(), *scales], consts)
        _launch(_bwd_dkdv_kernel, _bwd_dkdv_tuned, lambda m: (triton.cdiv(length, m["BLOCK_N"]), b * n),
                [q, k, v, do, dk, dv, lse, delta, lse, length, *layout.kernel_args(), *scales], consts)
        return dq, dk, dv, None


# ------------------------------------------------------------------------------- public entry
def _check(q, k, v, layout: BlockCausalLayout) -> torch.dtype:
    dtype = v.dtype
    check_dtype("block_causal_attention", dtype)
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be [B, L, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[1] != layout.seq_len:
        raise ValueError(f"sequence length {q.shape[1]} != layout.seq_len {layout.seq_len} ({layout})")
    return dtype


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           layout: BlockCausalLayout) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask(layout)) v with the mask never built, fully masked tiles
    skipped. q, k, v: [B, L, N, D], L = layout.seq_len; computes in v's dtype (fp16, bf16, fp32),
    returns [B, L, N, D] in it. Differentiable in q, k and v."""
    dtype = _check(q, k, v, layout)
    if q.numel() == 0:
        return block_causal_attention_ref(q.to(dtype), k.to(dtype), v)
    return _BlockCausalAttention.apply(q.to(dtype).contiguous(), k.to(dtype).contiguous(), v.contiguous(), layout)


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   layout: Optional[BlockCausalLayout] = None) -> torch.Tensor:
    """The model's self-attention entry point: block-causal under `layout`, full (one block
    spanning all L tokens) without one. [B, L, N, D] in, [B, L, N, D] out."""
    if layout is None:
        layout = BlockCausalLayout(frame_tokens=max(q.shape[1], 1), num_frames=1, frames_per_block=1)
    return block_causal_attention(q, k, v, layout)


def tile_visits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockCausalLayout,
                block_m: int = 16, block_n: int = 16) -> dict[str, torch.Tensor]:
    """Debug/test helper: which tiles each kernel visits, with fixed tile sizes. Returns
    {"fwd", "dq": [q tiles, k tiles], "dkdv": [k tiles, q tiles]} int tensors summed over B * N
    programs: masked visits count 1, fast-path (unmasked) visits 256."""
    dtype = _check(q, k, v, layout)
    q, k, v = (t.to(dtype).contiguous() for t in (q, k, v))
    b, length, n, d = q.shape
    tq, tk = triton.cdiv(length, block_m), triton.cdiv(length, block_n)
    blocks = dict(BLOCK_M=block_m, BLOCK_N=block_n)
    consts = _constants(q, layout, True)
    scales = [d ** -0.5 * LOG2E, d ** -0.5]
    visits = {name: torch.zeros(*shape, dtype=torch.int32, device=q.device)
              for name, shape in (("fwd", (tq, tk)), ("dq", (tq, tk)), ("dkdv", (tk, tq)))}
    out, lse = torch.empty_like(q), torch.empty(b, n, length, device=q.device, dtype=torch.float32)
    grid_q, grid_k = (lambda m: (tq, b * n)), (lambda m: (tk, b * n))
    _launch(_fwd_kernel, None, grid_q, [q, k, v, out, lse, visits["fwd"], length, *layout.kernel_args(),
                                        scales[0]], consts, blocks)
    do, delta = torch.ones_like(q), torch.empty_like(lse)
    _launch(_bwd_dq_kernel, None, grid_q, [q, k, v, out, do, torch.empty_like(q), lse, delta, visits["dq"], length,
                                           *layout.kernel_args(), *scales], consts, blocks)
    _launch(_bwd_dkdv_kernel, None, grid_k, [q, k, v, do, torch.empty_like(k), torch.empty_like(v), lse, delta,
                                             visits["dkdv"], length, *layout.kernel_args(), *scales], consts, blocks)
    return visits
