"""Versions of the packages a run depends on (recorded in each run's versions.json; `wanspeed info`)."""
from __future__ import annotations

import importlib.metadata

PACKAGES = ("torch", "deepspeed", "triton", "transformers", "diffusers", "peft", "decord")


def versions() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
