"""A Wan-shaped block-causal generator, timed block by block through its KV cache for each attention
backend (`wanspeed bench causal-block`).

The kernel microbenchmarks (kernels/bench/) time one attention call; this times what a Self-Forcing /
LongLive rollout pays per block: every layer's self-attention over the cached frames plus the new
block (the KV-cache kernel on `triton`, SDPA over the cache on `sdpa`), cross-attention from the
prompt cache, the FFN and the cache writes, with random weights at the preset's real sizes. Each
backend runs the same blocks on the same inputs; the report gives milliseconds per block, each
block's time (the cache grows), the speedup against SDPA measured in the same run, and the largest
difference of the backends' outputs (the check that they computed the same thing).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from kernels.bench.harness import Case, Row, report, synchronize, write_json
from model.causal import CausalConfig, CausalWanModel, frame_blocks
from model.conditioning import Conditioning
from model.config import PRESETS

BACKENDS = ("sdpa", "triton")


@dataclass(frozen=True)
class CausalBlockShape:
    """What to time: a preset, the pixel size, latent frames and the causal layout."""

    preset: str
    height: int
    width: int
    frames: int
    """Latent frames of the rollout (21 = 81 pixel frames)."""
    block: int = 3
    window: int = -1
    """local_attn_size (-1: every earlier frame); LongLive: 12 with sink 3."""
    sink: int = 0
    text_len: int = 512
    batch: int = 1

    def causal(self) -> CausalConfig:
        return CausalConfig(self.block, local_attn_size=self.window, sink_size=self.sink)


SHAPES = {
    "tiny": CausalBlockShape("tiny", 32, 48, frames=6, block=2, window=4, sink=1, text_len=8),
    # Self-Forcing's rollout: 21 latent frames at 480 x 832 (1560 tokens a frame), 3 frames a block
    "wan-1.3b": CausalBlockShape("t2v-1.3B", 480, 832, frames=21),
    # LongLive's long video: a 12-frame window with a 3-frame sink, 8 blocks past the window
    "wan-1.3b-longlive": CausalBlockShape("t2v-1.3B", 480, 832, frames=36, window=12, sink=3),
}


def _model(shape: CausalBlockShape, device: torch.device, dtype: torch.dtype) -> CausalWanModel:
    cfg = PRESETS[shape.preset]
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalWanModel(cfg, shape.causal())
    with torch.no_grad():  # random weights everywhere: the official init zeroes the head
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.to(dtype).eval().requires_grad_(False)


def _inputs(model: CausalWanModel, shape: CausalBlockShape, device: torch.device, dtype: torch.dtype):
    cfg, g = model.config, torch.Generator(device="cpu").manual_seed(1)
    h, w = shape.height // 8, shape.width // 8
    if h % cfg.patch_size[1] or w % cfg.patch_size[2]:
        raise ValueError(f"{shape.height}x{shape.width}: the latent {h}x{w} does not split into "
                         f"{cfg.patch_size[1]}x{cfg.patch_size[2]} patches")
    noise = torch.randn(shape.batch, cfg.in_dim, shape.frames, h, w, generator=g).to(device, dtype)
    context = torch.randn(shape.batch, shape.text_len, cfg.text_dim, generator=g).to(device, dtype)
    return noise, Conditioning(context=context)


@torch.no_grad()
def _rollout(model: CausalWanModel, noise: torch.Tensor, cond: Conditioning, blocks, device) -> tuple[list, torch.Tensor]:
    """Every block through a fresh cache at one timestep; (ms of each block, the last block's output)."""
    caches = model.kv_caches_for(noise, noise.shape[2])
    cross = model.cross_attention_cache(cond)
    t = torch.full((noise.shape[0],), 500.0, device=device)
    times, out = [], None
    for start, end in blocks:
        synchronize(device)
        t0 = time.perf_counter()
        out = model.forward_block(noise[:, :, start:end], t, start, caches, cross)
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times, out


def bench_causal_block(shapes: str, backends: Sequence[str] = BACKENDS, repeats: int = 3, warmup: int = 1,
                       device: Optional[torch.device] = None, overrides: Optional[dict] = None) -> list[Row]:
    """One row per backend: mean ms per block (median over `repeats` of each block's time), with
    per-block times, rollout total and the output difference from the first backend in `extra`."""
    if shapes not in SHAPES:
        raise ValueError(f"unknown shape set {shapes!r}; known: {sorted(SHAPES)}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = replace(SHAPES[shapes], **(overrides or {}))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    blocks = frame_blocks(shape.frames, shape.causal())
    model = _model(shape, device, dtype)
    noise, cond = _inputs(model, shape, device, dtype)
    case = Case("causal_block", "fwd (KV cache)", {**asdict(shape), "blocks": len(blocks),
                                                  "frame_tokens": (shape.height // 16) * (shape.width // 16)})
    rows, reference = [], None
    for name in backends:
        try:
            model.set_attn_backend(name)
            for _ in range(warmup):
                _rollout(model, noise, cond, blocks, device)
            runs = [_rollout(model, noise, cond, blocks, device) for _ in range(repeats)]
        except Exception as exc:  # a backend that cannot run here is reported, not fatal
            rows.append(Row(case.kernel, case.mode, case.shape, name, name != "sdpa", None,
                            error=f"{type(exc).__name__}: {exc}"[:300]))
            continue
        per_block = [statistics.median(r[0][i] for r in runs) for i in range(len(blocks))]
        out = runs[-1][1].float()
        reference = out if reference is None else reference
        rows.append(Row(case.kernel, case.mode, case.shape, name, name != "sdpa", sum(per_block) / len(per_block),
                        repeats=repeats, extra={
                            "per_block_ms": [round(v, 3) for v in per_block], "rollout_ms": round(sum(per_block), 3),
                            "max_abs_diff_vs_first": float((out - reference).abs().max()),
                            "output_max_abs": float(reference.abs().max()), "dtype": str(dtype).removeprefix("torch.")}))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report(case, rows)


def write_results(rows: list[Row], shapes: str, out: Optional[Path] = None) -> Path:
    """JSON beside the kernel results: kernels/bench/results/<device>-causal-block-<shapes>.json."""
    return write_json(rows, out, f"causal-block-{shapes}")


def format_rows(rows: list[Row]) -> str:
    lines = [f"{'backend':<10} {'ms/block':>10} {'rollout ms':>11} {'x sdpa':>7} {'max |diff|':>11}  per-block ms"]
    for r in rows:
        if r.median_ms is None:
            lines.append(f"{r.provider:<10} error: {r.error}")
            continue
        x = f"{r.speedup_vs_best_stock:.2f}" if r.speedup_vs_best_stock else "-"
        lines.append(f"{r.provider:<10} {r.median_ms:>10.3f} {r.extra['rollout_ms']:>11.1f} {x:>7} "
                     f"{r.extra['max_abs_diff_vs_first']:>11.2e}  {r.extra['per_block_ms']}")
    return "\n".join(lines)
