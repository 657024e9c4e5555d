"""Resuming on another world size: DeepSpeed's universal checkpoint, made once per checkpoint.

A checkpoint's DeepSpeed state is partitioned over the ranks that wrote it (ZeRO shards of the
trainable parameters' fp32 weights and Adam moments). When a run resumes with another number of
ranks, rank 0 converts each role's state with DeepSpeed's `ds_to_universal` (one file per
parameter and state, whatever the world size) into `<checkpoint>/universal/<role>/` while the
other ranks wait in a collective; then every rank loads it with DeepSpeed's universal loader
(`checkpoint.load_universal`), which partitions it over the new world.

- Our checkpoints hold only the trainable parameters (`exclude_frozen_parameters=True`), and the
  universal loader restores only what the optimizer holds (it never loads module weights), so
  the frozen backbone stays as it was built from the base weights.
- The conversion is written under `.universal.tmp/` and renamed; then the size and SHA-256 of
  every converted file join meta.json (replaced atomically), so a later resume verifies and reuses
  them. The checkpoint's own files are only read. A conversion cut short leaves files meta.json
  does not list, which `checkpointing.verify` ignores and the next resume redoes.
- DeepSpeed's converter and universal loader read with `torch.load(weights_only=False)`; while
  they run, `torch.load` goes through `WeightsOnlyCheckpointEngine` (tensors and DeepSpeed's
  plain state types only), so a pickle planted in a checkpoint is refused, never run.
- The ZeRO stage must not change: DeepSpeed 0.19.8 writes the universal files of ZeRO-3 (bare
  tensors, the ZeRO-3 optimizer's record) and of ZeRO-1/2 (`{"param": ...}` dicts, their
  global state) differently, and each stage's loader reads only its own.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import time
import types
from pathlib import Path
from typing import Any, Iterator

import torch

from ds_trainer.checkpointing import DS_SUBDIR, file_digest
from ds_trainer.distributed import broadcast_object, process_rank
from ds_trainer.safe_checkpoint_engine import WeightsOnlyCheckpointEngine

log = logging.getLogger(__name__)
UNIVERSAL_SUBDIR = "universal"
UNIVERSAL_TMP = ".universal.tmp"
META_TMP = ".meta.json.tmp"


class UniversalConversionError(RuntimeError):
    """DeepSpeed could not convert a checkpoint's state to the universal format."""


def recorded(meta: dict[str, Any]) -> bool:
    """True when meta.json records a finished conversion (its files are then in meta["files"])."""
    return isinstance(meta.get("universal"), dict)


@contextlib.contextmanager
def torch_load_weights_only() -> Iterator[None]:
    """`torch.load` reads like `WeightsOnlyCheckpointEngine.load` (whatever `weights_only` the
    caller passes) until the block ends."""
    real = torch.load
    safe = WeightsOnlyCheckpointEngine.__new__(WeightsOnlyCheckpointEngine)  # load() uses no settings

    def load(f, map_location=None, *args, **kwargs):
        torch.load = real  # the engine's own torch.load call is the real one
        try:
            return safe.load(f, map_location=map_location)
        finally:
            torch.load = load

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def convert(ckpt: Path, roles: list[str]) -> float:
    """Convert each role's `deepspeed/<role>/` of `ckpt` to `universal/<role>/` and record the new
    files in meta.json (rank 0 only, the checkpoint verified); returns the seconds it took."""
    from deepspeed import __version__ as deepspeed_version  # noqa: PLC0415
    from deepspeed.checkpoint import ds_to_universal  # noqa: PLC0415
    meta = json.loads((ckpt / "meta.json").read_text())
    tmp, final = ckpt / UNIVERSAL_TMP, ckpt / UNIVERSAL_SUBDIR
    if recorded(meta):  # one made for other roles: out of the manifest before its files go
        meta.pop("universal")
        meta["files"] = {k: v for k, v in meta["files"].items() if not k.startswith(f"{UNIVERSAL_SUBDIR}/")}
        _write_meta(ckpt, meta)
    for leftover in (tmp, final):  # not recorded in meta.json: an unfinished earlier conversion
        shutil.rmtree(leftover, ignore_errors=True)
    t0 = time.perf_counter()
    for role in roles:
        args = types.SimpleNamespace(  # the options of ds_to_universal's command line
            input_folder=str(ckpt / DS_SUBDIR / role), output_folder=str(tmp / role), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        chatter = io.StringIO()  # the converter prints progress bars and banners
        try:
            with torch_load_weights_only(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                ds_to_universal.main(args)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            log.debug("ds_to_universal output:\n%s", chatter.getvalue())
            raise UniversalConversionError(f"{ckpt / DS_SUBDIR / role}: DeepSpeed's ds_to_universal failed to convert "
                                           f"role {role!r} ({type(exc).__name__}: {exc})") from exc
    (tmp / "latest_universal").unlink(missing_ok=True)  # the converter's pointer; loads name the tag
    os.replace(tmp, final)
    seconds = time.perf_counter() - t0
    files = {str(p.relative_to(ckpt)): {"size": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(final.rglob("*")) if p.is_file()}
    meta["files"].update(files)
    meta["universal"] = {"from_world_size": meta.get("world_size"), "roles": roles, "seconds": round(seconds, 3),
                         "deepspeed": deepspeed_version, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_meta(ckpt, meta)
    return seconds


def _write_meta(ckpt: Path, meta: dict[str, Any]) -> None:
    (ckpt / META_TMP).write_text(json.dumps(meta, indent=2, default=str))
    os.replace(ckpt / META_TMP, ckpt / "meta.json")  # atomic: the old manifest or the new one


def prepare(ckpt: Path, roles: list[str], world_size: int) -> Path:
    """`ckpt/universal` for a resume on `world_size` ranks, converting it on rank 0 when the
    checkpoint has none yet (every rank calls this; the others wait in a broadcast, which also
    carries rank 0's error, so no rank is left waiting)."""
    error = None
    if process_rank() == 0:
        try:
            meta = json.loads((ckpt / "meta.json").read_text())
            if recorded(meta) and set(roles) <= set(meta["universal"].get("roles", [])):
                log.info("%s (world size %s): reusing its universal checkpoint for %d ranks", ckpt.name,
                         meta.get("world_size"), world_size)
            else:
                seconds = convert(ckpt, roles)
                log.info("%s: converted the DeepSpeed state of %d ranks to a universal checkpoint for %d ranks "
                         "(roles %s) in %.2f s", ckpt.name, meta.get("world_size"), world_size,
                         ", ".join(roles), seconds)
        except Exception as exc:  # raised below on every rank
            error = (type(exc).__name__, str(exc))
    error = broadcast_object(error)
    if error:
        raise UniversalConversionError(f"{ckpt}: resuming on {world_size} ranks needs a universal checkpoint, "
                                       f"which could not be made: {error[0]}: {error[1]}")
    return ckpt / UNIVERSAL_SUBDIR


@contextlib.contextmanager
def universal_loading(engine) -> Iterator[None]:
    """DeepSpeed's `checkpoint.load_universal` on `engine` (read only when loading), with
    weights-only reads, for the block."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        with torch_load_weights_only():
            yield
    finally:
        config.load_universal_checkpoint = before
