"""Fused qk-RMSNorm + 3D RoPE: Wan2.1's `rope_apply(heads(norm_q(q(x))))` in one pass.

Shapes: B batch, L tokens, N heads, D head dim, dim = N * D, Lr rows of the RoPE table, D/2
rotary pairs per head.

    r     = rsqrt(mean(x^2 over dim) + eps)              in fp32 (fp64 for fp64 x)
    v     = (x * r).type_as(x) * weight                  Wan's WanRMSNorm, over the FULL dim
    v     = v.unflatten(-1, (N, D))                      [B, L, N, D]
    out   = rotate adjacent pairs (v[2j], v[2j+1]) by (cos[l, j], sin[l, j]) for tokens l < Lr;
            tokens l >= Lr pass through unrotated
    out dtype: fp32 (fp64 for fp64 inputs), as Wan's rope returns fp32

The kernels live in `kernels/csrc/` (C++ for CPU, CUDA for GPUs) and are compiled with ninja by
`torch.utils.cpp_extension.load` the first time they are needed (about 20 s; cached on disk in
`build_directory()` and in this process). Where no compiler or ninja is found, or the build
fails, one warning says why and `qk_norm_rope` computes `qk_norm_rope_ref` instead.
"""
from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

log = logging.getLogger(__name__)

EXTENSION_NAME = "wanspeed_qk_norm_rope"
BUILD_DIR_ENV = "WANSPEED_BUILD_DIR"
CSRC_DIR = Path(__file__).resolve().parent / "csrc"
CPU_SOURCES = ("qk_norm_rope.cpp",)
CUDA_SOURCES = ("qk_norm_rope_cuda.cu",)
CXX_FLAGS = ("-O3", "-fopenmp")  # at::parallel_for needs OpenMP to run on torch's thread pool
CUDA_FLAGS = ("-O3",)


# ---- building and loading the extension -------------------------------------------------------
@dataclass
class _Extension:
    """What this process knows about the extension (built once, or failed once)."""

    module: Optional[ModuleType] = None
    failure: Optional[str] = None          # why the build failed; set once, logged once
    warned: set = field(default_factory=set)
    seconds: Optional[float] = None
    directory: Optional[Path] = None


_EXT = _Extension()


def build_directory() -> Path:
    """$WANSPEED_BUILD_DIR, else ~/.cache/wanspeed/torch_extensions/<torch version>."""
    root = os.environ.get(BUILD_DIR_ENV)
    if root:
        return Path(root).expanduser()
    return Path.home() / ".cache" / "wanspeed" / "torch_extensions" / torch.__version__.replace("+", "_")


def cuda_build_possible() -> tuple[bool, str]:
    """(True, "") where nvcc AND a CUDA GPU exist, else (False, why not)."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return False, "no CUDA GPU visible to torch"
    from torch.utils import cpp_extension  # noqa: PLC0415  (slow import, only when building)
    if cpp_extension.CUDA_HOME is None or not (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists():
        return False, "nvcc not found (set CUDA_HOME)"
    return True, ""


def _toolchain_problem() -> Optional[str]:
    """Why nothing can be compiled here, or None. Puts a pip-installed ninja on PATH."""
    if shutil.which("ninja") is None:
        venv_bin = Path(sys.executable).parent
        if (venv_bin / "ninja").exists():
            os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
        else:
            return "ninja not found on PATH (pip install ninja)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} not found on PATH (install g++ or set CXX)"
    return None


def cpu_isa() -> tuple[str, tuple[str, ...]]:
    """(tag, compiler flags) for the vector ISA torch itself dispatches to on this CPU.

    AVX2 + FMA made the CPU kernels 1.5x (forward) to 2x (backward) faster here than baseline
    x86-64 (SSE2). The tag is part of the extension's name, so builds for different CPUs never
    share a directory.
    """
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return "avx2", ("-mavx2", "-mfma", "-mf16c")
    return "base", ()


def _compile(name: str, build_dir: Path, with_cuda: bool, verbose: bool) -> ModuleType:
    """Run ninja through torch's cpp_extension; raises on any failure."""
    problem = _toolchain_problem()
    if problem:
        raise RuntimeError(problem)
    from torch.utils import cpp_extension  # noqa: PLC0415
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(CSRC_DIR / s) for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    cflags = list(CXX_FLAGS) + list(cpu_isa()[1]) + (["-DWANSPEED_WITH_CUDA"] if with_cuda else [])
    return cpp_extension.load(
        name=name, sources=sources, build_directory=str(build_dir), with_cuda=with_cuda, verbose=verbose,
        extra_cflags=cflags, extra_cuda_cflags=list(CUDA_FLAGS), extra_ldflags=["-fopenmp"])


def build(verbose: bool = False, build_dir: Optional[Path] = None) -> ModuleType:
    """Compile the extension (a no-op when ninja finds it up to date) and load it; raises on
    failure. CUDA kernels are included where nvcc and a CUDA GPU exist."""
    with_cuda, _ = cuda_build_possible()
    name = f"{EXTENSION_NAME}_{'cuda' if with_cuda else 'cpu'}_{cpu_isa()[0]}"
    directory = Path(build_dir or build_directory()) / name
    start = time.perf_counter()
    module = _compile(name, directory, with_cuda, verbose)
    _EXT.module, _EXT.failure = module, None
    _EXT.seconds, _EXT.directory = time.perf_counter() - start, directory
    return module


