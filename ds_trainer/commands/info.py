"""`wanspeed info`: what this machine offers (versions, attention backends, presets)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    from ds_trainer.info import versions  # noqa: PLC0415
    from kernels.attention import available_backends  # noqa: PLC0415
    from model.config import PRESETS  # noqa: PLC0415

    del args
    lines = ["packages:"] + [f"  {k:<13} {v}" for k, v in versions().items()]
    lines.append("attention backends:")
    lines += [f"  {name:<13} {'available' if why is None else 'unavailable: ' + why}"
              for name, why in available_backends().items()]
    lines.append("model presets:")
    lines += [f"  {name:<13} {c.model_type} dim {c.dim}, {c.num_layers} layers, {c.num_heads} heads"
              for name, c in PRESETS.items()]
    print("\n".join(lines))
    return 0
