"""Attention backend registry: every attention call in wanspeed goes through here.

Two operations, both on `[B, L, N, D]` tensors (B batch, L tokens, N heads, D head dim):

- `attention(q, k, v, k_lens=None)`: softmax(q k^T / sqrt(D)) v, keys past `k_lens[b]` masked.
- `multi_path_attention(q, paths)`: Wan's cross-attention with reference paths,
  `sum_s softmax(q k_s^T / sqrt(D)) v_s`. Each path has its OWN softmax, so this is not
  attention over the concatenated keys. A path whose key length is 0 for a sample adds 0.

A backend implements `attention` and may override `multi_path_attention` with a fused kernel
(the Triton backend does); the default sums separate `attention` calls.

Selection, first match wins: the `backend=` argument (the model config's `attn_backend`), the
`WANSPEED_ATTN_BACKEND` environment variable, then `sdpa`. Asking for a backend that cannot run
here raises `AttentionBackendUnavailable` with the reason; there is no silent fallback.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from kernels.attention_types import KVPath, key_padding_mask, visible_slots
from kernels.block_causal_layout import block_causal_mask
from kernels.multi_path_reference import multi_path_attention_ref  # noqa: F401  (re-exported for tests)

ENV_VAR = "WANSPEED_ATTN_BACKEND"
DEFAULT_BACKEND = "sdpa"


class AttentionBackendUnavailable(RuntimeError):
    """A requested attention backend is unknown or cannot run on this machine."""


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   k_lens: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`F.scaled_dot_product_attention` on [B, L, N, D] inputs; returns [B, Lq, N, D].

    q and k are cast to v's dtype (Wan's rope returns fp32 while v may be bf16 under autocast).
    attn_mask: optional [Lq, Lk] bool (True = attend), e.g. a block-causal mask.
    """
    q, k = q.to(v.dtype), k.to(v.dtype)
    if attn_mask is not None:
        if k_lens is not None:
            raise ValueError("attn_mask and k_lens together are not supported")
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attn_mask)
        return out.transpose(1, 2)
    mask = None
    empty = None
    if k_lens is not None:
        k_lens = k_lens.to(device=q.device)
        empty = k_lens == 0
        # An all-masked row makes softmax NaN: let such samples see key 0, zero them below.
        mask = key_padding_mask(torch.where(empty, torch.ones_like(k_lens), k_lens), k.shape[1])
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)  # [B, N, Lq, D]
    out = out.transpose(1, 2)
    if empty is not None and bool(empty.any()):
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out


class AttentionBackend:
    """Base class: `attention` is required; `multi_path_attention` sums per-path calls."""

    name: str = ""

    def unavailable_reason(self) -> Optional[str]:
        """None when the backend can run here, else a sentence saying why not."""
        return None

    def attention(self, q, k, v, k_lens=None):
        raise NotImplementedError

    def block_causal_attention(self, q, k, v, layout):
        """Self-attention under a kernels.block_causal_layout.BlockCausalLayout: SDPA with the
        dense [L, L] mask (cached per layout); the triton backend skips invisible tiles instead."""
        return sdpa_attention(q, k, v, attn_mask=_dense_block_causal_mask(layout, str(q.device)))

    def kv_cache_attention(self, q, k_cache, v_cache, sink_len: int, window_start: int, window_len: int):
        """q [B, Lq, N, D] against a ring-buffer cache [B, C, N, D]: the sink [0, sink_len) plus
        `window_len` slots from `window_start`, wrapping back to `sink_len`. Default: gather the
        visible slots, then attention; the triton backend reads them in place."""
        idx = visible_slots(k_cache.shape[1], sink_len, window_start, window_len).to(k_cache.device)
        return self.attention(q, k_cache[:, idx], v_cache[:, idx])

    def multi_path_attention(self, q: torch.Tensor, paths: Sequence[KVPath]) -> torch.Tensor:
        out = None
        for p in paths:
            term = self.attention(q, p.k, p.v, p.lens)
            out = term if out is None else out + term
        if out is None:
            raise ValueError("multi_path_attention needs at least one key/value path")
        return out


class SDPABackend(AttentionBackend):
    name = "sdpa"

    def attention(self, q, k, v, k_lens=None):
        return sdpa_attention(q, k, v, k_lens)


class FlashAttnBackend(AttentionBackend):
    """flash-attn 2 (`flash_attn_varlen_func` when lengths differ). Imported lazily, CUDA only."""

    name = "flash_attn"

    def unavailable_reason(self):
        if importlib.util.find_spec("flash_attn") is None:
            return "the flash_attn package is not importable (pip install flash-attn on a CUDA machine)"
        if not torch.cuda.is_available():
            return "flash_attn needs a CUDA device and none is available"
        return None

    def attention(self, q, k, v, k_lens=None):
        import flash_attn  # noqa: PLC0415  (optional dependency, imported on use only)

        dtype = v.dtype if v.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        q, k, v = (t.to(dtype) for t in (q, k, v))
        if k_lens is None:
            return flash_attn.flash_attn_func(q, k, v)
        b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        k_lens = k_lens.to(device=q.device, dtype=torch.int32)
        keep = key_padding_mask(k_lens, lk).view(b, lk)
        cu_k = F.pad(k_lens.cumsum(0, dtype=torch.int32), (1, 0))
        cu_q = torch.arange(0, (b + 1) * lq, lq, device=q.device, dtype=torch.int32)
        out = flash_attn.flash_attn_varlen_func(
            q.flatten(0, 1), k[keep], v[keep], cu_q, cu_k, lq, int(k_lens.max()))
        out = out.unflatten(0, (b, lq))
        return out.masked_fill((k_lens == 0)[:, None, None, None], 0.0)