def _warn_once(key: str, message: str) -> None:
    if key not in _EXT.warned:
        _EXT.warned.add(key)
        log.warning(message)


def _extension_for(device: torch.device) -> Optional[ModuleType]:
    """The loaded extension if it can run on `device`, else None (reason logged once)."""
    if device.type not in ("cpu", "cuda"):
        _warn_once(device.type, f"qk_norm_rope: no kernels for {device.type} tensors; using the PyTorch reference")
        return None
    if _EXT.module is None and _EXT.failure is None:
        try:
            build()
        except Exception as exc:  # any build failure means: use the PyTorch reference
            _EXT.failure = f"{type(exc).__name__}: {str(exc).strip()[-2000:]}"
    if _EXT.module is None:
        _warn_once("build", f"qk_norm_rope: C++/CUDA extension unavailable ({_EXT.failure}); "
                            "using the PyTorch reference qk_norm_rope_ref")
        return None
    if device.type == "cuda" and not _EXT.module.with_cuda:
        _warn_once("cuda", "qk_norm_rope: the extension was built without CUDA kernels "
                           f"({cuda_build_possible()[1] or 'nvcc missing at build time'}); "
                           "using the PyTorch reference on CUDA tensors")
        return None
    return _EXT.module


def extension_status() -> str:
    """One line: loaded (where, CUDA or not), failed (why), or not built yet in this process."""
    if _EXT.module is not None:
        took = f", loaded in {_EXT.seconds:.1f} s" if _EXT.seconds is not None else ""
        return (f"qk_norm_rope extension loaded from {_EXT.directory} "
                f"({'CPU + CUDA' if _EXT.module.with_cuda else 'CPU only'}{took})")
    if _EXT.failure is not None:
        return f"qk_norm_rope extension unavailable, using the PyTorch reference: {_EXT.failure}"
    return f"qk_norm_rope extension not built in this process (build directory {build_directory()})"


# ---- autograd ---------------------------------------------------------------------------------
class _QKNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, cos, sin, num_heads: int, eps: float, ext: ModuleType):
        out, rstd = ext.qk_norm_rope_forward(x, weight, cos, sin, num_heads, eps)
        ctx.save_for_backward(x, weight, cos, sin, rstd)
        ctx.num_heads, ctx.ext = num_heads, ext
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, cos, sin, rstd = ctx.saved_tensors
        grad_x, grad_weight = ctx.ext.qk_norm_rope_backward(
            grad_out, x, weight, cos, sin, rstd, ctx.num_heads, ctx.needs_input_grad[1])
        return grad_x, grad_weight, None, None, None, None, None


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 num_heads: int, eps: float = 1e-6) -> torch.Tensor:
    """Wan's `rope_apply(heads(WanRMSNorm(x)))`, fused.

    x: [B, L, dim] (any float dtype, strided is fine); weight: [dim]; cos, sin: [Lr, D/2] (any
    float dtype; fp64 tables are used in the compute precision, as Wan's rope does). Returns
    [B, L, N, D] in fp32, or fp64 when x or weight is fp64. Differentiable in x and weight.
    """
    if weight.dtype == torch.float64 and x.dtype != torch.float64:
        x = x.double()
    ext = _extension_for(x.device)
    if ext is None:
        return qk_norm_rope_ref(x, weight, cos, sin, num_heads, eps)
    return _QKNormRope.apply(x, weight, cos, sin, num_heads, eps, ext)


# ---- reference ----------------------------------------------------------------------------------
def qk_norm_rope_ref(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     num_heads: int, eps: float = 1e-6) -> torch.Tensor:
    """Plain PyTorch, the same ops as model.layers' `rope_apply(_heads(WanRMSNorm(x)))`.

    x: [B, L, dim]; weight: [dim]; cos, sin: [Lr, D/2] -> [B, L, N, D] in upcast precision.
    """
    y = x.to(torch.promote_types(x.dtype, torch.float32))
    y = y * torch.rsqrt(y.pow(2).mean(dim=-1, keepdim=True) + eps)
    v = (y.type_as(x) * weight).unflatten(-1, (num_heads, -1))  # [B, L, N, D]
    v = v.to(torch.promote_types(v.dtype, torch.float32))
    n_rot = min(cos.shape[0], v.shape[1])
    c = cos[:n_rot].to(v.dtype)[None, :, None, :]  # [1, Lr, 1, D/2]
    s = sin[:n_rot].to(v.dtype)[None, :, None, :]
    pairs = v[:, :n_rot].unflatten(-1, (-1, 2))  # [B, Lr, N, D/2, 2]
    re, im = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([re * c - im * s, re * s + im * c], dim=-1).flatten(-2)
    if n_rot == v.shape[1]:
        return rotated
    return torch.cat([rotated, v[:, n_rot:]], dim=1)
