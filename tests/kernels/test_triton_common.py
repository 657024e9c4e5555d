"""The Triton plumbing the kernels share: tile constants, the autotune register prune, and the
masked / full / masked tile walk (run in the interpreter on CPU, compiled on a GPU)."""
import pytest
import torch
import triton
import triton.language as tl

import kernels.fused_cross_attention as fca
from kernels.triton_common import (REGS_PER_THREAD, check_dtype, interpreting, prune_by_registers, tile_constants,
                                   visit_tiles)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_autotune_prune_keeps_configs_that_fit_registers():
    def prune(block_d):
        return prune_by_registers(fca.FWD_CONFIGS, {}, rows="BLOCK_M", accumulators=2, scores=1, BLOCK_D=block_d)

    kept = prune(128)
    assert kept and len(kept) < len(fca.FWD_CONFIGS)
    assert all(2 * c.kwargs["BLOCK_M"] * 128 + c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]
               <= REGS_PER_THREAD * 32 * c.num_warps for c in kept)
    assert len(prune(16)) == len(fca.FWD_CONFIGS)  # tiny head dims: all fit
    assert len(prune(4096)) == 1  # nothing fits: the cheapest stays


def test_tile_constants_pad_the_head_dim_and_upcast_bf16_only_when_interpreting():
    assert tile_constants(torch.float16, 24, False) == dict(HEAD_DIM=24, BLOCK_D=32, DOT=tl.float16, PRECISION="tf32")
    assert tile_constants(torch.float32, 8, False)["BLOCK_D"] == 16  # tl.dot needs >= 16
    assert tile_constants(torch.float32, 8, False)["PRECISION"] == "ieee"
    assert tile_constants(torch.bfloat16, 128, False)["DOT"] == tl.bfloat16
    assert tile_constants(torch.bfloat16, 128, True)["DOT"] == tl.float32  # bf16 tl.dot is broken there


def test_check_dtype_names_the_reference():
    check_dtype("kv_cache_attention", torch.bfloat16)
    with pytest.raises(TypeError, match="use kv_cache_attention_ref for other dtypes"):
        check_dtype("kv_cache_attention", torch.float64)


# ---- the tile walk -----------------------------------------------------------------------
@triton.jit
def _record_tile(state, args, start, x0, x1, MASKED: tl.constexpr, BLOCK: tl.constexpr, ROW: tl.constexpr,
                 HEAD_DIM: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """KIND[tile] += 1 (masked) or 16 (full); the state counts visits."""
    KIND = args[0]
    tl.atomic_add(KIND + start // BLOCK, 1 if MASKED else 16)
    return state + 1


@triton.jit
def _walk_kernel(KIND, VISITS, u0, i0, i1, u1, BLOCK: tl.constexpr):
    n = visit_tiles(_record_tile, tl.zeros([BLOCK], tl.int32), (KIND,), u0, u1, u0, i0, i1, u1, KIND, 0,
                    BLOCK, 0, 0, tl.float32, "ieee", False)
    tl.store(VISITS + tl.arange(0, BLOCK), n)


def _expected(u0, i0, i1, u1, block, tiles):
    """Per tile: 0 not visited, 1 masked, 16 full (every row sees the whole tile)."""
    out = []
    for j in range(tiles):
        lo, hi = j * block, (j + 1) * block
        visited = u0 < u1 and lo < u1 and hi > u0
        out.append(0 if not visited else 16 if lo >= i0 and hi <= i1 else 1)
    return out


@pytest.mark.parametrize("u0,i0,i1,u1", [
    (5, 5, 40, 40),     # one range (the KV cache): masked head, full middle, masked tail
    (16, 16, 48, 48),   # aligned: full tiles only
    (3, 20, 25, 50),    # the intersection holds no whole tile: all masked
    (0, 40, 10, 50),    # empty intersection (rows see disjoint ranges)
    (0, 0, 64, 64),     # everything full
    (0, 0, 0, 0),       # an empty range, given as callers give it (the KV cache's empty window)
    (1 << 30, 0, 0, 0),  # every row empty (the block-causal union of empty rows)
])
def test_visit_tiles_visits_each_meeting_tile_once_and_full_tiles_unmasked(u0, i0, i1, u1):
    block, tiles = 16, 4
    kind = torch.zeros(tiles + 1, dtype=torch.int32, device=DEVICE)
    visits = torch.zeros(block, dtype=torch.int32, device=DEVICE)
    _walk_kernel[(1,)](kind, visits, u0, i0, i1, u1, BLOCK=block)
    expect = _expected(u0, i0, i1, u1, block, tiles)
    assert kind[:tiles].tolist() == expect and kind[tiles] == 0
    assert visits.tolist() == [sum(e > 0 for e in expect)] * block
    assert interpreting(_walk_kernel) == (DEVICE == "cpu")
