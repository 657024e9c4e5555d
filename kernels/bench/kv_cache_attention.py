"""Benchmark: KV-cache attention (streaming inference) over a sink + wrapping ring window.

Work per case (B batch, Lq queries of the block, N heads, D head dim, K = sink + window visible
keys): FLOPs 4 * B * N * Lq * K * D; bytes q read + o written + the K visible keys and values
read once. Forward only (inference).

Providers, side by side in one run:
- `triton-kv-cache` (ours): kernels.kv_cache_attention, both ranges read in place.
- `cat+sdpa-<backend>`: the usual path, torch.cat(sink, window pieces) of k and v (the copy is
  inside the timed call, as in Self-Forcing / LongLive), then SDPA pinned to each backend that
  runs it (math only at `tiny`).
Every row carries `extra["bytes_allocated"]`: on a GPU the peak allocation of one call above
what was allocated before it, minus the output (ours: 0 but the [B] range tensors).
On CPU our kernel runs in the Triton interpreter: `tiny` timings only show that it runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from kernels.bench.harness import SDPA_BACKENDS, Case, Row, measure

KERNEL = "kv_cache_attention"
OURS = "triton-kv-cache"
FRAME_TOKENS = 1560


@dataclass(frozen=True)
class Shape:
    batch: int
    queries: int
    heads: int
    head_dim: int
    cache: int                # C slots
    sink: int
    window_start: int
    window_len: int
    dtype: torch.dtype

    @property
    def visible(self) -> int:
        return self.sink + self.window_len

    def as_dict(self) -> dict:
        return {"B": self.batch, "Lq": self.queries, "N": self.heads, "D": self.head_dim, "C": self.cache,
                "sink": self.sink, "win": f"{self.window_start}+{self.window_len}",
                "dtype": str(self.dtype).removeprefix("torch.")}


def _wan(heads: int) -> list[Shape]:
    """One 3-frame block (4680 queries). LongLive: sink 3 frames + a ring of 9, the window full
    and wrapped half way; Self-Forcing: a 21-frame cache, no sink, the first 18 frames visible."""
    f = FRAME_TOKENS
    return [Shape(1, 3 * f, heads, 128, 12 * f, 3 * f, 3 * f + 9 * f // 2, 9 * f, torch.bfloat16),
            Shape(1, 3 * f, heads, 128, 21 * f, 0, 0, 18 * f, torch.bfloat16)]


SHAPES: dict[str, list[Shape]] = {
    "tiny": [Shape(1, 13, 2, 32, 45, 7, 30, 20, torch.float32)],
    "wan-1.3b": _wan(12),
    "wan-14b": _wan(40),
}


def _flops(s: Shape) -> float:
    return 4.0 * s.batch * s.heads * s.queries * s.visible * s.head_dim


def _bytes(s: Shape) -> float:
    row = s.batch * s.heads * s.head_dim * (torch.finfo(s.dtype).bits // 8)
    return float(row * (2 * s.queries + 2 * s.visible))


def _cat_sdpa(s: Shape, backend) -> Callable:
    first_end = min(s.window_start + s.window_len, s.cache)
    wrap = s.window_start + s.window_len - first_end

    def fn(q, k, v):
        pieces = lambda t: torch.cat([t[:, :s.sink], t[:, s.window_start:first_end], t[:, s.sink:s.sink + wrap]], 1)  # noqa: E731
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), pieces(k).transpose(1, 2),
                                                  pieces(v).transpose(1, 2)).transpose(1, 2)
    return fn


def _providers(s: Shape, device: torch.device, shapes: str) -> dict[str, tuple[Callable, bool]]:
    from kernels.kv_cache_attention import kv_cache_attention  # noqa: PLC0415  (imports triton)

    found = {OURS: (lambda q, k, v: kv_cache_attention(q, k, v, s.sink, s.window_start, s.window_len), True)}
    for name, backend in SDPA_BACKENDS.items():
        if name != "math" or shapes == "tiny":
            found[f"cat+sdpa-{name}"] = (_cat_sdpa(s, backend), False)
    return found


def _allocated(fn: Callable, device: torch.device, out_bytes: int) -> int | None:
    """Peak bytes one call allocates beyond its output (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before - out_bytes


def run(shapes: str, device: torch.device) -> list[Row]:
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    rows: list[Row] = []
    warmup, repeats = (3, 10) if device.type == "cuda" else (1, 3)
    for s in SHAPES[shapes]:
        g = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(s.batch, s.queries, s.heads, s.head_dim, generator=g).to(device, s.dtype)
        k, v = (torch.randn(s.batch, s.cache, s.heads, s.head_dim, generator=g).to(device, s.dtype) for _ in range(2))
        usable = {}
        with torch.no_grad():
            for name, (fn, ours) in _providers(s, device, shapes).items():
                try:
                    fn(q, k, v)  # compile / autotune outside the timed region
                    usable[name] = (lambda fn=fn: fn(q, k, v), ours)
                except Exception:  # noqa: BLE001  (a backend that refuses this case is left out)
                    if ours:
                        raise
            ref = usable["cat+sdpa-math" if "cat+sdpa-math" in usable else next(n for n in usable if n != OURS)][0]()
            err = (usable[OURS][0]().float() - ref.float()).abs().max().item()
            case = Case(KERNEL, "fwd", s.as_dict(), flops=_flops(s), bytes=_bytes(s))
            case_rows = measure(case, usable, device, warmup=warmup, repeats=repeats)
            out_bytes = q.numel() * q.element_size()
            for r in case_rows:
                if r.median_ms is not None:
                    r.extra["bytes_allocated"] = _allocated(usable[r.provider][0], device, out_bytes)
                if r.ours:
                    r.extra["max_abs_err_vs_cat_sdpa"] = err
            rows += case_rows
    return rows
