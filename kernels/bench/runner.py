"""Run the chosen kernel microbenchmarks, side by side with the stock paths, and write their JSON
(`wanspeed bench kernels`).

Each bench module has `run(shapes: str, device) -> list[Row]` and names its shape sets in its
`SHAPES` table; a set runs on the benches that define it.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from kernels.bench.harness import Row, default_shapes, write_json

log = logging.getLogger(__name__)
# bench name -> module with `run(shapes: str, device: torch.device) -> list[Row]`
BENCHES: dict[str, str] = {
    "block_causal_attention": "kernels.bench.block_causal_attention",
    "fused_cross_attention": "kernels.bench.fused_cross_attention",
    "kv_cache_attention": "kernels.bench.kv_cache_attention",
    "qk_norm_rope": "kernels.bench.qk_norm_rope",
}


def _module(bench: str) -> ModuleType:
    return importlib.import_module(BENCHES[bench])


def _probe(shapes_of, names) -> tuple[str, ...]:
    """The names among `names` that a shapes-building function accepts."""
    out = []
    for name in names:
        try:
            shapes_of(name)
        except KeyError:
            continue
        out.append(name)
    return tuple(out)


def shape_sets() -> dict[str, tuple[str, ...]]:
    """bench -> the shape sets it defines, read from each bench module's `SHAPES` table.

    block_causal_attention builds its shapes in `_shapes(name)` (its layouts import lazily)
    rather than in a table; its sets are those of the tables that `_shapes` accepts.
    """
    tables = {b: tuple(m.SHAPES) for b in BENCHES if hasattr(m := _module(b), "SHAPES")}
    named = list(dict.fromkeys(n for sets in tables.values() for n in sets))
    return {b: tables[b] if b in tables else _probe(_module(b)._shapes, named) for b in BENCHES}


def all_shape_sets() -> list[str]:
    """Every shape set some bench defines, in the order the benches list them."""
    return list(dict.fromkeys(n for sets in shape_sets().values() for n in sets))


def select(shapes: str, only: Optional[list[str]] = None) -> list[str]:
    """The benches to run for a shape set: `only` (each must define the set), else every bench
    that defines it. ValueError names an unknown bench or set."""
    sets = shape_sets()
    unknown = sorted(set(only or ()) - set(BENCHES))
    if unknown:
        raise ValueError(f"unknown bench(es) {unknown}; available: {sorted(BENCHES)}")
    if not any(shapes in s for s in sets.values()):
        raise ValueError(f"unknown shape set {shapes!r}; available: {all_shape_sets()}")
    if only:
        lacking = [b for b in only if shapes not in sets[b]]
        if lacking:
            raise ValueError(f"bench(es) {lacking} define no shape set {shapes!r}; "
                             + "; ".join(f"{b}: {list(sets[b])}" for b in lacking))
        return list(only)
    skipped = [b for b in sorted(BENCHES) if shapes not in sets[b]]
    if skipped:
        log.info("shape set %s: skipping %s (no such set there)", shapes, skipped)
    return [b for b in sorted(BENCHES) if shapes in sets[b]]


def run_benches(shapes: Optional[str] = None, only: Optional[list[str]] = None,
                out: Optional[Path] = None) -> tuple[list[Row], Path]:
    """Time the chosen benches on this machine's device (CUDA if present) and write the JSON to
    `out` (default kernels/bench/results/<device>-<shapes>.json). Returns (rows, JSON path)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = shapes or default_shapes(device)
    rows: list[Row] = []
    for name in select(shapes, only):
        log.info("bench %s on %s, shapes %s", name, device, shapes)
        rows += _module(name).run(shapes, device)
    return rows, write_json(rows, out, shapes)
