"""Fused qk-RMSNorm + 3D RoPE (the ninja-built extension) against Wan2.1's official formulation.

The extension is built once per session by the module fixture (~20 s cold; ninja finds it up to
date afterwards). Float64 parity is checked against the official code written out below; low
precision follows the ratio rule: our error against the float64 truth is at most 2x (forward) /
3x (backward) the error of the plain-PyTorch reference run in the same precision, + 1e-5.
"""
import logging

import pytest
import torch

from kernels import qk_norm_rope as qnr
from kernels.bench.qk_norm_rope import official_freqs, official_rope_apply
from kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref
from model.layers import WanRMSNorm, rope_apply, rope_table
from tests.kernels.tolerance import FP32_ELEMENTWISE, FP64_EXACT, FP64_GRADS, assert_ratio_rule, max_error

EPS = 1e-6
# (head dim, heads, grid, padding tokens past the table): Wan's 128 (22/21/21 pairs), a tiny 32
# (6/5/5) and 10 (3/1/1 pairs)
CASES = [(128, 2, (2, 3, 4), 5), (32, 3, (3, 2, 5), 0), (10, 4, (2, 3, 3), 2)]


# ---- Wan2.1's official formulation (wan/modules/model.py), shared with the benchmark ---------------
def official(x, weight, grid, num_heads):
    """`rope_apply(norm_q(x).view(b, s, n, d), grid_sizes, freqs)`. WanRMSNorm computes in
    `x.float()`; a float64 x stays float64 here (upstream's `.float()` would round it)."""
    y = x if x.dtype == torch.float64 else x.float()
    normed = (y * torch.rsqrt(y.pow(2).mean(dim=-1, keepdim=True) + EPS)).type_as(x) * weight
    grid_sizes = torch.tensor([grid] * x.shape[0])
    return official_rope_apply(normed.unflatten(-1, (num_heads, -1)), grid_sizes,
                               official_freqs(x.shape[-1] // num_heads), keep_float64=True)


# ---- helpers -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ext():
    try:
        module = qnr.build()
    except Exception as exc:  # CI has g++ and ninja: a build failure is a failure
        pytest.fail(f"the qk_norm_rope extension must build here: {exc}")
    assert qnr.extension_status().startswith("qk_norm_rope extension loaded")
    return module


def _inputs(head_dim, heads, grid, pad, dtype=torch.float64, batch=2):
    tokens = grid[0] * grid[1] * grid[2] + pad
    x = torch.randn(batch, tokens, heads * head_dim, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (1 + 0.2 * torch.randn(heads * head_dim, dtype=torch.float64)).to(dtype).requires_grad_()
    return x, weight, *rope_table(head_dim, grid)


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = g.to(out.device, out.dtype)
    return torch.autograd.grad(out, inputs, g)


# ---- float64 parity with the official formulation ------------------------------------------------------
@pytest.mark.parametrize("head_dim,heads,grid,pad", CASES)
def test_forward_and_grads_match_official_in_float64(ext, head_dim, heads, grid, pad):
    x, weight, cos, sin = _inputs(head_dim, heads, grid, pad)
    ours = qk_norm_rope(x, weight, cos, sin, heads, EPS)
    want = official(x, weight, grid, heads)
    assert ours.shape == (2, x.shape[1], heads, head_dim) and ours.dtype == torch.float64
    torch.testing.assert_close(ours, want, **FP64_EXACT)
    for got, expected in zip(_grads(ours, (x, weight)), _grads(want, (x, weight))):
        torch.testing.assert_close(got, expected, **FP64_GRADS)


def test_gradcheck_float64(ext):
    x, weight, cos, sin = _inputs(6, 2, (1, 2, 2), 1)  # 3 pairs per head (1/1/1), one padding token
    assert torch.autograd.gradcheck(lambda a, w: qk_norm_rope(a, w, cos, sin, 2, EPS), (x, weight))


def test_raw_op_returns_rstd(ext):
    x, weight, cos, sin = _inputs(32, 3, (3, 2, 5), 0)
    out, rstd = ext.qk_norm_rope_forward(x.detach(), weight.detach(), cos, sin, 3, EPS)
    torch.testing.assert_close(rstd, torch.rsqrt(x.detach().pow(2).mean(-1) + EPS), **FP64_EXACT)
    grad_x, grad_weight = ext.qk_norm_rope_backward(torch.ones_like(out), x.detach(), weight.detach(), cos, sin,
                                                    rstd, 3, False)
    assert grad_x.shape == x.shape and grad_weight is None


# ---- the model's formulation and low precision -----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_model_formulation(dtype):
    x, weight, cos, sin = _inputs(32, 3, (3, 2, 5), 3, dtype)
    norm = WanRMSNorm(x.shape[-1], EPS).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    model = rope_apply(norm(x).unflatten(-1, (3, -1)), cos, sin)
    assert torch.equal(qk_norm_rope_ref(x, weight, cos, sin, 3, EPS), model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim,heads,grid,pad", [CASES[0], CASES[2]])
def test_low_precision_error_ratio(ext, dtype, head_dim, heads, grid, pad):
    x, weight, cos, sin = _inputs(head_dim, heads, grid, pad, dtype)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, weight))
    truth = qk_norm_rope_ref(x64, w64, cos, sin, heads, EPS)
    ours = qk_norm_rope(x, weight, cos, sin, heads, EPS)
    ref = qk_norm_rope_ref(x, weight, cos, sin, heads, EPS)
    assert ours.dtype == ref.dtype == torch.float32
    assert_ratio_rule(ours, ref, truth, False, "out")
    for got, plain, true in zip(_grads(ours, (x, weight)), _grads(ref, (x, weight)), _grads(truth, (x64, w64))):
        assert got.dtype == dtype
        assert_ratio_rule(got, plain, true, True, "grad")


def test_tokens_past_the_table_pass_through(ext):
    x, weight, cos, sin = _inputs(32, 3, (1, 2, 3), 4)  # 6 rotated tokens, 4 past the table
    x, weight = x.detach(), weight.detach()
    out = qk_norm_rope(x, weight, cos, sin, 3, EPS)
    normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight).unflatten(-1, (3, -1))
    torch.testing.assert_close(out[:, 6:], normed[:, 6:], **FP64_EXACT)
    assert max_error(out[:, 1:6], normed[:, 1:6]) > 1e-3  # token 0 has angle 0; the others rotate
    torch.testing.assert_close(qk_norm_rope(x, weight, cos[:0], sin[:0], 3, EPS), normed, **FP64_EXACT)
    longer = rope_table(32, (2, 2, 3))  # a table longer than the sequence: its first L rows count
    torch.testing.assert_close(qk_norm_rope(x, weight, *longer, 3, EPS),
                               qk_norm_rope_ref(x, weight, *(t[:10] for t in longer), 3, EPS), **FP64_EXACT)


def test_strided_input_and_misaligned_weight(ext):
    heads, head_dim = 2, 32
    dim = heads * head_dim
    qkv = torch.randn(2, 9, 3 * dim, dtype=torch.float32)
    x = qkv[..., dim:2 * dim]  # k of a fused projection: a strided view
    flat = torch.randn(dim + 1, dtype=torch.float32)
    weight = flat[1:]  # a parameter inside a flat buffer, at an odd offset
    cos, sin = rope_table(head_dim, (1, 3, 3))
    torch.testing.assert_close(qk_norm_rope(x, weight, cos, sin, heads, EPS),
                               qk_norm_rope_ref(x, weight, cos, sin, heads, EPS), **FP32_ELEMENTWISE)


def test_frozen_weight_gets_no_grad(ext):
    x, weight, cos, sin = _inputs(10, 4, (2, 3, 3), 2)
    weight.requires_grad_(False)
    qk_norm_rope(x, weight, cos, sin, 4, EPS).sum().backward()
    want, = torch.autograd.grad(qk_norm_rope_ref(x, weight, cos, sin, 4, EPS).sum(), x)
    torch.testing.assert_close(x.grad, want, **FP64_EXACT)
    assert weight.grad is None


@pytest.mark.parametrize("dim,heads,table_width,match", [
    (30, 4, 4, "not divisible"), (10, 2, 3, "head dim must be even"), (12, 2, 2, r"\[Lr, 3\]")])
def test_rejects_bad_shapes(ext, dim, heads, table_width, match):
    x, weight = torch.randn(1, 4, dim), torch.ones(dim)
    table = torch.zeros(4, table_width)
    with pytest.raises(RuntimeError, match=match):
        qk_norm_rope(x, weight, table, table, heads, EPS)


# ---- the fallback ------------------------------------------------------------------------------------
def test_fallback_without_a_compiler_logs_once_and_stays_correct(monkeypatch, caplog):
    monkeypatch.setattr(qnr, "_EXT", qnr._Extension())  # a process that has not built it yet
    monkeypatch.setenv("CXX", "no-such-c++")
    x, weight, cos, sin = _inputs(10, 4, (2, 3, 3), 2, torch.float32)
    with caplog.at_level(logging.WARNING, logger=qnr.__name__):
        first = qk_norm_rope(x, weight, cos, sin, 4, EPS)
        second = qk_norm_rope(x, weight, cos, sin, 4, EPS)
    warnings = [r.getMessage() for r in caplog.records if r.name == qnr.__name__]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0] and "no-such-c++" in warnings[0]
    assert "unavailable" in qnr.extension_status()
    ref = qk_norm_rope_ref(x, weight, cos, sin, 4, EPS)
    assert torch.equal(first, ref) and torch.equal(second, ref)
    for got, want in zip(_grads(first, (x, weight)), _grads(ref, (x, weight))):
        assert torch.equal(got, want)


# ---- CUDA ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim,heads,grid,pad", [CASES[0], CASES[2], (128, 12, (3, 6, 7), 77)])
def test_cuda_matches_float64_truth(ext, dtype, head_dim, heads, grid, pad):
    if not ext.with_cuda:
        pytest.skip(f"the extension was built without CUDA kernels ({qnr.cuda_build_possible()[1] or 'no nvcc'})")
    x, weight, cos, sin = _inputs(head_dim, heads, grid, pad, dtype)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, weight))
    truth = qk_norm_rope_ref(x64, w64, cos, sin, heads, EPS)
    xc, wc = (t.detach().cuda().requires_grad_() for t in (x, weight))
    ours = qk_norm_rope(xc, wc, cos.cuda(), sin.cuda(), heads, EPS)
    ref = qk_norm_rope_ref(xc, wc, cos.cuda(), sin.cuda(), heads, EPS)
    assert_ratio_rule(ours, ref, truth, False, "out")
    for got, plain, true in zip(_grads(ours, (xc, wc)), _grads(ref, (xc, wc)), _grads(truth, (x64, w64))):
        assert_ratio_rule(got, plain, true, True, "grad")
