"""Paths named by dataset files, kept inside the directory they belong to.

A path read from an annotation (a video's `metadata.path`, a background named after a clip key,
a step-6 pairs file named after a cluster id) must stay under its configured base directory.
The text check (`safe_relpath`) refuses absolute paths and `..`; `resolve_under` also resolves
symlinks, so a symlinked file or directory inside the base that points outside it is refused
too. Either refusal is a `BadSample('unsafe-path')` naming the file, key and field that named
the path, so the dataset counts and skips it.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from data.skips import BadSample


def safe_relpath(rel: str, where: str, field: str = "metadata.path") -> str:
    """A relative POSIX path whose text stays under its base directory (no `/...`, no `..`)."""
    p = PurePosixPath(str(rel).replace("\\", "/"))
    if p.is_absolute() or str(rel).startswith(("/", "\\")) or ".." in p.parts or not p.parts:
        raise BadSample("unsafe-path", where, f"field '{field}' = {rel!r} escapes the base directory")
    return str(p)


def resolve_under(base: str | Path, rel: str, where: str, field: str) -> Path:
    """The real path of `base / rel` (symlinks resolved), or BadSample when it lies outside the
    real `base`. A missing file resolves as far as it exists; the caller's open reports it."""
    real_base = os.path.realpath(base)
    real = os.path.realpath(os.path.join(real_base, safe_relpath(rel, where, field)))
    if os.path.commonpath([real_base, real]) != real_base:
        raise BadSample("unsafe-path", where, f"field '{field}' = {rel!r} resolves to {real}, outside "
                                              f"the base directory {real_base} (a symlink out of it)")
    return Path(real)
