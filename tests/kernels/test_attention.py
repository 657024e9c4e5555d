"""The attention backend registry: selection, errors, and agreement with a float64 reference."""
import pytest
import torch

from kernels.attention import (AttentionBackendUnavailable, KVPath, attention, available_backends, get_backend,
                               multi_path_attention, multi_path_attention_ref)
from tests.kernels.tolerance import LOW_PRECISION_GPU, SDPA_VS_FP64


def _qkv(b=2, lq=13, lk=29, n=3, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, lq, n, d, generator=g, dtype=dtype), torch.randn(b, lk, n, d, generator=g, dtype=dtype),
            torch.randn(b, lk, n, d, generator=g, dtype=dtype))


def test_sdpa_matches_float64_reference_with_per_sample_lengths():
    q, k, v = _qkv()
    lens = torch.tensor([29, 7])
    out = attention(q, k, v, k_lens=lens)
    ref = multi_path_attention_ref(q.double(), [KVPath(k.double(), v.double(), lens)])
    torch.testing.assert_close(out.double(), ref, **SDPA_VS_FP64)
    # masked keys really are ignored: changing them does not move the output of sample 1
    k2 = k.clone()
    k2[1, 7:] += 100
    torch.testing.assert_close(attention(q, k2, v, k_lens=lens)[1], out[1])


@pytest.mark.parametrize("num_paths", [1, 2, 3, 4])
def test_multi_path_is_a_sum_of_separate_softmaxes(num_paths):
    q, _, _ = _qkv()
    lengths = [512 // 16, 257 // 8, 59, 3][:num_paths]
    paths = []
    for i, lk in enumerate(lengths):
        _, k, v = _qkv(lk=lk)
        paths.append(KVPath(k + i, v, torch.tensor([lk, max(lk - 5, 0)]) if i == 2 else None))
    out = multi_path_attention(q, paths)
    ref = multi_path_attention_ref(q.double(), [KVPath(p.k.double(), p.v.double(), p.lens) for p in paths])
    torch.testing.assert_close(out.double(), ref, **SDPA_VS_FP64)
    if num_paths > 1:  # not the same as attention over the concatenated keys
        cat = attention(q, torch.cat([p.k for p in paths], 1), torch.cat([p.v for p in paths], 1))
        assert (cat - out).abs().max() > 1e-2


def test_zero_length_path_contributes_zero():
    q, k, v = _qkv()
    out = multi_path_attention(q, [KVPath(k, v, torch.tensor([0, 5]))])
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1].abs().sum() > 0
    assert torch.isfinite(out).all()


def test_backend_selection_by_argument_env_and_default(monkeypatch):
    assert get_backend().name == "sdpa"
    monkeypatch.setenv("WANSPEED_ATTN_BACKEND", "no-such-backend")
    with pytest.raises(AttentionBackendUnavailable, match=r"no-such-backend.*WANSPEED_ATTN_BACKEND"):
        get_backend()
    assert get_backend("sdpa").name == "sdpa"  # the explicit argument wins over the env var


def test_unavailable_backend_error_says_why():
    reasons = available_backends()
    assert reasons["sdpa"] is None
    if reasons["flash_attn"] is None:
        pytest.skip("flash_attn is importable here with CUDA; the unavailable path cannot be shown")
    with pytest.raises(AttentionBackendUnavailable, match="flash_attn.*(not importable|CUDA)"):
        get_backend("flash_attn")


@pytest.mark.skipif(available_backends().get("flash_attn") is not None,
                    reason="flash_attn needs the flash-attn package and a CUDA GPU")
def test_flash_attn_matches_sdpa_on_gpu():  # pragma: no cover - GPU only
    q, k, v = (t.cuda().bfloat16() for t in _qkv(d=64))
    lens = torch.tensor([29, 7], device="cuda")
    ref = multi_path_attention_ref(q.double(), [KVPath(k.double(), v.double(), lens)])
    for name in ("flash_attn", "sdpa"):
        out = attention(q, k, v, k_lens=lens, backend=name)
        torch.testing.assert_close(out.double(), ref, **LOW_PRECISION_GPU)
