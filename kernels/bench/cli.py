"""`wanspeed bench kernels`: every kernel microbenchmark, side by side with the stock paths."""
from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path

import torch

from kernels.bench.harness import format_table, write_json

log = logging.getLogger(__name__)
# bench name -> module with `run(shapes: str, device: torch.device) -> list[Row]`
BENCHES: dict[str, str] = {
    "block_causal_attention": "kernels.bench.block_causal_attention",
    "fused_cross_attention": "kernels.bench.fused_cross_attention",
    "kv_cache_attention": "kernels.bench.kv_cache_attention",
    "qk_norm_rope": "kernels.bench.qk_norm_rope",
}
SHAPE_SETS = ("tiny", "wan-1.3b", "wan-14b")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=["kernels"], help="what to benchmark")
    parser.add_argument("--shapes", choices=SHAPE_SETS, default=None,
                        help="shape set (default: wan-1.3b on a GPU, tiny on CPU)")
    parser.add_argument("--only", nargs="*", default=None, help=f"subset of {sorted(BENCHES) or 'the benches'}")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default kernels/bench/results/<device>-<shapes>.json)")


def run(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = args.shapes or ("wan-1.3b" if device.type == "cuda" else "tiny")
    names = args.only or sorted(BENCHES)
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        raise SystemExit(f"unknown bench(es) {unknown}; available: {sorted(BENCHES)}")
    rows = []
    for name in names:
        log.info("bench %s on %s, shapes %s", name, device, shapes)
        rows += importlib.import_module(BENCHES[name]).run(shapes, device)
    print(format_table(rows))
    out = write_json(rows, args.out, shapes)
    print(f"results written to {out}")
    return 0
