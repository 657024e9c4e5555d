"""Adapter checkpoints: export, DeepSpeed state, atomic publish, keep-last-K and auto-resume.

`DIR/checkpoint_opens2v_{step:06d}/`:
- `model.pt` = {"generator": trainable weights only} (the seed's format; `load_state_dict(strict=False)`
  into a freshly built model), `adapter.safetensors` (the same tensors), `lora/` (a peft adapter
  directory) when LoRA is on;
- `deepspeed/` = `engine.save_checkpoint(exclude_frozen_parameters=True)`: optimizer, scheduler,
  and our client state (step, data sampler position); `rng_rank<r>.pt` per rank;
- `meta.json`: step, the run's compatibility key, file sizes, `"complete": true`.

Everything is written into `.checkpoint_opens2v_XXXXXX.tmp` and renamed when all ranks are done, so
a crash never leaves a checkpoint that looks complete. Under ZeRO-3 only the trainable parameters
are gathered for the export (never the frozen backbone).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ds_trainer.engine import gathered, process_rank

log = logging.getLogger(__name__)
PREFIX = "checkpoint_opens2v_"
DS_SUBDIR, DS_TAG = "deepspeed", "state"


class IncompatibleCheckpoint(RuntimeError):
    """A checkpoint in the log dir was made by a different job or an incompatible config."""


def checkpoint_dir(logdir: Path, step: int) -> Path:
    return logdir / f"{PREFIX}{step:06d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    """This rank's RNG states in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def export_trainable(model: torch.nn.Module, stage: int) -> Optional[dict[str, torch.Tensor]]:
    """Full tensors of the trainable parameters on rank 0 (None elsewhere); gathers only those."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with gathered([p for _, p in named], stage):
        if process_rank() != 0:
            return None
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in named}


def export_full(model: torch.nn.Module, stage: int, path: Path) -> None:
    """Every parameter (frozen and trained) to one safetensors file on rank 0, gathering one
    module at a time so no rank but 0 ever holds the whole model."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        params = list(module.named_parameters(recurse=False))
        with gathered([p for _, p in params], stage):
            if process_rank() == 0:
                out.update({f"{name}.{n}" if name else n: p.detach().to("cpu", copy=True) for n, p in params})
    if process_rank() == 0:
        save_file(out, str(path))
    _barrier()


def _lora_state(model, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The peft adapter state dict (keys as `get_peft_model_state_dict` names them)."""
    from peft import get_peft_model_state_dict  # noqa: PLC0415
    state = get_peft_model_state_dict(model, state_dict={k: v for k, v in weights.items() if "lora_" in k})
    return {f"base_model.model.{k}": v for k, v in state.items()}  # PeftModel.save_pretrained's key layout


def save_checkpoint(engine, model, step: int, logdir: Path, meta: dict[str, Any], client_state: dict[str, Any],
                    stage: int, keep_last: int, lora: bool) -> Path:
    """Write a complete checkpoint for `step` (every rank calls this)."""
    final = checkpoint_dir(logdir, step)
    tmp = logdir / f".{final.name}.tmp"
    if process_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(tmp / DS_SUBDIR), tag=DS_TAG, client_state=client_state,
                           exclude_frozen_parameters=True)
    torch.save(rng_state(), tmp / f"rng_rank{process_rank()}.pt")
    weights = export_trainable(model, stage)
    if process_rank() == 0:
        torch.save({"generator": weights}, tmp / "model.pt")
        save_file({k: v for k, v in weights.items() if "lora_" not in k}, str(tmp / "adapter.safetensors"))
        if lora:
            (tmp / "lora").mkdir()
            save_file(_lora_state(model, weights), str(tmp / "lora" / "adapter_model.safetensors"))
            model.peft_config["default"].save_pretrained(str(tmp / "lora"))
    _barrier()
    if process_rank() == 0:
        sizes = {str(p.relative_to(tmp)): p.stat().st_size for p in tmp.rglob("*") if p.is_file()}
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "files": sizes, "complete": True,
                                                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(logdir, keep_last)
    _barrier()
    return final


def prune(logdir: Path, keep_last: int) -> None:
    for old in list_checkpoints(logdir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(logdir: Path) -> list[Path]:
    """Published checkpoint directories, oldest first (temporary ones are not listed)."""
    return sorted(p for p in Path(logdir).glob(f"{PREFIX}[0-9]*") if p.is_dir())


def verify(ckpt: Path) -> Optional[str]:
    """None if the checkpoint is complete and every file has its recorded size, else why not."""
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"meta.json unreadable ({exc})"
    if not meta.get("complete"):
        return "not marked complete"
    for rel, size in meta.get("files", {}).items():
        path = ckpt / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, {size} were written"
    try:
        torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a corrupt zip / pickle
        return f"model.pt unreadable ({exc})"
    return None


def describe_difference(theirs: dict, ours: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(key), ours.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += describe_difference(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: checkpoint {a!r} vs this run {b!r}")
    return diffs


def find_resumable(logdir: Path, compat: dict[str, Any]) -> Optional[Path]:
    """The newest complete checkpoint in `logdir`; broken ones are skipped with a warning;
    one from another job or config raises IncompatibleCheckpoint saying what differs."""
    for ckpt in reversed(list_checkpoints(logdir)):
        problem = verify(ckpt)
        if problem:
            log.warning("checkpoint %s is incomplete or damaged (%s); trying the previous one", ckpt.name, problem)
            continue
        meta = json.loads((ckpt / "meta.json").read_text())
        diffs = describe_difference(json.loads(json.dumps(meta.get("compat", {}), default=str)),
                                    json.loads(json.dumps(compat, default=str)))
        if diffs:
            raise IncompatibleCheckpoint(
                f"{ckpt} was written by a different job or config; refusing to resume from it "
                f"(use another --logdir or --no-auto-resume). Differences: " + "; ".join(diffs[:6]))
        return ckpt
    return None


def load_checkpoint(engine, ckpt: Path) -> dict[str, Any]:
    """Restore optimizer, scheduler, trainable weights and this rank's RNG; returns client state."""
    _, client = engine.load_checkpoint(str(ckpt / DS_SUBDIR), tag=DS_TAG, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=True)
    if client is None:
        raise RuntimeError(f"{ckpt}: DeepSpeed could not load its state")
    rng = ckpt / f"rng_rank{process_rank()}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, weights_only=True))
    return client