class TritonBackend(AttentionBackend):
    """Fused multi-path Triton kernel (kernels/fused_cross_attention.py), forward and backward.

    `multi_path_attention` runs up to MAX_PATHS (4) paths per launch (more: one launch per 4,
    summed); `attention` is the one-path case.
    Needs triton plus a CUDA device, or TRITON_INTERPRET=1 (CPU interpreter, for tests).
    """

    name = "triton"

    def unavailable_reason(self):
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not importable (pip install triton)"
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            return "triton needs a CUDA device (none is available), or TRITON_INTERPRET=1 to run on CPU"
        return None

    def attention(self, q, k, v, k_lens=None):
        from kernels.fused_cross_attention import fused_cross_attention  # noqa: PLC0415  (imports triton)

        return fused_cross_attention(q, [KVPath(k, v, k_lens)])

    def block_causal_attention(self, q, k, v, layout):
        from kernels.block_causal_attention import block_causal_attention  # noqa: PLC0415
        return block_causal_attention(q, k, v, layout)

    def kv_cache_attention(self, q, k_cache, v_cache, sink_len: int, window_start: int, window_len: int):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
            # the in-place kernel is forward only; a rollout step with gradients (Self-Forcing's
            # exit step) gathers the visible slots and runs the differentiable kernel
            return super().kv_cache_attention(q, k_cache, v_cache, sink_len, window_start, window_len)
        from kernels.kv_cache_attention import kv_cache_attention  # noqa: PLC0415
        return kv_cache_attention(q, k_cache, v_cache, sink_len, window_start, window_len)

    def multi_path_attention(self, q: torch.Tensor, paths: Sequence[KVPath]) -> torch.Tensor:
        from kernels.fused_cross_attention import MAX_PATHS, fused_cross_attention  # noqa: PLC0415

        if not paths:
            raise ValueError("multi_path_attention needs at least one key/value path")
        chunks = [paths[i:i + MAX_PATHS] for i in range(0, len(paths), MAX_PATHS)]  # paths are independent
        out = fused_cross_attention(q, chunks[0])
        for chunk in chunks[1:]:
            out = out + fused_cross_attention(q, chunk)
        return out


_REGISTRY: dict[str, Callable[[], AttentionBackend]] = {}
_INSTANCES: dict[str, AttentionBackend] = {}


def register_backend(name: str, factory: Callable[[], AttentionBackend]) -> None:
    """Register a backend under `name`; the factory runs on first use (no work at import)."""
    _REGISTRY[name] = factory
    _INSTANCES.pop(name, None)


def available_backends() -> dict[str, Optional[str]]:
    """Every registered backend name -> None if usable here, else the reason it is not."""
    return {name: _instance(name).unavailable_reason() for name in sorted(_REGISTRY)}


def _instance(name: str) -> AttentionBackend:
    if name not in _INSTANCES:
        _INSTANCES[name] = _REGISTRY[name]()
    return _INSTANCES[name]


def resolve_backend_name(name: Optional[str] = None) -> str:
    return name or os.environ.get(ENV_VAR) or DEFAULT_BACKEND


def get_backend(name: Optional[str] = None) -> AttentionBackend:
    """The backend for `name` (argument > $WANSPEED_ATTN_BACKEND > sdpa), checked usable."""
    resolved = resolve_backend_name(name)
    source = "argument/config" if name else (f"${ENV_VAR}" if os.environ.get(ENV_VAR) else "default")
    if resolved not in _REGISTRY:
        raise AttentionBackendUnavailable(
            f"unknown attention backend {resolved!r} (from {source}); "
            f"registered: {', '.join(sorted(_REGISTRY))}")
    backend = _instance(resolved)
    reason = backend.unavailable_reason()
    if reason is not None:
        raise AttentionBackendUnavailable(
            f"attention backend {resolved!r} (from {source}) is unavailable: {reason}")
    return backend


def attention(q, k, v, k_lens=None, backend: Optional[str] = None) -> torch.Tensor:
    """Single-path attention on [B, L, N, D]; see the module docstring."""
    return get_backend(backend).attention(q, k, v, k_lens)


def block_causal_attention(q, k, v, layout, backend: Optional[str] = None) -> torch.Tensor:
    """Block-causal self-attention on [B, L, N, D] under `layout` (see BlockCausalLayout)."""
    return get_backend(backend).block_causal_attention(q, k, v, layout)


def kv_cache_attention(q, k_cache, v_cache, sink_len: int, window_start: int, window_len: int,
                       backend: Optional[str] = None) -> torch.Tensor:
    """Attention of the current block's queries over a ring-buffer KV cache (see the backend method)."""
    return get_backend(backend).kv_cache_attention(q, k_cache, v_cache, sink_len, window_start, window_len)


@functools.lru_cache(maxsize=4)
def _dense_block_causal_mask(layout, device: str) -> torch.Tensor:
    return block_causal_mask(layout, torch.device(device))


def multi_path_attention(q, paths: Sequence[KVPath], backend: Optional[str] = None) -> torch.Tensor:
    """Sum of per-path softmax attentions on [B, L, N, D]; see the module docstring."""
    return get_backend(backend).multi_path_attention(q, paths)


register_backend("sdpa", SDPABackend)
register_backend("flash_attn", FlashAttnBackend)
register_backend("triton", TritonBackend)
