"""`wanspeed plot DIR`: the loss curve of a run (raw and smoothed) as a PNG (ds_trainer/plot.py)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logdir", type=Path, help="a run directory (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default DIR/loss.png)")
    parser.add_argument("--smooth", type=int, default=10, help="moving-average window in steps")


def run(args: argparse.Namespace) -> int:
    from ds_trainer.plot import plot_loss  # noqa: PLC0415

    print(f"wrote {plot_loss(args.logdir, args.out, args.smooth)}")
    return 0
