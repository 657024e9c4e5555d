"""Benchmark: fused qk-RMSNorm + 3D RoPE against Wan's official formulation and our reference.

Providers, timed side by side in one run:
- `ours (C++/CUDA ext)`: kernels.qk_norm_rope with the ninja-built extension.
- `official (f64 complex loop)`: Wan2.1's WanRMSNorm then `rope_apply` as upstream writes it
  (per-sample loop, float64 complex multiply, `.float()` at the end).
- `reference (PyTorch)`: `qk_norm_rope_ref`, the readable formulation model/ uses.
- `reference (torch.compile)`: the same, compiled (GPU only; on CPU it would need a compiler
  run of its own and measures little).

The op is memory-bound: bytes = x read + out written (+ grad_out read and grad_x written in
the backward) + the tables and rstd. FLOPs are not reported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kernels.bench.harness import Case, Row, measure
from kernels.qk_norm_rope import build, qk_norm_rope, qk_norm_rope_ref

KERNEL = "qk_norm_rope"
OFFICIAL = "official (f64 complex loop)"
EPS = 1e-6
ROPE_THETA = 10000.0
ROPE_POSITIONS = 1024  # Wan's freqs table length per axis


@dataclass(frozen=True)
class Shape:
    batch: int
    grid: tuple[int, int, int]  # latent (F, H, W) after patching: L = F * H * W tokens
    dim: int
    heads: int

    @property
    def tokens(self) -> int:
        f, h, w = self.grid
        return f * h * w

    def as_dict(self) -> dict:
        return {"B": self.batch, "L": self.tokens, "dim": self.dim, "N": self.heads}


SHAPES: dict[str, list[Shape]] = {
    "tiny": [Shape(2, (3, 8, 10), 512, 4), Shape(1, (2, 5, 7), 240, 24)],  # D=128; D=10
    # a ~8k-token 1.3B slice that 2 CPU cores time in seconds, not minutes
    "wan-1.3b-8k": [Shape(1, (5, 30, 52), 1536, 12)],
    "wan-1.3b": [Shape(1, (21, 30, 52), 1536, 12)],   # 480x832, 81 frames: 32760 tokens
    "wan-14b": [Shape(1, (21, 30, 52), 5120, 40)],
}


# ---- Wan2.1's official formulation (wan/modules/model.py), kept as upstream writes it ----------
def _rope_params(max_seq_len: int, dim: int) -> torch.Tensor:
    freqs = torch.outer(torch.arange(max_seq_len),
                        1.0 / torch.pow(ROPE_THETA, torch.arange(0, dim, 2).to(torch.float64).div(dim)))
    return torch.polar(torch.ones_like(freqs), freqs)


def official_freqs(head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """WanModel.freqs: complex128 [1024, D/2] (t, h, w axes concatenated)."""
    d = head_dim
    return torch.cat([_rope_params(ROPE_POSITIONS, d - 4 * (d // 6)), _rope_params(ROPE_POSITIONS, 2 * (d // 6)),
                      _rope_params(ROPE_POSITIONS, 2 * (d // 6))], dim=1).to(device)


def official_rope_apply(x: torch.Tensor, grid_sizes: torch.Tensor, freqs: torch.Tensor,
                        keep_float64: bool = False) -> torch.Tensor:
    """Upstream's per-sample float64 complex loop; returns fp32 as upstream does (or keeps a
    float64 result with `keep_float64`, for the tests' float64 parity)."""
    n, c = x.size(2), x.size(3) // 2
    freqs = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    output = []
    for i, (f, h, w) in enumerate(grid_sizes.tolist()):
        seq_len = f * h * w
        x_i = torch.view_as_complex(x[i, :seq_len].to(torch.float64).reshape(seq_len, n, -1, 2))
        freqs_i = torch.cat([
            freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
            freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ], dim=-1).reshape(seq_len, 1, -1)
        x_i = torch.view_as_real(x_i * freqs_i).flatten(2)
        x_i = torch.cat([x_i, x[i, seq_len:]])
        output.append(x_i)
    out = torch.stack(output)
    return out if keep_float64 else out.float()


def official_qk_norm_rope(x, weight, grid_sizes, freqs, num_heads: int, eps: float = EPS) -> torch.Tensor:
    """`rope_apply(norm_q(q).view(b, s, n, d), grid_sizes, freqs)` as WanSelfAttention does."""
    y = x.float()
    normed = (y * torch.rsqrt(y.pow(2).mean(dim=-1, keepdim=True) + eps)).type_as(x) * weight
    return official_rope_apply(normed.unflatten(-1, (num_heads, -1)), grid_sizes, freqs)


