"""Fused multi-path cross-attention (Wan's cross-attention with reference paths), Triton.

Shapes: B batch, Lq query tokens, N heads, D head dim, S paths (1..MAX_PATHS), Lk_s keys of
path s, len_s[b] <= Lk_s its valid keys for sample b. q: [B, Lq, N, D]; k_s, v_s: [B, Lk_s, N, D].

Forward, each path with its OWN softmax (not attention over the concatenated keys):

    P_s = softmax(q k_s^T / sqrt(D))          keys j >= len_s[b] masked; len_s[b] = 0 -> P_s = 0
    O_s = P_s v_s
    O   = sum_s O_s

One program owns a query tile of one (b, n): it loads the tile once, runs an online softmax per
path (base 2: scores scaled by log2(e)/sqrt(D), exp2; fp32 m, l, acc), adds acc / l into one fp32
output accumulator and writes O once. Per path it stores LSE_s = m_s + log2(l_s) (base 2; +inf
for an empty row) into `lse` [B, N, S, Lq].

Backward, with dO shared by every path (dS: gradient of the scaled scores):

    dV_s = P_s^T dO                      dP_s = dO v_s^T
    D_s  = rowsum(dO * O_s) = rowsum(P_s * dP_s)
    dS_s = P_s * (dP_s - D_s)
    dQ   = sum_s dS_s k_s / sqrt(D)      dK_s = dS_s^T q / sqrt(D)

D_s needs each path's own O_s, not the sum O. We RECOMPUTE O_s instead of storing it: the dQ
kernel (one program per query tile, all paths) first sweeps path s's keys once with the stored
LSE_s (p = exp2(s - LSE_s), no running max) to rebuild O_s in fp32 and take D_s, writes D_s to
`delta` [B, N, S, Lq] for the dK/dV kernel, then sweeps the keys again for dQ. Why: storing
every O_s costs S extra output-sized tensors per layer (about 100 MB each for Wan 1.3B at
Lq = 32760, 335 MB for 14B, times every layer kept for backward) and S extra output writes in
the forward, which eats most of what fusing the forward saves. The recompute costs two extra
tile matmuls (QK^T, PV) per (query tile, key tile) pair, on keys that are L2-resident
(Lk_s <= 1817): 9 backward matmuls where the tutorial's layout has 7 (dK/dV kernel: QK^T,
P^T dO, dO V^T, dS^T q; dQ kernel: QK^T, dO V^T, dS k), and no extra HBM traffic. We rejected the
one-sweep identity dQ_s = ((P*dP) k - D_s (P k)) / sqrt(D): it saves one matmul but subtracts
two large terms after rounding P*dP to bf16, which loses dQ precision when values share a common
component. dK_s/dV_s: one program per (key tile, path, b, n), looping over all queries; no
atomics, so the backward is deterministic.

Precision: fp32 accumulation everywhere; P and dS are rounded to the input dtype before their
matmuls (as flash attention does); fp32 inputs use IEEE fp32 dots (no TF32: exact but slow on
a GPU, where they spill registers at D=128; bf16/fp16 is the fast path). Under the Triton
interpreter (CPU tests) bf16 `tl.dot` is broken, so bf16 operands are upcast to fp32 there.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from kernels.attention_types import KVPath
from kernels.multi_path_reference import multi_path_attention_ref
from kernels.triton_common import LOG2E, autotune_configs, autotuned, check_dtype, interpreting, launch, tile_constants

MAX_PATHS = 4                        # key/value sets one launch handles (text, CLIP, VAE, fused)
# Under the interpreter autotuning is slow and timings meaningless: one small config, whose
# tiles are small enough that test lengths (37, 59, 130) span several tiles and a ragged tail.
INTERPRET_BLOCKS = dict(BLOCK_M=32, BLOCK_N=32)


# ------------------------------------------------------------------------------------ helpers
# Each call of a jit helper costs ~1 ms in the interpreter, so loop bodies are written inline and
# helpers run once per path or per program. Tiles: rows offs_l of one head of a contiguous
# [*, L, N, D] tensor sit at base + l * ROW + d (ROW = N * D); BLOCK_D >= D columns are masked.
# DOT is the dtype fed to tl.dot: the input dtype, or fp32 for bf16 under the interpreter.
@triton.jit
def _load_rows(base, offs_l, n_valid, offs_d, ROW: tl.constexpr, HEAD_DIM: tl.constexpr, DOT: tl.constexpr):
    """Rows offs_l (< n_valid, else 0) -> [len(offs_l), BLOCK_D] in the DOT dtype."""
    mask = (offs_l[:, None] < n_valid) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(base + offs_l[:, None] * ROW + offs_d[None, :], mask=mask, other=0.0).to(DOT)


@triton.jit
def _store_rows(base, value, offs_l, n_valid, offs_d, ROW: tl.constexpr, HEAD_DIM: tl.constexpr):
    mask = (offs_l[:, None] < n_valid) & (offs_d[None, :] < HEAD_DIM)
    tl.store(base + offs_l[:, None] * ROW + offs_d[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _path(s, K0, V0, LENS0, LK0, K1, V1, LENS1, LK1, K2, V2, LENS2, LK2, K3, V3, LENS3, LK3,
          NUM_PATHS: tl.constexpr):
    """(K, V, LENS, LK) of path s (s constexpr in a static loop, or a program id)."""
    K, V, LENS, LK = K0, V0, LENS0, LK0
    if NUM_PATHS > 1:
        if s == 1:
            K, V, LENS, LK = K1, V1, LENS1, LK1
    if NUM_PATHS > 2:
        if s == 2:
            K, V, LENS, LK = K2, V2, LENS2, LK2
    if NUM_PATHS > 3:
        if s == 3:
            K, V, LENS, LK = K3, V3, LENS3, LK3
    return K, V, LENS, LK


@triton.jit
def _fwd_path(q, K, V, kv, length, offs_d, qk_scale,
              ROW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """One path's online softmax for a query tile -> (O_s [BLOCK_M, BLOCK_D] fp32, LSE_s [BLOCK_M])."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Only tiles holding a valid key are visited, so m_i is finite after the first one and an
    # empty path (length 0) runs no iteration at all: no -inf - -inf anywhere.
    for start in range(0, length, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        ptrs = kv + offs_n[:, None] * ROW + offs_d[None, :]
        mask = (offs_n[:, None] < length) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(K + ptrs, mask=mask, other=0.0).to(DOT)
        v = tl.load(V + ptrs, mask=mask, other=0.0).to(DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(offs_n[None, :] < length, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=PRECISION)
        m_i = m_new
    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.math.log2(tl.where(nonempty, l_i, 1.0)), float("inf"))
    return out, lse


@triton.jit
def _dq_path(dq, q, do, K, V, kv, length, LSE, DELTA, offs_m, Lq, offs_d, qk_scale,
             ROW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """dq [BLOCK_M, BLOCK_D] + this path's dS k (unscaled); writes D_s = rowsum(dO * O_s)."""
    lse = tl.load(LSE + offs_m, mask=offs_m < Lq, other=0.0)
    o_s = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, length, BLOCK_N):  # sweep 1: rebuild O_s from the stored LSE_s
        offs_n = start + tl.arange(0, BLOCK_N)
        ptrs = kv + offs_n[:, None] * ROW + offs_d[None, :]
        mask = (offs_n[:, None] < length) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(K + ptrs, mask=mask, other=0.0).to(DOT)
        v = tl.load(V + ptrs, mask=mask, other=0.0).to(DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(tl.where(offs_n[None, :] < length, s, float("-inf")) - lse[:, None])
        o_s += tl.dot(p.to(DOT), v, input_precision=PRECISION)
    delta = tl.sum(o_s * do.to(tl.float32), 1)
    tl.store(DELTA + offs_m, delta, mask=offs_m < Lq)
    for start in range(0, length, BLOCK_N):  # sweep 2: dS = P * (dP - D_s), dq += dS k
        offs_n = start + tl.arange(0, BLOCK_N)
        ptrs = kv + offs_n[:, None] * ROW + offs_d[None, :]
        mask = (offs_n[:, None] < length) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(K + ptrs, mask=mask, other=0.0).to(DOT)
        v = tl.load(V + ptrs, mask=mask, other=0.0).to(DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(tl.where(offs_n[None, :] < length, s, float("-inf")) - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        dq += tl.dot((p * (dp - delta[:, None])).to(DOT), k, input_precision=PRECISION)
    return dq


# ----------------------------------------------------------------------------- autotune space
FWD_CONFIGS = autotune_configs([(64, 32), (64, 64), (128, 32), (128, 64), (128, 128)])
DQ_CONFIGS = autotune_configs([(32, 64), (64, 32), (64, 64), (128, 32), (128, 64)])
DKDV_CONFIGS = autotune_configs([(32, 64), (64, 64), (32, 128), (64, 128), (16, 128)])


_KEY = ["Lq", "LK0", "LK1", "LK2", "LK3", "HEADS", "HEAD_DIM", "NUM_PATHS"]
_NO_SPECIALIZE = ["Lq", "LK0", "LK1", "LK2", "LK3"]  # a length of 1 must stay an int32 argument


# ------------------------------------------------------------------------------------ kernels
# Per-path arguments: K_s, V_s ([B, Lk_s, N, D] contiguous), LENS_s ([B] int32, <= Lk_s), LK_s.
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _fwd_kernel(Q, O, LSE,
                K0, V0, LENS0, LK0, K1, V1, LENS1, LK1, K2, V2, LENS2, LK2, K3, V3, LENS3, LK3,
                Lq, qk_scale,
                HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_PATHS: tl.constexpr,
                DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(Lq, BLOCK_M), B * N): O tile = sum over paths of that path's softmax attention."""
    ROW: tl.constexpr = HEADS * HEAD_DIM
    off_b = (tl.program_id(1) // HEADS).to(tl.int64)
    off_n = tl.program_id(1) % HEADS
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = off_b * Lq * ROW + off_n * HEAD_DIM
    stat = LSE + (off_b * HEADS + off_n) * NUM_PATHS * Lq  # this (b, n)'s [S, Lq] rows
    q = _load_rows(Q + q_base, offs_m, Lq, offs_d, ROW, HEAD_DIM, DOT)
    out = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in tl.static_range(NUM_PATHS):
        K, V, LENS, LK = _path(s, K0, V0, LENS0, LK0, K1, V1, LENS1, LK1, K2, V2, LENS2, LK2,
                               K3, V3, LENS3, LK3, NUM_PATHS)
        o_s, lse = _fwd_path(q, K, V, off_b * LK * ROW + off_n * HEAD_DIM, tl.load(LENS + off_b), offs_d,
                             qk_scale, ROW, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, DOT, PRECISION)
        out += o_s
        tl.store(stat + s * Lq + offs_m, lse, mask=offs_m < Lq)
    _store_rows(O + q_base, out, offs_m, Lq, offs_d, ROW, HEAD_DIM)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dq_kernel(Q, DO, DQ, LSE, DELTA,
                   K0, V0, LENS0, LK0, K1, V1, LENS1, LK1, K2, V2, LENS2, LK2, K3, V3, LENS3, LK3,
                   Lq, qk_scale, sm_scale,
                   HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_PATHS: tl.constexpr,
                   DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(Lq, BLOCK_M), B * N): dQ tile summed over every path; writes D_s per path."""
    ROW: tl.constexpr = HEADS * HEAD_DIM
    off_b = (tl.program_id(1) // HEADS).to(tl.int64)
    off_n = tl.program_id(1) % HEADS
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = off_b * Lq * ROW + off_n * HEAD_DIM
    stat = (off_b * HEADS + off_n) * NUM_PATHS * Lq
    q = _load_rows(Q + q_base, offs_m, Lq, offs_d, ROW, HEAD_DIM, DOT)
    do = _load_rows(DO + q_base, offs_m, Lq, offs_d, ROW, HEAD_DIM, DOT)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in tl.static_range(NUM_PATHS):
        K, V, LENS, LK = _path(s, K0, V0, LENS0, LK0, K1, V1, LENS1, LK1, K2, V2, LENS2, LK2,
                               K3, V3, LENS3, LK3, NUM_PATHS)
        dq = _dq_path(dq, q, do, K, V, off_b * LK * ROW + off_n * HEAD_DIM, tl.load(LENS + off_b),
                      LSE + stat + s * Lq, DELTA + stat + s * Lq, offs_m, Lq, offs_d, qk_scale,
                      ROW, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, DOT, PRECISION)
    _store_rows(DQ + q_base, dq * sm_scale, offs_m, Lq, offs_d, ROW, HEAD_DIM)


@triton.jit(do_not_specialize=_NO_SPECIALIZE + ["GRAD_PATHS"])
def _bwd_dkdv_kernel(Q, DO, LSE, DELTA, DK, DV,
                     K0, V0, LENS0, LK0, K1, V1, LENS1, LK1, K2, V2, LENS2, LK2, K3, V3, LENS3, LK3,
                     Lq, qk_scale, sm_scale, GRAD_PATHS,
                     HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_PATHS: tl.constexpr,
                     DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(max_s Lk_s, BLOCK_N), B * N, S): dK_s, dV_s of one key tile of path s, summed
    over every query. DK, DV: every path's [B, Lk_s, N, D] gradients back to back, path s at
    offset B * (Lk_0 + .. + Lk_{s-1}) * N * D. Keys past the sample's length get exact zeros;
    a path whose bit in GRAD_PATHS is 0 (its k_s, v_s need no gradient) is skipped."""
    ROW: tl.constexpr = HEADS * HEAD_DIM
    s = tl.program_id(2)
    K, V, LENS, LK = _path(s, K0, V0, LENS0, LK0, K1, V1, LENS1, LK1, K2, V2, LENS2, LK2,
                           K3, V3, LENS3, LK3, NUM_PATHS)
    keys_before = (tl.where(s > 0, LK0, 0) + tl.where(s > 1, LK1, 0) + tl.where(s > 2, LK2, 0)).to(tl.int64)
    n_batch = tl.num_programs(1) // HEADS
    off_b = (tl.program_id(1) // HEADS).to(tl.int64)
    off_n = tl.program_id(1) % HEADS
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    length = tl.load(LENS + off_b)
    kv = off_b * LK * ROW + off_n * HEAD_DIM
    q_base = off_b * Lq * ROW + off_n * HEAD_DIM
    stat = ((off_b * HEADS + off_n) * NUM_PATHS + s) * Lq
    k = _load_rows(K + kv, offs_n, length, offs_d, ROW, HEAD_DIM, DOT)
    v = _load_rows(V + kv, offs_n, length, offs_d, ROW, HEAD_DIM, DOT)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    wanted = ((GRAD_PATHS >> s) & 1) == 1
    n_queries = tl.where(wanted & (tl.program_id(0) * BLOCK_N < length), Lq, 0)  # 0: nothing to sum
    for start in range(0, n_queries, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        ptrs = q_base + offs_m[:, None] * ROW + offs_d[None, :]
        mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(Q + ptrs, mask=mask, other=0.0).to(DOT)
        do = tl.load(DO + ptrs, mask=mask, other=0.0).to(DOT)
        lse = tl.load(LSE + stat + offs_m, mask=offs_m < Lq, other=0.0)
        delta = tl.load(DELTA + stat + offs_m, mask=offs_m < Lq, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        valid = (offs_n[:, None] < length) & (offs_m[None, :] < Lq)
        p_t = tl.where(valid, tl.math.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(DOT), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dk += tl.dot((p_t * (dp_t - delta[None, :])).to(DOT), q, input_precision=PRECISION)
    grad_base = keys_before * n_batch * ROW + kv
    n_rows = tl.where(wanted, LK, 0)
    _store_rows(DK + grad_base, dk * sm_scale, offs_n, n_rows, offs_d, ROW, HEAD_DIM)
    _store_rows(DV + grad_base, dv, offs_n, n_rows, offs_d, ROW, HEAD_DIM)


# live fp32 tiles per program: fwd acc, out | s; dq dq, O_s | p, dp; dkdv dk, dv | p, dp
_fwd_tuned = autotuned(_fwd_kernel, FWD_CONFIGS, _KEY, rows="BLOCK_M", accumulators=2, scores=1,
                       name="fca_fwd")
_bwd_dq_tuned = autotuned(_bwd_dq_kernel, DQ_CONFIGS, _KEY, rows="BLOCK_M", accumulators=2, scores=2,
                          name="fca_bwd_dq")
_bwd_dkdv_tuned = autotuned(_bwd_dkdv_kernel, DKDV_CONFIGS, _KEY, rows="BLOCK_N", accumulators=2, scores=2,
                            name="fca_bwd_dkdv")


# ----------------------------------------------------------------------------------- launcher
def _launch(raw, tuned, grid, args, consts):
    """Run `tuned` with grid(meta) on a GPU; `raw` with the fixed interpreter blocks on CPU."""
    launch(raw, tuned, grid, args, consts, INTERPRET_BLOCKS)


def _path_args(ks, vs, lens) -> list:
    """K_s, V_s, LENS_s, LK_s for s < MAX_PATHS; unused slots repeat path 0 with LK_s = 0."""
    args = []
    for s in range(MAX_PATHS):
        i = s if s < len(ks) else 0
        args += [ks[i], vs[i], lens[i], ks[i].shape[1] if s < len(ks) else 0]
    return args


def _constants(q: torch.Tensor, num_paths: int) -> dict:
    """Compile-time arguments shared by the three kernels."""
    return dict(HEADS=q.shape[2], NUM_PATHS=num_paths,
                **tile_constants(q.dtype, q.shape[-1], interpreting(_fwd_kernel)))


class _FusedCrossAttention(torch.autograd.Function):
    """Inputs: q, then (k_s, v_s, lens_s) per path; contiguous, one dtype; lens_s int32 [B] <= Lk_s.
    Saves q, k_s, v_s and the per-path LSE [B, N, S, Lq] fp32 (not the output, not O_s)."""

    @staticmethod
    def forward(ctx, q, *flat):
        ks, vs, lens = flat[0::3], flat[1::3], flat[2::3]
        b, lq, n, d = q.shape
        out = torch.empty_like(q)
        lse = torch.empty(b, n, len(ks), lq, device=q.device, dtype=torch.float32)
        _launch(_fwd_kernel, _fwd_tuned, lambda m: (triton.cdiv(lq, m["BLOCK_M"]), b * n),
                [q, out, lse, *_path_args(ks, vs, lens), lq, d ** -0.5 * LOG2E], _constants(q, len(ks)))
        ctx.save_for_backward(q, lse, *flat)
        return out

    @staticmethod
    def backward(ctx, do):
        q, lse, *flat = ctx.saved_tensors
        ks, vs, lens = flat[0::3], flat[1::3], flat[2::3]
        b, lq, n, d = q.shape
        consts = _constants(q, len(ks))
        do = do.contiguous().to(q.dtype)
        dq = torch.empty_like(q)
        delta = torch.empty_like(lse)  # D_s [B, N, S, Lq], written by the dQ kernel
        sizes = [k.numel() for k in ks]
        dk_all = q.new_empty(sum(sizes))  # every path's dK_s back to back, then views
        dv_all = q.new_empty(sum(sizes))
        scales = [lq, d ** -0.5 * LOG2E, d ** -0.5]
        path_args = _path_args(ks, vs, lens)
        # paths whose k and v need no gradient (a frozen text path) skip the dK/dV work
        wanted = [ctx.needs_input_grad[1 + 3 * s] or ctx.needs_input_grad[2 + 3 * s] for s in range(len(ks))]
        _launch(_bwd_dq_kernel, _bwd_dq_tuned, lambda m: (triton.cdiv(lq, m["BLOCK_M"]), b * n),
                [q, do, dq, lse, delta, *path_args, *scales], consts)
        max_lk = max(k.shape[1] for k in ks)
        if max_lk > 0 and any(wanted):
            grad_paths = sum(1 << s for s, w in enumerate(wanted) if w)
            _launch(_bwd_dkdv_kernel, _bwd_dkdv_tuned,
                    lambda m: (triton.cdiv(max_lk, m["BLOCK_N"]), b * n, len(ks)),
                    [q, do, lse, delta, dk_all, dv_all, *path_args, *scales, grad_paths], consts)
        grads = [dq if ctx.needs_input_grad[0] else None]
        for k, dk, dv, w in zip(ks, dk_all.split(sizes), dv_all.split(sizes), wanted):
            grads += [dk.view_as(k) if w else None, dv.view_as(k) if w else None, None]
        return tuple(grads)


# ------------------------------------------------------------------------------- public entry
def fused_cross_attention(q: torch.Tensor, paths: Sequence[KVPath]) -> torch.Tensor:
    """sum_s softmax(q k_s^T / sqrt(D)) v_s, each path its own softmax, in one Triton launch.

    q: [B, Lq, N, D]; paths: 1..MAX_PATHS `KVPath(k [B, Lk_s, N, D], v [B, Lk_s, N, D], lens)`,
    lens an optional [B] int of valid keys per sample (a 0 makes that path add exactly 0).
    Computes in path 0's value dtype (fp16, bf16 or fp32), as the sdpa backend does; returns
    [B, Lq, N, D] in that dtype. Differentiable in q, every k_s and v_s.
    """
    if not 1 <= len(paths) <= MAX_PATHS:
        raise ValueError(f"fused_cross_attention takes 1..{MAX_PATHS} paths, got {len(paths)}")
    dtype = paths[0].v.dtype
    check_dtype("fused_cross_attention", dtype)
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Lq, N, D], got shape {tuple(q.shape)}")
    b, _, n, d = q.shape
    flat = []
    for i, p in enumerate(paths):
        if p.k.dim() != 4 or p.k.shape != p.v.shape or (p.k.shape[0], p.k.shape[2], p.k.shape[3]) != (b, n, d):
            raise ValueError(f"path {i}: k {tuple(p.k.shape)} and v {tuple(p.v.shape)} must both be "
                             f"[B={b}, Lk, N={n}, D={d}]")
        lk = p.k.shape[1]
        lens = (torch.full((b,), lk, device=q.device, dtype=torch.int32) if p.lens is None
                else p.lens.to(device=q.device, dtype=torch.int32).clamp(0, lk))
        flat += [p.k.to(dtype).contiguous(), p.v.to(dtype).contiguous(), lens.contiguous()]
    if q.numel() == 0:  # nothing to launch (an empty grid); the reference handles it, with grads
        return fused_cross_attention_ref(q.to(dtype), [KVPath(*flat[i:i + 3]) for i in range(0, len(flat), 3)])
    return _FusedCrossAttention.apply(q.to(dtype).contiguous(), *flat)


def fused_cross_attention_ref(q: torch.Tensor, paths: Sequence[KVPath]) -> torch.Tensor:
    """Plain-PyTorch reference with an explicit softmax per path, any dtype (float64 in tests).

    q: [B, Lq, N, D]; paths as in `fused_cross_attention`; returns [B, Lq, N, D] in q's dtype.
    """
    return multi_path_attention_ref(q, paths)
