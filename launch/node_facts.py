"""What one rank's node has that a multi-node run depends on: versions, GPUs, network interfaces,
InfiniBand devices and the variables that steer NCCL and Gloo (gathered by launch/rank_check.py,
judged by launch/checks.py)."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "deepspeed", "triton")
NETWORK_VARIABLE_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_")
INFINIBAND_SYSFS = Path("/sys/class/infiniband")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def gpu_facts() -> dict[str, Any]:
    import torch  # noqa: PLC0415
    nccl = None
    if torch.cuda.is_available():
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except (AttributeError, RuntimeError):
            nccl = None
    return {"cuda": torch.version.cuda, "nccl": nccl,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [],
            "nvidia_device_files": Path("/dev/nvidia0").exists()}


def interfaces() -> dict[str, dict[str, Any]]:
    """name -> {up, ipv4}; psutil ships with DeepSpeed."""
    import psutil  # noqa: PLC0415
    stats = psutil.net_if_stats()
    out = {}
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        out[name] = {"up": bool(stats[name].isup) if name in stats else False,
                     "ipv4": [a.address for a in addrs if a.family == socket.AF_INET]}
    return out


def collect() -> dict[str, Any]:
    """This rank's facts (JSON-serialisable)."""
    ib = sorted(p.name for p in INFINIBAND_SYSFS.iterdir()) if INFINIBAND_SYSFS.is_dir() else []
    return {"host": socket.gethostname(), "versions": package_versions(), **gpu_facts(),
            "interfaces": interfaces(), "infiniband": ib,
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(NETWORK_VARIABLE_PREFIXES)}}
