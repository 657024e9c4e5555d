"""`wanspeed info`: what this machine offers (versions, attention backends, presets)."""
from __future__ import annotations

import argparse
import importlib.metadata
import logging

from kernels.attention import available_backends
from model.config import PRESETS

log = logging.getLogger(__name__)
PACKAGES = ("torch", "deepspeed", "triton", "transformers", "diffusers", "peft", "decord")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def versions() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def run(args: argparse.Namespace) -> int:
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
