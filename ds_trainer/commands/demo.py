"""`wanspeed demo`: the README's main job on its embedded tiny default (steps in ds_trainer/demo.py)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="where everything goes")
    parser.add_argument("--ranks", type=int, default=2, help="CPU processes under deepspeed (default 2)")
    parser.add_argument("--zero", choices=["2", "3", "3-offload"], default="3")
    parser.add_argument("--clips", type=int, default=8)


def run(args: argparse.Namespace) -> int:
    from ds_trainer import sample  # noqa: PLC0415
    from ds_trainer.commands import cache  # noqa: PLC0415
    from ds_trainer.demo import launch_training, prepare  # noqa: PLC0415
    from ds_trainer.metrics import read_metrics, summarise  # noqa: PLC0415
    from ds_trainer.plot import plot_loss  # noqa: PLC0415

    t0, times = time.perf_counter(), {}
    root = args.out.resolve()
    config = prepare(root, args.clips)
    times["prepare"] = time.perf_counter() - t0
    cache.run(argparse.Namespace(config=str(config), shard_size=32, local_rank=None))
    times["cache"] = time.perf_counter() - t0 - sum(times.values())
    logdir = root / "run"
    launch_training(config, logdir, args.ranks, args.zero, extra=["--no-auto-resume"])
    times["train"] = time.perf_counter() - t0 - sum(times.values())
    png = plot_loss(logdir)
    sample.run(argparse.Namespace(logdir=logdir, checkpoint=None, index=0, steps=None, out=None))
    times["plot+sample"] = time.perf_counter() - t0 - sum(times.values())
    summary = summarise(read_metrics(logdir))
    print(json.dumps({"logdir": str(logdir), "loss_curve": str(png), "sample": str(logdir / "sample.mp4"),
                      "loss": summary, "seconds": {k: round(v, 1) for k, v in times.items()},
                      "total_seconds": round(time.perf_counter() - t0, 1)}, indent=2))
    return 0 if summary and summary["relative_drop"] > 0 else 1
