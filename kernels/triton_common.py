"""Triton plumbing shared by the attention kernels: dtypes, tile constants, the autotune space
and its register prune, interpreter detection, launching, and the masked / full / masked tile
walk over one key (or query) range.

Kernel files import this module and torch-only modules (attention_types, block_causal_layout,
multi_path_reference), never each other and never the registry (kernels/attention.py); this
module imports nothing of ours. tests/kernels/test_import_graph.py holds those arrows.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634           # exp(x) = exp2(x * log2(e)): softmax in base 2
MIN_BLOCK_D = 16                     # tl.dot needs every dimension >= 16
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
# Autotune prune: estimated fp32 registers of live tiles per thread. Fitted on `ptxas -v` for
# sm_90, bf16, D=128, 3 paths (fused cross-attention): estimates <= 160 compile with at most ~90
# bytes of spill, above it 180 to 12000 bytes (of 255 registers, the rest hold pointers, masks
# and row statistics).
REGS_PER_THREAD = 160
# The compiler's verdict where the compile gate measured it (kernels/compile_gate.py writes this
# file from ptxas' figures: per kernel, architecture, dtype, BLOCK_D and variant, the configs
# compiled and those within its spill budget). At those points it replaces the estimate above,
# which cannot tell apart e.g. block-causal fwd 128x64 w8 (no spill) from 64x64 w4 (112 B), both
# estimated 96; elsewhere (other head dims, other GPUs) the estimate decides.
MEASURED_SPILLS = Path(__file__).with_name("measured_spills.json")


# ------------------------------------------------------------------------- host-side helpers
def interpreting(kernel) -> bool:
    """True when `kernel` was built for the interpreter (TRITON_INTERPRET=1 was set when
    triton.jit ran, which is what counts, not the variable's value now)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def check_dtype(op: str, dtype: torch.dtype) -> None:
    """TypeError naming the reference to use when `dtype` has no Triton path."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op} supports {SUPPORTED_DTYPES}, got {dtype}; use {op}_ref for other dtypes")


def tile_constants(dtype: torch.dtype, head_dim: int, interpret: bool) -> dict:
    """HEAD_DIM, BLOCK_D (padded to a power of 2, >= 16), DOT (the dtype fed to tl.dot) and
    PRECISION (IEEE dots for fp32 inputs, no TF32). Under the interpreter bf16 `tl.dot` is
    broken, so bf16 operands are upcast to fp32 there."""
    return dict(HEAD_DIM=head_dim, BLOCK_D=max(MIN_BLOCK_D, triton.next_power_of_2(head_dim)),
                DOT=tl.float32 if interpret and dtype == torch.bfloat16 else DOT_DTYPES[dtype],
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def autotune_configs(tiles: Sequence[tuple[int, int]], warps=(4, 8), stages=(2, 3)) -> list[triton.Config]:
    """Every (BLOCK_M, BLOCK_N) tile with every warp count and pipeline depth."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn in tiles for w in warps for s in stages]


def config_tag(c) -> str:
    """`128x64w8s2`: one autotune config, as the measured table names it."""
    return f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}"


@functools.lru_cache(maxsize=1)
def _measured_table() -> dict:
    try:
        return json.loads(MEASURED_SPILLS.read_text())["kernels"]
    except FileNotFoundError:
        return {}


def measured_point(kernel: str, arch: str, consts: dict) -> Optional[str]:
    """The table's key for one launch: `sm_90/bf16/D128/IFF=1,TF=1` (variant constexprs as the
    table lists them for `kernel`), or None when the table does not know the kernel."""
    entry = _measured_table().get(kernel)
    if entry is None or "DOT" not in consts:
        return None
    variant = ",".join(f"{k}={int(consts[k])}" for k in entry["variant_keys"] if k in consts)
    return f"{arch}/{consts['DOT']}/D{consts['BLOCK_D']}/{variant}"


def device_arch() -> Optional[str]:
    """`sm_90` for the current CUDA device, None without one."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def prune_by_registers(configs, named_args, *, rows: str, accumulators: int, scores: int,
                       kernel: Optional[str] = None, arch: Optional[str] = None, measured: bool = True, **kwargs):
    """Drop configs that would spill registers. Where the compile gate measured this kernel at
    this architecture, dtype, BLOCK_D and variant (MEASURED_SPILLS), keep what compiled within
    its spill budget; otherwise estimate: `accumulators` [rows, BLOCK_D] tiles plus `scores`
    [BLOCK_M, BLOCK_N] tiles of fp32 live state over 32 * num_warps threads, at most
    REGS_PER_THREAD. (Operand tiles sit in shared memory for wgmma and do not count.) Keeps
    the cheapest config when none fits. `arch` defaults to the current device's."""
    consts = {**named_args, **kwargs}
    block_d = consts["BLOCK_D"]

    def regs(c):
        live = accumulators * c.kwargs[rows] * block_d + scores * c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]
        return live / (32 * c.num_warps)

    arch = arch or device_arch()
    point = measured_point(kernel, arch, consts) if measured and kernel and arch else None
    verdict = _measured_table()[kernel]["points"].get(point) if point else None

    def fits(c):
        if verdict is not None and config_tag(c) in verdict["compiled"]:
            return config_tag(c) in verdict["fit"]
        return regs(c) <= REGS_PER_THREAD

    fit = [c for c in configs if fits(c)]
    return fit or [min(configs, key=regs)]


