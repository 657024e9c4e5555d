"""Benchmark: block-causal self-attention (Self-Forcing / LongLive training masks).

Work per case (B batch, N heads, D head dim, P = layout.visible_pairs() kept (query, key) pairs):
- FLOPs, fwd: 4 * B * N * P * D (QK^T and PV over the visible pairs only; what the dense
  providers compute on masked pairs is not credited). fwd+bwd: x 3.5 (backward = 2.5 x forward,
  the Triton tutorial's convention).
- Bytes (minimum traffic), fwd: q, k, v read + o written; fwd+bwd adds q, k, v, o, dO read and
  dq, dk, dv written.

Providers, side by side in one run:
- `triton-block-causal` (ours): kernels.block_causal_attention (no mask tensor, masked tiles skipped).
- `sdpa-<backend>-mask`: `F.scaled_dot_product_attention` with the dense [L, L] bool mask
  (built once, outside the timed region), pinned to each SDPA backend that runs it (flash takes
  no mask; math only at `tiny`, it materialises [B, N, L, L] scores).
- `flex-compiled` (GPU only): `torch.compile(flex_attention)` with a BlockMask from
  `flex_mask_mod`, built once outside the timed region (default compile mode: max-autotune
  would eat the device time budget).
- `sdpa-per-block`: one unmasked SDPA call per query block over its visible keys (a slice, or
  a concatenation when a block sees several ranges), outputs concatenated.
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
from kernels.block_causal_layout import BlockCausalLayout, block_causal_mask, flex_mask_mod

KERNEL = "block_causal_attention"
OURS = "triton-block-causal"
BWD_FLOPS_FACTOR = 2.5
FRAME_TOKENS, WAN_FRAMES, FRAMES_PER_BLOCK = 1560, 21, 3   # 480x832, 81 frames, Self-Forcing blocks
# flash takes no arbitrary mask: masked SDPA can only run on these
MASKED_SDPA_BACKENDS = {k: v for k, v in SDPA_BACKENDS.items() if k != "flash"}


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    head_dim: int
    layout: BlockCausalLayout   # torch-only: importing it loads no Triton
    dtype: torch.dtype
    name: str

    def as_dict(self) -> dict:
        return {"B": self.batch, "L": self.layout.seq_len, "N": self.heads, "D": self.head_dim,
                "mask": self.name, "dtype": str(self.dtype).removeprefix("torch.")}


def _shapes(name: str) -> list[Shape]:
    L_ = BlockCausalLayout
    if name == "tiny":
        return [Shape(1, 2, 32, L_(7, 6, 2), torch.float32, "blk2"),
                Shape(1, 2, 32, L_(5, 6, 2, True, local_frames=2, sink_frames=1, teacher_forcing=True),
                      torch.float32, "tf-i2v-local2-sink1")]
    heads = {"wan-1.3b": 12, "wan-14b": 40}[name]
    shapes = [Shape(1, heads, 128, L_(FRAME_TOKENS, WAN_FRAMES, FRAMES_PER_BLOCK), torch.bfloat16, "blk3")]
    if name == "wan-1.3b":  # LongLive: sink 3 + window 9 (local_attn_size 12 counts the sink)
        shapes.append(Shape(1, heads, 128, L_(FRAME_TOKENS, WAN_FRAMES, FRAMES_PER_BLOCK, local_frames=9,
                                              sink_frames=3), torch.bfloat16, "blk3-local9-sink3"))
    return shapes


def _flops(s: Shape, mode: str) -> float:
    fwd = 4.0 * s.batch * s.heads * s.head_dim * s.layout.visible_pairs()
    return fwd if mode == "fwd" else fwd * (1 + BWD_FLOPS_FACTOR)


def _bytes(s: Shape, mode: str) -> float:
    t = s.batch * s.layout.seq_len * s.heads * s.head_dim * (torch.finfo(s.dtype).bits // 8)
    return float(4 * t if mode == "fwd" else 12 * t)


# ---- providers: fn(q, k, v) on [B, L, N, D] ----------------------------------------------
def _sdpa_masked(backend, mask) -> Callable:
    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  attn_mask=mask).transpose(1, 2)
    return fn


def _per_block(layout) -> Callable:
    blocks = layout.query_blocks()

    def fn(q, k, v):
        outs = []
        for q0, q1, ranges in blocks:
            kb = torch.cat([k[:, a:b] for a, b in ranges], 1) if len(ranges) > 1 else k[:, ranges[0][0]:ranges[0][1]]
            vb = torch.cat([v[:, a:b] for a, b in ranges], 1) if len(ranges) > 1 else v[:, ranges[0][0]:ranges[0][1]]
            outs.append(F.scaled_dot_product_attention(q[:, q0:q1].transpose(1, 2), kb.transpose(1, 2),
                                                       vb.transpose(1, 2)).transpose(1, 2))
        return torch.cat(outs, 1)
    return fn


def _flex(layout, device) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: PLC0415

    block_mask = create_block_mask(flex_mask_mod(layout, device), None, None, layout.seq_len, layout.seq_len,
                                   device=device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def fn(q, k, v):
        return compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                        block_mask=block_mask).transpose(1, 2)
    return fn


def _providers(s: Shape, device: torch.device, shapes: str) -> dict[str, tuple[Callable, bool]]:
    from kernels.block_causal_attention import block_causal_attention  # noqa: PLC0415  (imports triton)

    found: dict[str, tuple[Callable, bool]] = {}
    if device.type == "cuda" or shapes == "tiny":
        found[OURS] = (lambda q, k, v: block_causal_attention(q, k, v, s.layout), True)
    mask = block_causal_mask(s.layout, device)  # built once, outside every timed call
    for name, backend in MASKED_SDPA_BACKENDS.items():
        if name != "math" or shapes == "tiny":
            found[f"sdpa-{name}-mask"] = (_sdpa_masked(backend, mask), False)
    if device.type == "cuda":
        try:
            found["flex-compiled"] = (_flex(s.layout, device), False)
        except Exception:  # noqa: BLE001  (no flex on this torch/device: left out)
            pass
    found["sdpa-per-block"] = (_per_block(s.layout), False)
    return found


def _inputs(s: Shape, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    make = lambda: torch.randn(s.batch, s.layout.seq_len, s.heads, s.head_dim, generator=g).to(device, s.dtype)  # noqa: E731
    return [make().requires_grad_() for _ in range(3)] + [make()]


def _timed(fn: Callable, q, k, v, do, mode: str) -> Callable:
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(q, k, v)
        return call
    return lambda: torch.autograd.grad(fn(q, k, v), [q, k, v], do)


def _runs(fn, q, k, v) -> bool:
    try:
        with torch.no_grad():
            fn(q, k, v)
        return True
    except Exception:  # noqa: BLE001  (unsupported backend / shape / OOM: left out of the table)
        return False


def run(shapes: str, device: torch.device) -> list[Row]:
    """Time every provider on every shape, fwd and fwd+bwd. Ours carries
    `extra["max_abs_err_vs_sdpa_per_block"]` (a fast but wrong kernel shows)."""
    if device.type == "cpu":  # triton.jit picks the interpreter when our kernels are defined
        os.environ.setdefault("TRITON_INTERPRET", "1")
    rows: list[Row] = []
    warmup, repeats = (3, 10) if device.type == "cuda" else (1, 3)
    for s in _shapes(shapes):
        q, k, v, do = _inputs(s, device)
        usable = {n: (fn, ours) for n, (fn, ours) in _providers(s, device, shapes).items() if ours or _runs(fn, q, k, v)}
        err = None
        if OURS in usable:
            with torch.no_grad():
                err = (usable[OURS][0](q, k, v).float() - usable["sdpa-per-block"][0](q, k, v).float()).abs().max().item()
        for mode in ("fwd", "fwd+bwd"):
            case = Case(KERNEL, mode, s.as_dict(), flops=_flops(s, mode), bytes=_bytes(s, mode))
            providers = {n: (_timed(fn, q, k, v, do, mode), ours) for n, (fn, ours) in usable.items()}
            for r in measure(case, providers, device, warmup=warmup, repeats=repeats):
                r.extra["visible_fraction"] = round(s.layout.visible_pairs() / s.layout.seq_len ** 2, 4)
                if r.ours and err is not None:
                    r.extra["max_abs_err_vs_sdpa_per_block"] = err
                rows.append(r)
        del q, k, v, do, usable
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
