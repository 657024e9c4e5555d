"""A real two-node launch on one machine through `wanspeed launch --no-ssh`: hostfile
`node-a slots=1` / `node-b slots=1`, one launcher per node on 127.0.0.1, the tiny adapter job
under ZeRO-3 for 3 steps with a checkpoint. One run, several assertions."""
import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ds_trainer.commands import cache as cache_cmd
from ds_trainer.demo import prepare
from tests.launch.conftest import node_env, run_two_nodes, write_hostfile

pytestmark = pytest.mark.slow
STEPS = 3


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_nodes")
    config = prepare(root / "demo", clips=2)
    cache_cmd.run(argparse.Namespace(config=str(config), shard_size=8, local_rank=None))
    logdir = root / "run"
    env = node_env(GLOO_SOCKET_IFNAME="lo", NCCL_SOCKET_IFNAME="lo", WANDB_MODE="offline")
    nodes = run_two_nodes("launch", write_hostfile(root), [
        "--env", "WANSPEED_LAUNCH_TEST=1", "--", "train", "--config", str(config), "--logdir", str(logdir),
        "--zero", "3", "--disable-wandb", "--set", f"max_iters={STEPS}", "--set", f"log_iters={STEPS}",
        "--set", "batch_size=1"], env=env)
    return SimpleNamespace(nodes=nodes, logdir=logdir, cache=root / "demo" / "cache", config=config, env=env)


def test_both_nodes_finish_as_one_world_of_two(two_node_run):
    for rank, (code, out) in enumerate(two_node_run.nodes):
        assert code == 0, out[-4000:]
        assert f"launching 2 ranks on 2 nodes (node-a, node-b), this is node {rank}" in out
        assert f"--no_ssh --node_rank={rank}" in out and f"nnodes=2, num_local_procs=1, node_rank={rank}" in out
        assert "dist_world_size=2" in out
        assert "out of host memory" not in out
    finished = [ln for ln in two_node_run.nodes[0][1].splitlines() if ln.startswith('{"finished"')]
    assert finished and json.loads(finished[-1])["finished"]["step"] == STEPS


def test_the_zero3_checkpoint_holds_both_ranks_shards_and_loads(two_node_run):
    ckpt = two_node_run.logdir / f"checkpoint_opens2v_{STEPS:06d}"
    assert json.loads((ckpt / "meta.json").read_text())["complete"]
    shards = sorted(p.name for p in (ckpt / "deepspeed" / "generator").rglob("*optim_states.pt"))
    assert [s.split("_mp_rank")[0] for s in shards] == ["zero_pp_rank_0", "zero_pp_rank_1"], shards
    assert (ckpt / "rng_rank0.pt").exists() and (ckpt / "rng_rank1.pt").exists()
    assert json.loads((two_node_run.logdir / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3
    trained = torch.load(ckpt / "model.pt", weights_only=True)["generator"]
    assert trained and all(v.numel() > 0 for v in trained.values())  # full tensors, not ZeRO-3 placeholders
    losses = [json.loads(line)["loss"] for line in (two_node_run.logdir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))


def test_deepspeed_env_records_the_variables_every_node_needs(two_node_run):
    lines = (two_node_run.logdir / ".deepspeed_env").read_text().splitlines()
    for expected in ("GLOO_SOCKET_IFNAME=lo", "NCCL_SOCKET_IFNAME=lo", "WANDB_MODE=offline", "DS_ACCELERATOR=cpu",
                     "WANSPEED_LAUNCH_TEST=1"):
        assert expected in lines, lines


def test_the_shared_directory_probes_leave_nothing_behind(two_node_run):
    for directory in (two_node_run.logdir, two_node_run.cache):
        assert not list(Path(directory).glob(".wanspeed_shared_probe_*"))


def test_a_log_dir_only_one_node_sees_stops_both_nodes_at_start(two_node_run, tmp_path):
    """node-b in another working directory: the relative log dir is two different directories, as
    a node-local disk would be. Both nodes stop at start naming rank 1; no checkpoint is written."""
    (tmp_path / "node-b").mkdir()
    nodes = run_two_nodes("launch", write_hostfile(tmp_path), [
        "--", "train", "--config", str(two_node_run.config), "--logdir", "run_local", "--zero", "3",
        "--disable-wandb", "--set", "max_iters=1", "--set", "log_iters=1", "--set", "batch_size=1"],
        cwds=(tmp_path, tmp_path / "node-b"), env=two_node_run.env)
    for code, out in nodes:
        assert code != 0, out[-3000:]
        assert "log dir" in out and "is not shared by every node: rank 1 (" in out, out[-3000:]
    assert not list(tmp_path.rglob("checkpoint_opens2v_*"))
