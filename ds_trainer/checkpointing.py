"""Checkpoints of every job: atomic publish, keep-last-K, verification and auto-resume.

`DIR/<prefix>{step:06d}/` (the prefix is the job's: `checkpoint_opens2v_` for the adapters):
- `deepspeed/<role>/`: `engine.save_checkpoint(exclude_frozen_parameters=True)` of each trainable
  role (optimizer, scheduler; the first role also carries our client state: step, data position);
- `rng_rank<r>.pt` per rank;
- the job's own exports (the adapters' `model.pt`, `adapter.safetensors`, `lora/`), written by
  the `write_exports` callback it passes;
- `meta.json`: step, the job's compatibility key, the world size and ZeRO stage, the size and
  SHA-256 of every file, `"complete": true`.

Everything is written into `.<name>.tmp` and renamed when all ranks are done, so a crash never
leaves a checkpoint that looks complete. Before a resume every file is checked against its
recorded size and hash (a truncated or same-size corrupted shard falls back to the previous
checkpoint, naming the file), and DeepSpeed's own state files are read with
`torch.load(weights_only=True)` (`WeightsOnlyCheckpointEngine`): nothing in a checkpoint runs code.
A checkpoint resumes on another number of ranks (not another ZeRO stage) through DeepSpeed's
universal checkpoint, converted once into `universal/` (ds_trainer/universal_checkpoint.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from safetensors.torch import save_file

from ds_trainer.distributed import barrier, process_rank
from ds_trainer.engine import gathered

log = logging.getLogger(__name__)
DS_SUBDIR = "deepspeed"
ExportCheck = Callable[[Path], Optional[str]]


class IncompatibleCheckpoint(RuntimeError):
    """A checkpoint in the log dir was made by a different job or an incompatible config."""


class NoUsableCheckpoint(RuntimeError):
    """The log dir holds checkpoints of this job, and every one of them is damaged."""


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_dir(logdir: Path, prefix: str, step: int) -> Path:
    return Path(logdir) / f"{prefix}{step:06d}"


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
    barrier()


def save_checkpoint(logdir: Path, prefix: str, step: int, engines: Mapping[str, Any], meta: dict[str, Any],
                    client_state: dict[str, Any], keep_last: int, write_exports: Callable[[Path], None]) -> Path:
    """Write a complete checkpoint for `step` (every rank calls this). `engines`: role -> trainable
    DeepSpeed engine; `write_exports(tmp_dir)` is called on every rank (it may gather) and
    writes the job's own files on rank 0."""
    final = checkpoint_dir(logdir, prefix, step)
    tmp = Path(logdir) / f".{final.name}.tmp"
    if process_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    for role, engine in engines.items():
        engine.save_checkpoint(str(tmp / DS_SUBDIR), tag=role, client_state=client_state,
                               exclude_frozen_parameters=True)
    torch.save(rng_state(), tmp / f"rng_rank{process_rank()}.pt")
    write_exports(tmp)
    barrier()
    if process_rank() == 0:
        files = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": file_digest(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "files": files, "complete": True,
                                                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(logdir, prefix, keep_last)
    barrier()
    return final


def prune(logdir: Path, prefix: str, keep_last: int) -> None:
    for old in list_checkpoints(logdir, prefix)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(logdir: Path, prefix: str) -> list[Path]:
    """Published checkpoint directories, oldest first (temporary ones are not listed)."""
    return sorted(p for p in Path(logdir).glob(f"{prefix}[0-9]*") if p.is_dir())


def verify(ckpt: Path, check_exports: Optional[ExportCheck] = None) -> Optional[str]:
    """None if the checkpoint is complete, every file it lists lies inside it with its recorded
    size and SHA-256, and the job's `check_exports(ckpt)` finds nothing wrong; else why not
    (naming the file)."""
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        return f"meta.json unreadable ({exc})"
    if not isinstance(meta, dict) or meta.get("complete") is not True:
        return "not marked complete"
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return "meta.json lists no files"
    root = ckpt.resolve()
    for rel, record in files.items():
        if not (isinstance(record, dict) and isinstance(record.get("size"), int)
                and isinstance(record.get("sha256"), str)):
            return f"meta.json has no size and content hash for {rel} (written by an older wanspeed?)"
        path = ckpt / rel
        if not path.resolve().is_relative_to(root) or path.is_symlink():
            return f"{rel} points outside the checkpoint"
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != record["size"]:
            return f"{rel} has {path.stat().st_size} bytes, {record['size']} were written"
        if file_digest(path) != record["sha256"]:
            return f"{rel} was changed after it was written (content hash differs)"
    listed = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()} - {"meta.json"}
    extra = sorted(rel for rel in listed - set(files) if not _unfinished_conversion(rel, meta))
    if extra:
        return f"{extra[0]} is not one of the files written" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    return check_exports(ckpt) if check_exports else None


