"""Benchmark: fused multi-path cross-attention against separate attention calls plus adds.

Work per case (B batch, Lq queries, N heads, D head dim, Lk_s keys of path s):
- FLOPs, fwd: sum_s 4 * B * N * Lq * Lk_s * D (two matmuls per path). fwd+bwd: x 3.5, the
  backward counting 2.5x the forward as in the Triton fused-attention tutorial (the kernels
  recompute scores; that extra work is not credited).
- Bytes (the minimum traffic), fwd: q read + o written + every k_s, v_s read once. fwd+bwd
  adds q, dO read, dq written, k_s, v_s read and dk_s, dv_s written.

Providers, timed side by side in one run:
- `triton-fused` (ours): kernels.fused_cross_attention, all paths in one launch per kernel.
- `sdpa-<backend>`: one `F.scaled_dot_product_attention` per path, summed, pinned to each SDPA
  backend (flash, efficient, cudnn, math) that runs this case; the ones that error are left out.
- `flash-attn`: `flash_attn_func` per path, summed (when the package is importable).
- `compiled-ref`: `torch.compile` of the plain-PyTorch reference (GPU only).
On CPU the Triton kernels run in the interpreter, so `triton-fused` is timed for `tiny` only
and those timings are NOT meaningful (numpy, one program at a time); they show that it runs.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.attention_types import KVPath
from kernels.bench.harness import SDPA_BACKENDS, Case, Row, measure

KERNEL = "fused_cross_attention"
OURS = "triton-fused"
BWD_FLOPS_FACTOR = 2.5        # backward FLOPs / forward FLOPs (tutorial convention)
T5_TOKENS, CLIP_TOKENS = 512, 257  # model.config's (kernels/ imports nothing of ours; a test keeps them equal)
VAE_REF_TOKENS = 1560         # one 480x832 reference image: latent 60x104, patch (2, 2)
WAN_TOKENS = 32760            # 81 frames at 480x832: 21 latent frames x 30 x 52


@dataclass(frozen=True)
class Shape:
    batch: int
    queries: int
    heads: int
    head_dim: int
    keys: tuple[int, ...]     # Lk per path
    dtype: torch.dtype

    def as_dict(self) -> dict:
        return {"B": self.batch, "Lq": self.queries, "N": self.heads, "D": self.head_dim,
                "Lk": "+".join(map(str, self.keys)), "dtype": str(self.dtype).removeprefix("torch.")}


def _wan(heads: int) -> list[Shape]:
    """Text + CLIP; + one VAE reference; + the fused CLIP|VAE path (2, 3, 4 paths)."""
    paths = (T5_TOKENS, CLIP_TOKENS, VAE_REF_TOKENS, CLIP_TOKENS + VAE_REF_TOKENS)
    return [Shape(1, WAN_TOKENS, heads, 128, paths[:n], torch.bfloat16) for n in (2, 3, 4)]


SHAPES: dict[str, list[Shape]] = {
    "tiny": [Shape(1, 77, 2, 32, (59, 13), torch.float32)],
    "wan-1.3b": _wan(12),
    "wan-14b": _wan(40),
}


def _flops(s: Shape, mode: str) -> float:
    fwd = sum(4.0 * s.batch * s.heads * s.queries * lk * s.head_dim for lk in s.keys)
    return fwd if mode == "fwd" else fwd * (1 + BWD_FLOPS_FACTOR)


def _bytes(s: Shape, mode: str) -> float:
    elt = torch.finfo(s.dtype).bits // 8
    q = s.batch * s.queries * s.heads * s.head_dim * elt
    kv = sum(2 * s.batch * lk * s.heads * s.head_dim * elt for lk in s.keys)
    return float(2 * q + kv if mode == "fwd" else 5 * q + 3 * kv)


# ---- providers ---------------------------------------------------------------------------
def _sdpa_sum(backend: SDPBackend) -> Callable:
    def fn(q, paths):
        with sdpa_kernel(backend):
            out = None
            for p in paths:  # [B, L, N, D] -> [B, N, L, D] views, as Wan's layout is
                o = F.scaled_dot_product_attention(q.transpose(1, 2), p.k.transpose(1, 2), p.v.transpose(1, 2))
                out = o if out is None else out + o
            return out.transpose(1, 2)
    return fn


def _flash_attn_sum(q, paths):
    import flash_attn  # noqa: PLC0415  (optional)

    out = None
    for p in paths:
        o = flash_attn.flash_attn_func(q, p.k, p.v)
        out = o if out is None else out + o
    return out


def _candidates(device: torch.device, shapes: str) -> dict[str, tuple[Callable, bool]]:
    if device.type == "cpu":  # triton.jit picks the interpreter when our kernels are defined
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from kernels.fused_cross_attention import fused_cross_attention, fused_cross_attention_ref  # noqa: PLC0415

    found: dict[str, tuple[Callable, bool]] = {}
    if device.type == "cuda" or shapes == "tiny":  # the interpreter is far too slow beyond tiny
        found[OURS] = (fused_cross_attention, True)
    for name, backend in SDPA_BACKENDS.items():
        found[f"sdpa-{name}"] = (_sdpa_sum(backend), False)
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        found["flash-attn"] = (_flash_attn_sum, False)
    if device.type == "cuda":
        found["compiled-ref"] = (torch.compile(fused_cross_attention_ref, dynamic=False), False)
    return found


def _inputs(s: Shape, device: torch.device, grad: bool):
    g = torch.Generator(device="cpu").manual_seed(0)

    def make(length: int) -> torch.Tensor:  # [B, length, N, D]
        x = torch.randn(s.batch, length, s.heads, s.head_dim, generator=g)
        return x.to(device, s.dtype).requires_grad_(grad)

    q = make(s.queries)
    return q, [KVPath(make(lk), make(lk)) for lk in s.keys], make(s.queries).detach()


def _timed(fn: Callable, q, paths, do, mode: str) -> Callable:
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(q, paths)
        return call
    leaves = [q] + [t for p in paths for t in (p.k, p.v)]
    return lambda: torch.autograd.grad(fn(q, paths), leaves, do)


def _runs(fn: Callable, q, paths) -> bool:
    """Whether a stock provider runs this case at all (an SDPA backend may refuse the shape,
    dtype or device); the ones that do not are left out of the table."""
    try:
        with torch.no_grad():
            fn(q, paths)
        return True
    except Exception:  # noqa: BLE001  (any refusal: unsupported backend, shape, OOM, compile error)
        return False


def _error_vs_math(usable: dict, q, paths) -> float | None:
    if OURS not in usable or "sdpa-math" not in usable:
        return None
    with torch.no_grad():
        ours = usable[OURS][0](q, paths).float()
        return (ours - usable["sdpa-math"][0](q, paths).float()).abs().max().item()


def run(shapes: str, device: torch.device) -> list[Row]:
    """Time every provider on every shape of the set, fwd and fwd+bwd. Rows of ours carry
    `extra["max_abs_err_vs_sdpa_math"]` so that a fast but wrong kernel shows."""
    rows: list[Row] = []
    candidates = _candidates(device, shapes)
    for s in SHAPES[shapes]:
        q, paths, do = _inputs(s, device, grad=True)
        usable = {name: (fn, ours) for name, (fn, ours) in candidates.items() if ours or _runs(fn, q, paths)}
        err = _error_vs_math(usable, q, paths)
        # the interpreter takes ~0.1-1 s a call: fewer repeats keep `tiny` at seconds on CPU
        warmup, repeats = (3, 10) if device.type == "cuda" else (1, 3)
        for mode in ("fwd", "fwd+bwd"):
            case = Case(KERNEL, mode, s.as_dict(), flops=_flops(s, mode), bytes=_bytes(s, mode))
            providers = {name: (_timed(fn, q, paths, do, mode), ours) for name, (fn, ours) in usable.items()}
            case_rows = measure(case, providers, device, warmup=warmup, repeats=repeats)
            for r in case_rows:
                if r.ours and err is not None:
                    r.extra["max_abs_err_vs_sdpa_math"] = err
            rows += case_rows
    return rows
