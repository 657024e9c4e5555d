"""Sequence parallelism (model/sequence_parallel.py): SP = 2 equals SP = 1, forward and backward,
for full-sequence forwards and for Self-Forcing's KV-cache rollout.

One real 2-rank run (torchrun, gloo, DeepSpeed's DistributedAttention) for the whole module:
tests/model/sp_parity_worker.py runs every case on both ranks; the tests read its JSON.
"""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ds_trainer.distributed import free_port
from model.sequence_parallel import SequenceParallelGroup, ShardPlan
from tests.model.sp_parity_worker import CASES, ROLLOUT_CASES

REPO = Path(__file__).resolve().parents[2]
FLOAT64_CASES = [name for name, case in CASES.items() if case.get("dtype", torch.float64) == torch.float64] \
    + list(ROLLOUT_CASES) + ["recache"]


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / "parity.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(REPO / "tests" / "model" / "sp_parity_worker.py"), str(out)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and out.exists() and "terminate called without an active exception" in proc.stderr:
        # rank 0 writes the JSON only after every rank's results were gathered: a rank that then
        # aborts in a thread destructor at exit (seen once in ~10 suite runs under load, gloo +
        # DeepSpeed's shm comm) computed everything; the worker now shuts the group down first
        warnings.warn("sp_parity_worker: a rank aborted at exit after the results were gathered")
    else:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = json.loads(out.read_text())
    assert [r["sp_rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    return ranks


@pytest.mark.parametrize("case", FLOAT64_CASES)
def test_sp2_output_and_every_gradient_equal_sp1(parity, case):
    for rank in parity:
        r = rank[case]
        assert r["grads_compared"] == r["params"] and r["zero_grads"] == []
        assert r["out_max_abs_diff"] < 1e-10 * max(1.0, r["out_max_abs"]), r
        assert r["grad_max_abs_diff"] < 1e-10 * max(1.0, r["grad_max_abs"]), r
        # each rank's own gradient is only its tokens' share: the group sum is what matches
        assert r["own_share_max_abs_diff"] > 1e-3, r


def test_fp32_parity_within_1e_5(parity):
    for rank in parity:
        r = rank["t2v_odd_shard_fp32"]
        assert r["out_max_abs_diff"] < 1e-5 and r["grad_max_abs_diff"] < 1e-5 * max(1.0, r["grad_max_abs"]), r


def test_the_cases_cover_odd_shards_padding_and_uneven_heads(parity):
    r = parity[1]
    assert r["t2v_odd_shard"]["shard_len"] == 9 and r["t2v_odd_shard"]["padding"] == 0
    # per-frame timesteps: whole frames per shard (2 of the 3 frames of 6 tokens, one padded frame)
    assert r["t2v_frames_padded"]["shard_len"] == 12 and r["t2v_frames_padded"]["padding"] == 6
    assert r["causal_i2v_first_frame"]["padding"] == 3
    assert r["uneven_heads_3_over_2"]["uneven_head_all2all_calls"] > 0
    assert r["t2v_odd_shard"]["uneven_head_all2all_calls"] == 0


def test_kv_caches_hold_only_this_ranks_heads(parity):
    assert [r["rollout_sink_window"]["cache_heads"] for r in parity] == [1, 1]  # 2 heads over 2 ranks
    assert [r["rollout_uneven_heads_padded"]["cache_heads"] for r in parity] == [2, 1]  # 3 heads: ceil, floor
    assert all(r["rollout_uneven_heads_padded"]["uneven_head_all2all_calls"] > 0 for r in parity)
    assert all("hold 2 heads but this rank attends over 1" in r["full_head_caches_error"] for r in parity)


def test_recache_writes_this_ranks_heads_of_the_sp1_cache(parity):
    for rank in parity:
        r = rank["recache"]
        assert r["cache_totals"] == r["ref_cache_totals"], r  # same tokens written (ring, sink kept)
        assert r["cache_max_abs_diff"] < 1e-10 * max(1.0, r["cache_max_abs"]), r


def test_shard_plan_pads_only_the_end():
    sp = SequenceParallelGroup(group=None, size=4, rank=3)
    plan = ShardPlan.make(length=21 * 6, frames=21, sp=sp)  # 21 frames of 6 tokens over 4 ranks
    assert (plan.unit, plan.shard_len, plan.padded) == (6, 36, 144)
    x = torch.arange(21 * 6, dtype=torch.float32).view(1, -1, 1)
    shard = plan.shard(x)
    assert shard.flatten()[:18].tolist() == list(range(108, 126)) and shard.flatten()[18:].eq(0).all()
    assert ShardPlan.make(length=126, frames=1, sp=sp).shard_len == 32  # one timestep: token shards
    e = torch.arange(21.0).view(1, 21, 1)
    assert plan.shard_frames(e).flatten().tolist() == [18.0, 19.0, 20.0, 20.0, 20.0, 20.0]
