"""`wanspeed build-kernels`: compile the C++/CUDA extension ahead of time (ninja).

Without this, the first call of a fused op builds it (about 20 s; longer with CUDA). Running it
once per machine (or per image) moves that cost out of the first training step. CUDA kernels
are included where nvcc and a CUDA GPU exist; the command says whether they were.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from kernels import qk_norm_rope


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--build-dir", type=Path, default=None,
                        help=f"where to build (default ${qk_norm_rope.BUILD_DIR_ENV}, else "
                             "~/.cache/wanspeed/torch_extensions/<torch version>); training finds the "
                             f"build when ${qk_norm_rope.BUILD_DIR_ENV} names the same directory")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and output")


def run(args: argparse.Namespace) -> int:
    _, why_not = qk_norm_rope.cuda_build_possible()
    start = time.perf_counter()
    try:
        module = qk_norm_rope.build(verbose=args.verbose, build_dir=args.build_dir)
    except Exception as exc:  # the message carries the compiler's output
        print(f"build-kernels: building the qk_norm_rope extension failed after "
              f"{time.perf_counter() - start:.1f} s:\n{exc}")
        return 1
    print(f"qk_norm_rope extension built in {time.perf_counter() - start:.1f} s")
    print(f"  module: {module.__file__}")
    print(f"  CPU vector ISA: {qk_norm_rope.cpu_isa()[0]}")
    print(f"  CUDA kernels: {'included' if module.with_cuda else 'not included (' + why_not + ')'}")
    return 0