def table_from_freqs(freqs: torch.Tensor, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The official per-token angles for one (F, H, W) grid as (cos, sin), each [F*H*W, D/2]."""
    f, h, w = grid
    c = freqs.shape[1]
    parts = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    per_token = torch.cat([parts[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
                           parts[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
                           parts[2][:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(f * h * w, c)
    return per_token.real.contiguous(), per_token.imag.contiguous()


# ---- cases ----------------------------------------------------------------------------------------
def _bytes(s: Shape, dtype: torch.dtype, mode: str) -> float:
    n = s.batch * s.tokens * s.dim
    x_b, out_b = torch.finfo(dtype).bits // 8, 4
    table = 2 * s.tokens * (s.dim // s.heads // 2) * 4
    fwd = n * (x_b + out_b) + table + s.batch * s.tokens * 4
    if mode == "fwd":
        return float(fwd)
    return float(fwd + n * (out_b + 2 * x_b) + table + s.batch * s.tokens * 4)


def _unavailable(reason: str) -> Callable:
    def fail():
        raise RuntimeError(reason)
    return fail


def _extension_problem(device: torch.device) -> str:
    """Why `ours` would not run the extension on `device` ("" when it would). Builds it now so
    that the build does not land in a timing."""
    try:
        ext = build()
    except Exception as exc:  # reported as the provider's error row
        return f"extension build failed: {exc}"[:300]
    if device.type == "cuda" and not ext.with_cuda:
        return "extension built without CUDA kernels (no nvcc)"
    return ""


def _providers(s: Shape, dtype: torch.dtype, device: torch.device, mode: str,
               problem: str) -> dict[str, tuple[Callable, bool]]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(s.batch, s.tokens, s.dim, generator=gen).to(device, dtype)
    weight = (1 + 0.1 * torch.randn(s.dim, generator=gen)).to(device, dtype)
    freqs = official_freqs(s.dim // s.heads, device)
    grid_sizes = torch.tensor([s.grid] * s.batch)
    cos, sin = (t.float() for t in table_from_freqs(freqs, s.grid))
    grad = torch.randn(s.batch, s.tokens, s.heads, s.dim // s.heads, generator=gen).to(device)
    if mode == "fwd+bwd":
        x.requires_grad_(True)
        weight.requires_grad_(True)

    def call(fn: Callable) -> Callable:
        if mode == "fwd":
            return lambda: fn()
        return lambda: torch.autograd.backward(fn(), grad)

    fns = {
        "ours (C++/CUDA ext)": (_unavailable(problem) if problem else
                                lambda: qk_norm_rope(x, weight, cos, sin, s.heads, EPS), True),
        OFFICIAL: (lambda: official_qk_norm_rope(x, weight, grid_sizes, freqs, s.heads), False),
        "reference (PyTorch)": (lambda: qk_norm_rope_ref(x, weight, cos, sin, s.heads, EPS), False),
    }
    if device.type == "cuda":
        compiled = torch.compile(qk_norm_rope_ref, dynamic=False)
        fns["reference (torch.compile)"] = (lambda: compiled(x, weight, cos, sin, s.heads, EPS), False)
    return {name: (call(fn), ours) for name, (fn, ours) in fns.items()}


def run(shapes: str, device: torch.device) -> list[Row]:
    """Time every provider on every shape of the set, fwd and fwd+bwd (bf16 inputs). Each row's
    `extra["speedup_vs_official"]` is the official formulation's time over the row's."""
    problem = _extension_problem(device)
    dtype = torch.bfloat16
    rows: list[Row] = []
    for s in SHAPES[shapes]:
        for mode in ("fwd", "fwd+bwd"):
            case = Case(KERNEL, mode, {**s.as_dict(), "dtype": str(dtype).removeprefix("torch.")},
                        bytes=_bytes(s, dtype, mode))
            repeats = 10 if s.tokens * s.dim < 2**24 or device.type == "cuda" else 3
            case_rows = measure(case, _providers(s, dtype, device, mode, problem), device, warmup=2, repeats=repeats)
            official = next((r.median_ms for r in case_rows if r.provider == OFFICIAL), None)
            for r in case_rows:
                if official and r.median_ms:
                    r.extra["speedup_vs_official"] = official / r.median_ms
            rows += case_rows
    return rows
