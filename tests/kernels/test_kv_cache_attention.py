"""KV-cache attention (Triton, forward) over a sink + wrapping ring window, vs float64.

On CPU the kernel runs in the Triton interpreter with 16-wide tiles; cache sizes and window
edges are deliberately not multiples of 16. GPU cases skip without CUDA.
"""
import pytest
import torch

from kernels.kv_cache_attention import kv_cache_attention, kv_cache_attention_ref
from tests.kernels.tolerance import FP32_REL, assert_fp32_close, assert_ratio_rule, max_error

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

B, N = 2, 2


def _inputs(lq, c, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, N, d, generator=g, dtype=torch.float64) for n in (lq, c, c)]


def _compare(q, k, v, sink, start, length, dtype=torch.float32, device=DEVICE):
    ref = kv_cache_attention_ref(q, k, v, sink, start, length)
    cast = [t.to(device, dtype) for t in (q, k, v)]
    out = kv_cache_attention(*cast, sink, start, length)
    assert out.dtype == dtype and out.shape == q.shape
    if dtype == torch.float32:
        assert_fp32_close(out, ref, "out")
    else:
        assert_ratio_rule(out, kv_cache_attention_ref(*cast, sink, start, length), ref, False, "out")
    return out


CASES = [  # Lq, C, D, sink_len, window_start, window_len
    pytest.param(13, 45, 16, 7, 30, 20, id="wrapped"),
    pytest.param(13, 45, 16, 7, 12, 20, id="unwrapped"),
    pytest.param(21, 50, 32, 0, 41, 30, id="zero-sink-wrapped"),
    pytest.param(13, 45, 16, 7, 7, 38, id="full-cache"),
    pytest.param(13, 45, 16, 7, 40, 38, id="full-cache-rotated"),
    pytest.param(5, 40, 24, 11, 20, 0, id="sink-only-d24"),
    pytest.param(1, 45, 16, 7, 44, 3, id="lq1-window-starts-at-last-slot"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lq,c,d,sink,start,length", CASES)
def test_matches_float64(lq, c, d, sink, start, length, dtype):
    q, k, v = _inputs(lq, c, d)
    _compare(q, k, v, sink, start, length, dtype)


def test_bfloat16_matches_float64():
    q, k, v = _inputs(13, 45, 16)
    _compare(q, k, v, 7, 30, 20, torch.bfloat16)


def test_wrapped_window_equals_the_unwrapped_rotated_cache():
    """Rotating the ring so that the window is contiguous changes nothing (softmax is a set op)."""
    q, k, v = (t.float().to(DEVICE) for t in _inputs(13, 45, 16))
    sink, start, length, ring = 7, 30, 20, 38
    shift = start - sink  # rotate the ring so that the window starts right after the sink
    rot = [torch.cat([t[:, :sink], torch.roll(t[:, sink:], -shift, dims=1)], 1) for t in (k, v)]
    wrapped = kv_cache_attention(q, k, v, sink, start, length)
    unwrapped = kv_cache_attention(q, *rot, sink, sink, length)
    assert max_error(wrapped, unwrapped) <= FP32_REL
    assert torch.equal(rot[0][:, sink:sink + ring - shift], k[:, start:])  # the rotation is right


def test_per_sample_ranges_and_an_empty_sample():
    q, k, v = _inputs(13, 45, 16)
    sink, start, length = torch.tensor([5, 0]), torch.tensor([40, 3]), torch.tensor([20, 42])
    _compare(q, k, v, sink, start, length)
    out = kv_cache_attention(q.float(), k.float(), v.float(), torch.tensor([0, 4]), torch.tensor([0, 4]),
                             torch.tensor([0, 0]))
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # no visible key: zero output


def test_invisible_slots_are_ignored_and_the_cache_is_untouched():
    q, k, v = (t.float() for t in _inputs(13, 45, 16))
    k0, v0, ptr = k.clone(), v.clone(), k.data_ptr()
    out = kv_cache_attention(q, k, v, 7, 30, 20)  # visible: [0, 14) and [30, 45)
    assert torch.equal(k, k0) and torch.equal(v, v0) and k.data_ptr() == ptr
    k[:, 14:30] += 100.0
    v[:, 14:30] = float("nan")
    assert torch.equal(kv_cache_attention(q, k, v, 7, 30, 20), out)


def test_rejects_bad_ranges_and_gradients():
    q, k, v = (t.float() for t in _inputs(5, 20, 16))
    with pytest.raises(ValueError, match="do not fit"):
        kv_cache_attention(q, k, v, 5, 3, 4)   # window starts inside the sink
    with pytest.raises(ValueError, match="do not fit"):
        kv_cache_attention(q, k, v, 5, 6, 16)  # longer than the ring
    with pytest.raises(ValueError, match=r"\[B=2\]"):
        kv_cache_attention(q, k, v, torch.tensor([1, 2, 3]), 5, 4)
    with pytest.raises(RuntimeError, match="forward only"):
        kv_cache_attention(q.requires_grad_(), k, v, 5, 6, 4)


# ---- GPU ---------------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16 Triton kernel at Wan-like sizes)")
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_bfloat16_wrapped_window(d):  # pragma: no cover - GPU only
    q, k, v = _inputs(1170, 4290, d)  # 3 frames of 390 tokens; sink 1 frame + ring of 10
    _compare(q, k, v, 390, 3000, 2730, torch.bfloat16, device="cuda")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_allocates_only_the_output():  # pragma: no cover - GPU only
    q, k, v = (t.to("cuda", torch.bfloat16) for t in _inputs(1170, 4290, 128))
    kv_cache_attention(q, k, v, 390, 3000, 2730)  # compile and autotune first
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = kv_cache_attention(q, k, v, 390, 3000, 2730)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - out.numel() * out.element_size()
    assert extra <= 4096, f"{extra} bytes beyond the output (range tensors only)"
