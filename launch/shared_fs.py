"""Is a directory the same one on every rank? (A collective: every rank calls it.)

Multi-node runs need the log dir and the encoder cache on a filesystem every node sees: rank 0
creates the log dir and renames each finished checkpoint, every rank writes its shards into it,
and every rank reads the cache. On a node-local path the run would train, then leave broken
checkpoints; this check makes it an error at start instead.

Rank 0 writes a file with a fresh token into the directory and every rank looks for it (for a
while, for network filesystems that publish new names late). Where rank 0 cannot write (a
read-only cache), the ranks compare their listings of the directory instead.
"""
from __future__ import annotations

import secrets
import socket
import time
from pathlib import Path
from typing import Optional

import torch.distributed as dist

PROBE_PREFIX = ".wanspeed_shared_probe_"
VISIBILITY_WAIT_S = 2.0


class SharedDirectoryError(RuntimeError):
    """A directory that not every rank sees; raised on every rank with the same message."""


def _listing(path: Path) -> Optional[list[tuple[str, int]]]:
    try:
        return sorted((p.name, p.stat().st_size if p.is_file() else -1) for p in path.iterdir()
                      if not p.name.startswith(PROBE_PREFIX))
    except OSError:
        return None


def _sees(probe: Path, token: str, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if probe.read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shared_directory_problem(path: str | Path, what: str, wait_s: float = VISIBILITY_WAIT_S) -> Optional[str]:
    """None when every rank sees the same directory `path`; else one line naming the ranks (and
    their hosts) that do not. Rank 0 creates `path` if it is missing. Returns None outside a
    process group (a single process sees its own files)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    path, rank, host = Path(path), dist.get_rank(), socket.gethostname()
    token = None
    if rank == 0:
        try:
            path.mkdir(parents=True, exist_ok=True)
            token = secrets.token_hex(16)
            probe = path / f"{PROBE_PREFIX}{token}"
            probe.write_text(token)
        except OSError:
            token = None  # read-only: compare listings
    token = _gather(token)[0]
    if token is not None:
        probe = path / f"{PROBE_PREFIX}{token}"
        views = _gather((host, _sees(probe, token, wait_s)))
        if rank == 0:
            probe.unlink(missing_ok=True)
        blind = [f"{r} ({h})" for r, (h, ok) in enumerate(views) if not ok]
        check = "cannot see the file rank 0 ({host0}) wrote there"
    else:
        views = _gather((host, _listing(path)))
        blind = [f"{r} ({h})" for r, (h, seen) in enumerate(views) if seen is None or seen != views[0][1]]
        check = "cannot see the contents rank 0 ({host0}) sees there"
    dist.barrier()
    if not blind:
        return None
    plural = len(blind) > 1
    check = check.format(host0=views[0][0])
    return (f"{what} {path} is not shared by every node: rank{'s' if plural else ''} {', '.join(blind)} "
            f"{check}; multi-node runs need the log dir and the cache on a "
            f"filesystem every node sees")


def require_shared_directories(dirs: dict[str, Optional[str | Path]]) -> None:
    """`SharedDirectoryError` on every rank unless each given directory is shared (None: skipped)."""
    for what, path in dirs.items():
        if path is not None:
            problem = shared_directory_problem(path, what)
            if problem:
                raise SharedDirectoryError(problem)