def autotuned(kernel, configs, key: list[str], *, rows: str, accumulators: int, scores: int,
              name: Optional[str] = None):
    """`kernel` autotuned over `configs`, pruned by `prune_by_registers` with these live tiles
    (and the measured table's entry `name`, see MEASURED_SPILLS)."""
    prune = functools.partial(prune_by_registers, rows=rows, accumulators=accumulators, scores=scores, kernel=name)
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)


def launch(raw, tuned, grid: Callable[[dict], tuple], args: list, consts: dict, interpret_blocks: dict,
           blocks: Optional[dict] = None) -> None:
    """`tuned` with grid(meta) on a GPU; `raw` with fixed tile sizes under the interpreter
    (`interpret_blocks`: autotuning there is slow and its timings meaningless) or when `blocks`
    are given (debug launches that pick their tiles)."""
    if blocks is not None or interpreting(raw):
        blocks = blocks or interpret_blocks
        raw[grid(blocks)](*args, **consts, **blocks)
    else:
        tuned[grid](*args, **consts)


# -------------------------------------------------------------------------- device helpers
@triton.jit
def tile_bounds(u0, i0, i1, u1, BLOCK: tl.constexpr):
    """Tile starts of a range whose rows' union is [u0, u1) and intersection [i0, i1):
    masked edge tiles [t0, f0) and [f1, t1), unmasked full tiles [f0, f1) (every row of the
    other operand sees all their columns). One range of one row: u0 = i0, i1 = u1. An empty
    range must come with u0 at a tile edge (0, or a huge u0 > u1): [x, x) inside a tile would
    visit that tile, masked (harmless, every column masked, but wasted work)."""
    t0 = (u0 // BLOCK) * BLOCK
    f0 = tl.minimum(tl.maximum(tl.cdiv(i0, BLOCK) * BLOCK, t0), u1)
    f1 = tl.maximum(tl.minimum((i1 // BLOCK) * BLOCK, u1), f0)
    return t0, f0, f1, u1


@triton.jit
def visit_tiles(TILE: tl.constexpr, state, args, x0, x1, u0, i0, i1, u1, VISITS, vrow,
                BLOCK: tl.constexpr, ROW: tl.constexpr, HEAD_DIM: tl.constexpr, DOT: tl.constexpr,
                PRECISION: tl.constexpr, DEBUG: tl.constexpr):
    """Walk the tiles of one range (bounds from `tile_bounds(u0, i0, i1, u1)`): per tile,
    state = TILE(state, args, start, x0, x1, MASKED, BLOCK, ROW, HEAD_DIM, DOT, PRECISION),
    MASKED a constexpr, so the full tiles compile to their own unmasked loop body. TILE is a
    @triton.jit function passed as a constexpr; state (the accumulators, a tensor or a tuple)
    and args (the runtime values TILE reads, a tuple) pass through; compile-time values go as
    separate constexprs because unpacking a tuple inside a jit function turns its constexprs
    into tensors. x0, x1: the range's per-row bounds (or scalars) masked tiles compare against. DEBUG (constexpr,
    compiled out otherwise) counts visits: VISITS[vrow + tile] += 1 masked, 256 full. The
    DEBUG test sits here, not in a helper, because each helper call costs about a millisecond
    in the interpreter."""
    t0, f0, f1, t1 = tile_bounds(u0, i0, i1, u1, BLOCK)
    for start in range(t0, f0, BLOCK):
        if DEBUG:
            tl.atomic_add(VISITS + vrow + start // BLOCK, 1)
        state = TILE(state, args, start, x0, x1, True, BLOCK, ROW, HEAD_DIM, DOT, PRECISION)
    for start in range(f0, f1, BLOCK):
        if DEBUG:
            tl.atomic_add(VISITS + vrow + start // BLOCK, 256)
        state = TILE(state, args, start, x0, x1, False, BLOCK, ROW, HEAD_DIM, DOT, PRECISION)
    for start in range(f1, t1, BLOCK):
        if DEBUG:
            tl.atomic_add(VISITS + vrow + start // BLOCK, 1)
        state = TILE(state, args, start, x0, x1, True, BLOCK, ROW, HEAD_DIM, DOT, PRECISION)
    return state
