"""Compile the C++/CUDA extension ahead of time (ninja); `wanspeed build-kernels`.

Without this, the first call of a fused op builds it (about 20 s; longer with CUDA). Running it
once per machine (or per image) moves that cost out of the first training step. CUDA kernels
are included where nvcc and a CUDA GPU exist; the report says whether they were.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from kernels import qk_norm_rope


class BuildFailed(RuntimeError):
    """The build failed; the message carries the seconds spent and the compiler's output."""


def build_kernels(build_dir: Optional[Path] = None, verbose: bool = False) -> list[str]:
    """Build the qk_norm_rope extension; returns the report lines (time, module file, ISA, CUDA)."""
    _, why_not = qk_norm_rope.cuda_build_possible()
    start = time.perf_counter()
    try:
        module = qk_norm_rope.build(verbose=verbose, build_dir=build_dir)
    except Exception as exc:  # the message carries the compiler's output
        raise BuildFailed(f"building the qk_norm_rope extension failed after "
                          f"{time.perf_counter() - start:.1f} s:\n{exc}") from exc
    return [f"qk_norm_rope extension built in {time.perf_counter() - start:.1f} s",
            f"  module: {module.__file__}",
            f"  CPU vector ISA: {qk_norm_rope.cpu_isa()[0]}",
            f"  CUDA kernels: {'included' if module.with_cuda else 'not included (' + why_not + ')'}"]
