"""`wanspeed sample --logdir DIR`: a short video from a trained run, as an mp4 (ds_trainer/sample.py)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--logdir", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the newest complete one")
    parser.add_argument("--index", type=int, default=0, help="dataset sample giving the prompt and subject")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default DIR/sample.mp4")


def run(args: argparse.Namespace) -> int:
    from ds_trainer import sample  # noqa: PLC0415  (torch, the model, the encoders)

    return sample.run(args)
