"""Microbenchmark harness shared by every `kernels/bench/<stem>.py`.

A bench module declares shape sets and providers; `measure` times each provider side by side in
one run (median of repeats after warm-up, CUDA-synchronised on GPU), and `report` adds achieved
TFLOPS / GB/s from the case's FLOP and byte formulas plus the speedup of every provider against
the best *stock* provider (everything that is not ours). Results go to JSON with the device and
versions, and a short table is printed.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.nn.attention import SDPBackend

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Every SDPA backend a stock provider may be pinned to (those that cannot run a case are skipped).
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


@dataclass
class Case:
    """One shape to time. flops/bytes: per call of the measured mode (fwd or fwd+bwd)."""

    kernel: str
    mode: str                      # "fwd" or "fwd+bwd"
    shape: dict
    flops: float = 0.0
    bytes: float = 0.0


@dataclass
class Row:
    kernel: str
    mode: str
    shape: dict
    provider: str
    ours: bool
    median_ms: Optional[float]
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    speedup_vs_best_stock: Optional[float] = None
    error: Optional[str] = None
    repeats: int = 0
    extra: dict = field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU): timings end here."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_shapes(device: torch.device) -> str:
    """The shape set a bench runs without --shapes: the real model's on a GPU, tiny on CPU."""
    return "wan-1.3b" if device.type == "cuda" else "tiny"


def time_call(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(case: Case, providers: dict[str, tuple[Callable[[], object], bool]], device: torch.device,
            warmup: int = 3, repeats: int = 10) -> list[Row]:
    """Time every provider (name -> (callable, is_ours)) on one case; failures become rows with
    an error instead of aborting the run."""
    rows = []
    for name, (fn, ours) in providers.items():
        try:
            ms = time_call(fn, device, warmup, repeats)
            rows.append(Row(case.kernel, case.mode, case.shape, name, ours, ms, repeats=repeats))
        except Exception as exc:  # a provider that cannot run here (OOM, unsupported) is reported
            rows.append(Row(case.kernel, case.mode, case.shape, name, ours, None, error=f"{type(exc).__name__}: {exc}"[:300]))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report(case, rows)


def report(case: Case, rows: list[Row]) -> list[Row]:
    """Fill TFLOPS, GB/s and speedup against the fastest stock provider."""
    stock = [r.median_ms for r in rows if not r.ours and r.median_ms]
    best = min(stock) if stock else None
    for r in rows:
        if r.median_ms:
            r.tflops = case.flops / (r.median_ms * 1e-3) / 1e12 if case.flops else None
            r.gbps = case.bytes / (r.median_ms * 1e-3) / 1e9 if case.bytes else None
            r.speedup_vs_best_stock = best / r.median_ms if best else None
    return rows


def environment() -> dict:
    import triton  # noqa: PLC0415
    env = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, sm_count=p.multi_processor_count, cuda=torch.version.cuda,
                   memory_gib=round(p.total_memory / 2**30, 1))
    else:
        env["device"] = f"cpu ({platform.processor() or 'unknown'})"
    return env


def write_json(rows: list[Row], out: Optional[Path], shapes: str) -> Path:
    """Write results (plus environment) to `out` or kernels/bench/results/<device>-<shapes>.json."""
    env = environment()
    if out is None:
        tag = "cuda-" + env["device"].replace(" ", "_") if torch.cuda.is_available() else "cpu"
        out = RESULTS_DIR / f"{tag}-{shapes}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "shapes": shapes, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                               "rows": [asdict(r) for r in rows]}, indent=2))
    return out


def format_table(rows: list[Row]) -> str:
    lines = [f"{'kernel':<24} {'mode':<8} {'shape':<34} {'provider':<28} {'ms':>9} {'TFLOPS':>7} {'GB/s':>8} {'x best stock':>12}"]
    for r in rows:
        shape = ",".join(f"{k}={v}" for k, v in r.shape.items())[:34]
        if r.median_ms is None:
            lines.append(f"{r.kernel:<24} {r.mode:<8} {shape:<34} {r.provider:<28} {'error: ' + (r.error or '')[:40]}")
            continue
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        lines.append(f"{r.kernel:<24} {r.mode:<8} {shape:<34} {r.provider + (' *' if r.ours else ''):<28} "
                     f"{r.median_ms:>9.3f} {fmt(r.tflops, '>7.2f')} {fmt(r.gbps, '>8.1f')} {fmt(r.speedup_vs_best_stock, '>12.2f')}")
    return "\n".join(lines)
