"""Fused multi-path cross-attention (Triton) against a float64 plain-PyTorch reference.

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so shapes
stay tiny; lengths are deliberately not multiples of the interpreter's 32-wide tiles. GPU cases
(bf16, Wan's head dims and key lengths) skip without CUDA.
"""
import pytest
import torch

from kernels.attention import KVPath, attention, available_backends, multi_path_attention
from kernels.fused_cross_attention import MAX_PATHS, fused_cross_attention, fused_cross_attention_ref
from tests.kernels.tolerance import FP32_REORDERED, assert_fp32_close, assert_ratio_rule, max_error

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

B, N = 2, 2
CASES = [  # Lq, key lengths per path, per-sample lens per path (None: all valid), head dim D
    pytest.param(1, [13], [None], 16, id="1path-lq1-d16"),
    pytest.param(37, [59, 1], [[59, 20], None], 32, id="2paths-d32"),
    pytest.param(77, [130, 13, 59], [None, [13, 5], None], 64, id="3paths-d64"),
    pytest.param(37, [1, 13, 59, 130], [[1, 0], None, [0, 59], [100, 7]], 24, id="4paths-d24-empty"),
]


def _inputs(lq, lks, lens, d, dtype=torch.float32, device="cpu", seed=0):
    """q [B, Lq, N, D] and KVPaths (k, v [B, Lk_s, N, D], lens [B]) as float64 leaves + casts."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, lq, N, d, generator=g, dtype=torch.float64)
    paths = []
    for s, (lk, ln) in enumerate(zip(lks, lens)):
        k = torch.randn(B, lk, N, d, generator=g, dtype=torch.float64) + 0.5 * s  # unlike scores per path
        v = torch.randn(B, lk, N, d, generator=g, dtype=torch.float64)
        paths.append(KVPath(k, v, None if ln is None else torch.tensor(ln)))
    return _cast(q, paths, dtype, device)


def _cast(q, paths, dtype, device=DEVICE):
    """Leaf copies (requires_grad) of q and every path in `dtype` on `device`."""
    leaf = lambda t: t.detach().to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return leaf(q), [KVPath(leaf(p.k), leaf(p.v), None if p.lens is None else p.lens.to(device)) for p in paths]


def _run(fn, q, paths, do):
    """Output and gradients [dq, dk_0, dv_0, dk_1, ...] of fn(q, paths) for the upstream grad do."""
    out = fn(q, paths)
    leaves = [q] + [t for p in paths for t in (p.k, p.v)]
    return out, list(torch.autograd.grad(out, leaves, do.to(out.dtype)))


def _names(paths):
    return ["dq"] + [f"{g}{s}" for s in range(len(paths)) for g in ("dk", "dv")]


def _compare(q64, paths64, dtype, device=DEVICE):
    """Check forward and every gradient of the kernel in `dtype` against float64."""
    do = torch.randn(q64.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref, ref_grads = _run(fused_cross_attention_ref, q64, paths64, do)
    q, paths = _cast(q64, paths64, dtype, device)
    out, grads = _run(fused_cross_attention, q, paths, do.to(device))
    assert out.dtype == dtype and out.shape == q64.shape
    if dtype == torch.float32:
        assert_fp32_close(out.cpu(), ref, "out")
        for g, r, name in zip(grads, ref_grads, _names(paths)):
            assert_fp32_close(g.cpu(), r, name)
        return
    low_out, low_grads = _run(fused_cross_attention_ref, *_cast(q64, paths64, dtype, device), do.to(device))
    assert_ratio_rule(out.cpu(), low_out.cpu(), ref, False, "out")
    for g, lg, r, name in zip(grads, low_grads, ref_grads, _names(paths)):
        assert_ratio_rule(g.cpu(), lg.cpu(), r, True, name)


# ---- correctness on CPU (interpreter) or GPU -----------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lq,lks,lens,d", CASES)
def test_forward_and_gradients_match_float64(lq, lks, lens, d, dtype):
    q, paths = _inputs(lq, lks, lens, d, torch.float64)
    _compare(q, paths, dtype)


def test_bfloat16_matches_float64():
    """bf16 takes the upcast-before-tl.dot route in the interpreter (bf16 tl.dot is broken there)."""
    q, paths = _inputs(37, [59, 13], [[59, 30], None], 32, torch.float64)
    _compare(q, paths, torch.bfloat16)


def test_zero_length_path_adds_zero_and_masked_keys_get_zero_gradients():
    q64, paths64 = _inputs(37, [59, 45], [[59, 40], [0, 13]], 32, torch.float64)
    q, paths = _cast(q64, paths64, torch.float32)
    out, grads = _run(fused_cross_attention, q, paths, torch.ones_like(q))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    # sample 0 has no key in path 1: its output is path 0's attention alone
    alone = fused_cross_attention_ref(q64[:1], [KVPath(p.k[:1], p.v[:1], p.lens[:1]) for p in paths64[:1]])
    assert_fp32_close(out[:1].detach(), alone, "out of the sample whose path 1 is empty")
    dk0, dv0, dk1, dv1 = grads[1:]
    for dk, dv, lens in ((dk0, dv0, [59, 40]), (dk1, dv1, [0, 13])):
        for b, n_valid in enumerate(lens):  # exactly zero, not merely small
            assert torch.equal(dk[b, n_valid:], torch.zeros_like(dk[b, n_valid:]))
            assert torch.equal(dv[b, n_valid:], torch.zeros_like(dv[b, n_valid:]))
    assert dk1[1, :13].abs().sum() > 0 and dv1[1, :13].abs().sum() > 0
    # masked keys are ignored: moving them leaves the output bit-identical
    moved = [KVPath(p.k.detach().clone(), p.v.detach().clone(), p.lens) for p in paths]
    moved[1].k[0] += 100.0
    moved[0].v[1, 40:] -= 7.0
    assert torch.equal(fused_cross_attention(q.detach(), moved), out.detach())


def test_each_path_has_its_own_softmax():
    """Not attention over the concatenated keys (= LSE-merging the paths), and not one path twice."""
    q64, paths64 = _inputs(37, [59, 13, 130], [None, None, None], 32, torch.float64)
    q, paths = _cast(q64, paths64, torch.float32)
    out = fused_cross_attention(q, paths).detach()
    cat = KVPath(torch.cat([p.k for p in paths64], 1), torch.cat([p.v for p in paths64], 1))
    assert max_error(out, fused_cross_attention_ref(q64, [cat])) > 1e-2
    assert_fp32_close(out, sum(fused_cross_attention_ref(q64, [p]) for p in paths64), "sum of single paths")


def test_frozen_path_gets_no_gradient_and_the_others_are_right():
    """A path whose k and v need no gradient (the frozen text path) skips its dK/dV work."""
    q64, paths64 = _inputs(37, [59, 13], [None, [13, 4]], 32, torch.float64)
    do = torch.randn(q64.shape, dtype=torch.float64)
    ref, ref_grads = _run(fused_cross_attention_ref, q64, paths64, do)
    q, paths = _cast(q64, paths64, torch.float32)
    frozen = KVPath(paths[0].k.detach(), paths[0].v.detach())
    out = fused_cross_attention(q, [frozen, paths[1]])
    dq, dk1, dv1 = torch.autograd.grad(out, [q, paths[1].k, paths[1].v], do.float().to(DEVICE))
    for ours, r, name in zip((out, dq, dk1, dv1), (ref, ref_grads[0], *ref_grads[3:]), ("out", "dq", "dk1", "dv1")):
        assert_fp32_close(ours.detach(), r, name)


def test_rejects_bad_inputs():
    q, paths = _inputs(5, [7] * (MAX_PATHS + 1), [None] * (MAX_PATHS + 1), 16)
    with pytest.raises(ValueError, match="paths"):
        fused_cross_attention(q, paths)
    with pytest.raises(ValueError, match="path 0"):
        fused_cross_attention(q, [KVPath(paths[0].k, paths[0].v[:, :3])])
    with pytest.raises(TypeError, match="float64"):
        fused_cross_attention(q.double(), [KVPath(p.k.double(), p.v.double()) for p in paths[:1]])


# ---- the backend registry ----------------------------------------------------------------
def test_triton_backend_runs_attention_and_more_than_max_paths():
    assert available_backends()["triton"] is None
    q64, paths64 = _inputs(37, [13, 59, 1, 20, 33], [None, [59, 7], None, None, [0, 33]], 32, torch.float64)
    q, paths = _cast(q64, paths64, torch.float32)
    with torch.no_grad():
        assert_fp32_close(multi_path_attention(q, paths, backend="triton"),
                           fused_cross_attention_ref(q64, paths64), "5 paths (two launches)")
        p = paths[1]
        assert_fp32_close(attention(q, p.k, p.v, p.lens, backend="triton"),
                           attention(q, p.k, p.v, p.lens, backend="sdpa"), "single path vs sdpa")


@pytest.mark.skipif(CUDA, reason="with CUDA the triton backend is available without the interpreter")
def test_triton_backend_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = available_backends()["triton"]
    assert reason is not None and "TRITON_INTERPRET" in reason and "CUDA" in reason


# ---- the whole tiny Wan model ------------------------------------------------------------
def test_wan_model_with_reference_paths_same_output_and_gradients_as_sdpa(monkeypatch):
    import kernels.fused_cross_attention as fca
    from model.conditioning import Conditioning
    from model.config import WAN_TINY, ReferencePathsConfig
    from model.wan import WanModel

    launches = []  # (number of paths) per call: proves the triton run really used the kernel
    monkeypatch.setattr(fca, "fused_cross_attention",
                        lambda q, paths, _f=fca.fused_cross_attention: launches.append(len(paths)) or _f(q, paths))

    model = WanModel(WAN_TINY.replace(reference_paths=ReferencePathsConfig(clip=True, vae=True, fused=True)))
    model = model.to(DEVICE)  # the interpreter on CPU, compiled kernels on a GPU
    with torch.no_grad():
        for p in model.parameters():  # new paths' value projections start at zero: randomise all
            p.normal_(0.0, 0.05)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, 16, 1, 4, 6, generator=g).to(DEVICE)  # 1 x 2 x 3 = 6 tokens
    t = torch.tensor([100.0, 800.0], device=DEVICE)
    context = torch.randn(B, 7, WAN_TINY.text_dim, generator=g).to(DEVICE)  # padded to 512 text keys
    ref_clip = torch.randn(B, 1, 257, WAN_TINY.clip_dim, generator=g).to(DEVICE)  # [B, R, K, C]
    ref_vae = torch.randn(B, 1, 16, 3, 5, generator=g).to(DEVICE)  # [B, R, 16, h, w]: 15 VAE keys, fused path 272
    ref_vae_lens = torch.tensor([15, 6], device=DEVICE)
    params = list(model.parameters())
    results = {}
    for backend in ("sdpa", "triton"):
        model.set_attn_backend(backend)
        out = model(x, t, Conditioning(context, ref_clip=ref_clip, ref_vae=ref_vae, ref_vae_lens=ref_vae_lens))
        results[backend] = (out, torch.autograd.grad(out.square().mean(), params))
    (out_s, grads_s), (out_t, grads_t) = results["sdpa"], results["triton"]
    assert sorted(launches) == [1] * WAN_TINY.num_layers + [4] * WAN_TINY.num_layers  # self-attn, 4-path cross
    torch.testing.assert_close(out_t, out_s, **FP32_REORDERED)
    names = [n for n, _ in model.named_parameters()]
    for name, gt, gs in zip(names, grads_t, grads_s):
        torch.testing.assert_close(gt, gs, **FP32_REORDERED, msg=lambda m: f"{name}: {m}")
    assert any("v_fused" in n and gs.abs().sum() > 0 for n, gs in zip(names, grads_s))


# ---- GPU: bf16 at Wan's head dims and key lengths ------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16 Triton kernels at Wan's sizes)")
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_bfloat16_at_wan_sizes(d):  # pragma: no cover - GPU only
    lks = [512, 257, 1560]
    q, paths = _inputs(1000, lks, [None, None, [1560, 700]], d, torch.float64)
    _compare(q, paths, torch.bfloat16, device="cuda")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_float32_uses_exact_dots():  # pragma: no cover - GPU only
    q, paths = _inputs(300, [512, 257], [None, [257, 3]], 128, torch.float64)
    _compare(q, paths, torch.float32, device="cuda")
