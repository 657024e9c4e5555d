"""What each role's model state holds on this rank: its parameters (this rank's partition under
ZeRO-3), its optimizer's master weights and Adam moments (partitioned under ZeRO-2/3), by device,
counted from the tensors themselves. The DMD job logs it once per role (`memory_<role>_<what>_mb`),
so a run shows what the generator, the critic and the frozen teacher each cost, beside the per-phase
peaks it logs on GPU.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

MB = 2 ** 20


def _tensors(obj, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors in obj, a tensor or (nested) list / tuple / dict of them."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item, depth + 1)


def _bytes(tensors: Iterable[torch.Tensor], seen: set) -> dict[str, float]:
    """Bytes by device type of the distinct storages of `tensors` (each storage counted once)."""
    out: dict[str, float] = {}
    for t in tensors:
        if t.device.type == "meta" or t.numel() == 0:
            continue
        key = (t.device.type, t.untyped_storage().data_ptr())
        if key in seen:
            continue
        seen.add(key)
        out[t.device.type] = out.get(t.device.type, 0.0) + t.untyped_storage().nbytes()
    return out


def local_parameters(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """This rank's share of every parameter: the ZeRO-3 partition where there is one."""
    for p in module.parameters():
        yield getattr(p, "ds_tensor", p)


def optimizer_tensors(optimizer) -> Iterator[torch.Tensor]:
    """The master weights and states of a DeepSpeed ZeRO optimizer (or a torch one)."""
    if optimizer is None:
        return
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        yield from _tensors(getattr(optimizer, name, None))
    inner = getattr(optimizer, "optimizer", optimizer)
    yield from _tensors(list(getattr(inner, "state", {}).values()))


def role_memory(module: torch.nn.Module, optimizer=None) -> dict[str, float]:
    """{params_mb, optimizer_mb, cpu_mb, accelerator_mb} of one role on this rank: the same keys on
    every rank and device (the step's metrics are all-reduced key by key)."""
    seen: set = set()
    params = _bytes(local_parameters(module), seen)
    optim = _bytes(optimizer_tensors(optimizer), seen)
    cpu = params.get("cpu", 0.0) + optim.get("cpu", 0.0)
    total = sum(params.values()) + sum(optim.values())
    return {"params_mb": sum(params.values()) / MB, "optimizer_mb": sum(optim.values()) / MB,
            "cpu_mb": cpu / MB, "accelerator_mb": (total - cpu) / MB}


def phase_peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def phase_peak_mb(device: torch.device) -> float | None:
    """The GPU's peak allocation since the last phase_peak_reset (None on CPU, where the process's
    peak RSS never resets: there the step's peak_memory_mb is all there is)."""
    return torch.cuda.max_memory_allocated(device) / MB if device.type == "cuda" else None
