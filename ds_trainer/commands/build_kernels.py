"""`wanspeed build-kernels`: compile the C++/CUDA extension ahead of time (kernels/build.py)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kernels.qk_norm_rope import BUILD_DIR_ENV  # noqa: PLC0415

    parser.add_argument("--build-dir", type=Path, default=None,
                        help=f"where to build (default ${BUILD_DIR_ENV}, else "
                             "~/.cache/wanspeed/torch_extensions/<torch version>); training finds the "
                             f"build when ${BUILD_DIR_ENV} names the same directory")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and output")


def run(args: argparse.Namespace) -> int:
    from kernels.build import BuildFailed, build_kernels  # noqa: PLC0415

    try:
        lines = build_kernels(args.build_dir, args.verbose)
    except BuildFailed as exc:
        print(f"build-kernels: {exc}")
        return 1
    print("\n".join(lines))
    return 0