def _unfinished_conversion(rel: str, meta: dict) -> bool:
    """A file of a universal conversion that meta.json does not record (cut short: redone on the
    next resume on another world size, never loaded)."""
    from ds_trainer import universal_checkpoint as universal  # noqa: PLC0415
    top = rel.split("/", 1)[0]
    return top in (universal.UNIVERSAL_TMP, universal.META_TMP) or (
        top == universal.UNIVERSAL_SUBDIR and not universal.recorded(meta))


def describe_difference(theirs: dict, ours: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(key), ours.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += describe_difference(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: checkpoint {a!r} vs this run {b!r}")
    return diffs


def find_resumable(logdir: Path, prefix: str, compat: dict[str, Any], layout: Optional[dict[str, Any]] = None,
                   check_exports: Optional[ExportCheck] = None) -> Optional[Path]:
    """The newest intact checkpoint in `logdir`, or None when there is none at all.

    Damaged ones are skipped with a warning naming the file; when every checkpoint is damaged,
    NoUsableCheckpoint (a silent restart from step 0 would later prune them). One from another
    job or config, or (with `layout`) from another ZeRO stage, raises IncompatibleCheckpoint
    saying what differs and what to do. Another world size is fine: `load_checkpoint` converts."""
    problems = []
    for ckpt in reversed(list_checkpoints(logdir, prefix)):
        problem = verify(ckpt, check_exports)
        if problem:
            log.warning("checkpoint %s is incomplete or damaged (%s); trying the previous one", ckpt.name, problem)
            problems.append(f"{ckpt.name}: {problem}")
            continue
        meta = json.loads((ckpt / "meta.json").read_text())
        diffs = describe_difference(json.loads(json.dumps(meta.get("compat", {}), default=str)),
                                    json.loads(json.dumps(compat, default=str)))
        if diffs:
            raise IncompatibleCheckpoint(
                f"{ckpt} was written by a different job or config; refusing to resume from it "
                f"(use another --logdir or --no-auto-resume). Differences: " + "; ".join(diffs[:6]))
        theirs = {k: meta.get(k) for k in (layout or {})}
        fixed = [k for k in theirs if k != "world_size"]
        if any(theirs[k] != layout[k] for k in fixed):
            raise IncompatibleCheckpoint(
                f"{ckpt} was written with " + ", ".join(f"{k}={v}" for k, v in theirs.items())
                + "; this run has " + ", ".join(f"{k}={v}" for k, v in layout.items())
                + ". A checkpoint resumes on another number of ranks (through DeepSpeed's universal "
                "checkpoint), but not under another ZeRO stage: DeepSpeed keeps the optimizer state of "
                "ZeRO-3 and of ZeRO-1/2 in different layouts and loads each only into its own stage. "
                "Resume with the same --zero, or start a new run in another --logdir (the trained weights "
                "are in the checkpoint's exports).")
        return ckpt
    if problems:
        raise NoUsableCheckpoint(f"every checkpoint in {logdir} is damaged, so the run will not restart from "
                                 f"step 0 over them: " + "; ".join(problems)
                                 + ". Move them away (or use another --logdir) to start fresh.")
    return None


def load_checkpoint(engines: Mapping[str, Any], ckpt: Path, world_size: Optional[int] = None) -> dict[str, Any]:
    """Restore each role's optimizer, scheduler and trainable weights and this rank's RNG;
    returns the client state (saved alike with every role; the first role's is returned).
    When `world_size` differs from the checkpoint's, the state comes from its universal
    checkpoint, converted first if it has none (a collective: every rank calls this)."""
    from ds_trainer import universal_checkpoint as universal  # noqa: PLC0415
    written_by = json.loads((ckpt / "meta.json").read_text()).get("world_size")
    convert = world_size is not None and written_by != world_size
    root = universal.prepare(ckpt, list(engines), world_size) if convert else ckpt / DS_SUBDIR
    clients = []
    for role, engine in engines.items():
        with universal.universal_loading(engine) if convert else contextlib.nullcontext():
            _, client = engine.load_checkpoint(str(root), tag=role, load_module_strict=False,
                                               load_optimizer_states=True, load_lr_scheduler_states=True)
        if client is None:
            raise RuntimeError(f"{ckpt}: DeepSpeed could not load the state of role {role!r}")
        clients.append(client)
    rng = ckpt / f"rng_rank{process_rank()}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, weights_only=True))
    return clients[0]
