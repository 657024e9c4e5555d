"""Resuming on another world size: real runs (gloo, ZeRO-3 engines) of the tiny adapter job
chained in one log dir, 2 ranks (step 1) -> 1 rank (step 2) -> 2 ranks (steps 3-4), shared by
every assertion here. Each switch converts the newest checkpoint to DeepSpeed's universal format
once; the state right after the load must equal the state saved, and the data must continue.

The 2-rank legs start under torchrun and the 1-rank leg as a plain process (a world of one):
the `deepspeed` launcher (tested in test_training.py) would import DeepSpeed twice more per leg,
~10 s of the suite's wall time here for nothing this file checks."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data.cache import read_manifests
from data.sampler import ResumableDistributedSampler
from ds_trainer import checkpointing
from ds_trainer import universal_checkpoint as universal
from ds_trainer.adapter_trainer import AdapterTrainer
from ds_trainer.config import load_train_config
from ds_trainer.demo import REPO
from ds_trainer.distributed import free_port
from ds_trainer.metrics import read_metrics
from ds_trainer.safe_checkpoint_engine import UnsafeCheckpointFile
from model.checkpoint import read_checkpoint
from tests.ds_trainer.conftest import finished

pytestmark = pytest.mark.slow
PROBE = "tests.ds_trainer.world_size_probe_train"
# batch 1 over the demo's 4 clips: checkpoint 1 stops mid-epoch, checkpoint 2 at position 3 of 4,
# which 2 ranks cannot split evenly (the rest of that epoch is padded)
SETS = ("lr=0.01", "warmup_steps=2", "batch_size=1", "keep_last_checkpoints=3")
LEGS = ((2, 1), (1, 2), (2, 4))  # (ranks, max_iters): a checkpoint at each leg's end


def _train(config, logdir: Path, ranks: int, sets) -> subprocess.CompletedProcess:
    start = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
             str(free_port()), "-m"] if ranks > 1 else [sys.executable, "-m"]
    cmd = [*start, PROBE, "--config", str(config), "--logdir", str(logdir), "--zero", "3", "--disable-wandb"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANSPEED_NO_PROGRESS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    proc.output = proc.stdout
    return proc


@pytest.fixture(scope="module")
def chain(demo_config, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("world_size") / "run"
    outputs = []
    for ranks, iters in LEGS:
        extra = ("export_full=true",) if ranks == 1 else ()  # every weight after the 2 -> 1 resume
        proc = _train(demo_config, logdir, ranks, SETS + (f"max_iters={iters}", f"log_iters={iters}") + extra)
        assert finished(proc)["step"] == iters
        outputs.append(proc.output)
    return logdir, outputs


def _ckpt(logdir: Path, step: int) -> Path:
    return checkpointing.checkpoint_dir(logdir, AdapterTrainer.checkpoint_prefix, step)


@pytest.mark.parametrize("leg, step, before, after", [(1, 1, 2, 1), (2, 2, 1, 2)], ids=["2->1", "1->2"])
def test_the_state_right_after_the_conversion_is_the_state_saved(chain, leg, step, before, after):
    logdir, outputs = chain
    out, ckpt = outputs[leg], _ckpt(logdir, step)
    assert f"{ckpt.name}: converted the DeepSpeed state of {before} ranks to a universal checkpoint for " \
           f"{after} ranks (roles generator) in " in out
    assert f"resumed from {ckpt} at step {step}" in out
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["world_size"] == before and meta["universal"]["from_world_size"] == before
    assert 0 < meta["universal"]["seconds"] < 60
    assert checkpointing.verify(ckpt) is None  # the converted files are in the manifest, hashes match
    assert any(k.startswith("universal/generator/zero/") and k.endswith("/exp_avg.pt") for k in meta["files"])
    saved = load_file(str(logdir / f"state_{ckpt.name}_saved_world{before}.safetensors"))
    resumed = load_file(str(logdir / f"state_{ckpt.name}_resumed_world{after}.safetensors"))
    assert saved.keys() == resumed.keys()
    for key in saved:  # trained weights, fp32 masters, Adam exp_avg / exp_avg_sq, Adam step, lr
        assert torch.equal(saved[key], resumed[key]), key
    assert resumed["adam_step"].tolist() == [float(step)]
    exported = torch.load(ckpt / "model.pt", weights_only=True)["generator"]  # written before the conversion
    weights = {k.removeprefix("weights/"): v for k, v in resumed.items() if k.startswith("weights/")}
    assert weights.keys() == exported.keys() and all(torch.equal(weights[k], exported[k]) for k in exported)
    assert any(resumed[f"exp_avg/{k}"].abs().sum() > 0 for k in exported)  # a real optimizer state was carried


def test_the_loss_continues_and_the_frozen_backbone_comes_from_the_base_weights(chain, demo_config):
    logdir, _ = chain
    rows = read_metrics(logdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows), rows
    assert [json.loads((_ckpt(logdir, s) / "meta.json").read_text())["world_size"] for s in (1, 2, 4)] == [2, 1, 2]
    base, _, _ = read_checkpoint(load_train_config(demo_config).generator_ckpt)
    final = load_file(str(logdir / "final_model.safetensors"))  # the 1-rank leg, after its step
    for key, value in base.items():
        assert torch.equal(final[key], value), key


def test_the_sampler_neither_repeats_nor_skips_a_sample_across_the_switches(chain, demo_config):
    logdir, _ = chain
    cfg = load_train_config(demo_config)
    keys = [row["key"] for row in read_manifests(Path(cfg.cache_dir))]
    served = {}  # (epoch, global position) -> clip; batch 1: rank r's sample sits at position + r
    for path in sorted(logdir.glob("samples_rank*.jsonl")):
        for rec in map(json.loads, path.read_text().splitlines()):
            where = (rec["epoch"], rec["position"] + rec["rank"])
            assert where not in served, f"position {where} served twice"
            served[where] = rec["keys"][0]
    n = len(keys)
    assert len(served) == 2 * 1 + 1 + 2 * 2  # every micro-batch of every rank of every leg
    order = ResumableDistributedSampler(n, 0, 1, seed=cfg.seed).order(0).tolist()
    # epoch 0 over 2, 1 and 2 ranks: each clip once, in the order of an uninterrupted 1-rank run ...
    assert [served[(0, p)] for p in range(n)] == [keys[i] for i in order]
    assert served[(0, n)] == keys[order[0]]  # ... and 1 -> 2 at position 3 of 4 pads its end by wrap-around
    assert sorted(p for e, p in served if e == 1) == [0, 1]  # then the next epoch from its start


def _copy(ckpt: Path, dst: Path) -> Path:
    out = dst / ckpt.name
    shutil.copytree(ckpt, out)
    return out


def test_an_unfinished_conversion_is_ignored_then_redone_and_the_originals_are_untouched(chain, tmp_path):
    logdir, _ = chain
    ckpt = _copy(_ckpt(logdir, 4), tmp_path)  # 2 ranks, never converted
    before = json.loads((ckpt / "meta.json").read_text())
    assert not universal.recorded(before)
    for junk in (universal.UNIVERSAL_TMP, universal.UNIVERSAL_SUBDIR):
        (ckpt / junk / "generator").mkdir(parents=True)
        (ckpt / junk / "generator" / "half-written.pt").write_bytes(b"\0" * 10)
    assert checkpointing.verify(ckpt) is None  # a conversion cut short does not make the checkpoint damaged
    universal.convert(ckpt, ["generator"])
    after = json.loads((ckpt / "meta.json").read_text())
    assert not (ckpt / universal.UNIVERSAL_TMP).exists()
    assert not (ckpt / universal.UNIVERSAL_SUBDIR / "generator" / "half-written.pt").exists()
    assert {k: after["files"][k] for k in before["files"]} == before["files"]
    assert checkpointing.verify(ckpt) is None
    converted = next((ckpt / universal.UNIVERSAL_SUBDIR / "generator" / "zero").glob("*/fp32.pt"))
    with open(converted, "r+b") as fh:  # a converted file changed afterwards is caught like any other
        fh.seek(converted.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    assert "was changed after it was written" in checkpointing.verify(ckpt)


class _Payload:
    """What an attacker plants: unpickling it would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_pickle_planted_in_the_state_is_refused_by_the_converter_and_the_universal_loader(chain, tmp_path):
    logdir, _ = chain
    ckpt = _copy(_ckpt(logdir, 4), tmp_path)
    marker = tmp_path / "payload-ran"
    shard = next((ckpt / "deepspeed" / "generator").glob("*optim_states.pt"))
    torch.save({"optimizer_state_dict": _Payload(str(marker))}, shard)
    with pytest.raises(universal.UniversalConversionError, match=f"{shard.name}: refusing to load"):
        universal.convert(ckpt, ["generator"])
    assert not marker.exists() and not (ckpt / universal.UNIVERSAL_SUBDIR).exists()
    planted = tmp_path / "exp_avg.pt"  # DeepSpeed's universal loader asks for weights_only=False
    torch.save(_Payload(str(marker)), planted)
    with universal.torch_load_weights_only(), pytest.raises(UnsafeCheckpointFile, match="refusing to load"):
        torch.load(planted, weights_only=False)
    assert not marker.exists()
    assert torch.load(planted, weights_only=False) is None and marker.exists()  # the real torch.load is back


def test_another_zero_stage_is_still_refused_saying_why(chain, demo_config):
    logdir, _ = chain
    with pytest.raises(checkpointing.IncompatibleCheckpoint, match="not under another ZeRO stage"):
        AdapterTrainer.find_resumable(logdir, load_train_config(demo_config), {"world_size": 1, "zero_stage": 2})
    assert AdapterTrainer.find_resumable(logdir, load_train_config(demo_config),
                                         {"world_size": 3, "zero_stage": 3}) == _ckpt(logdir, 4)


def _stream(n, layouts, seed=4):
    """The global sample stream of a run that switches (world, batch) after the given numbers of
    steps: per epoch, the position -> sample index served (every rank of every step)."""
    state, served = None, {}
    for world, batch, steps in layouts:
        samplers = [ResumableDistributedSampler(n, r, world, seed=seed, batch_size=batch) for r in range(world)]
        for s in samplers:
            if state:
                s.load_state_dict(state)
        for _ in range(steps):
            start, epoch = samplers[0].consumed, samplers[0].epoch
            for r, s in enumerate(samplers):
                for j, index in enumerate(list(s)[:batch]):
                    where = (epoch, start + r + j * world)
                    assert where not in served, f"{where} served twice"
                    served[where] = index
                s.advance(batch)
        state = samplers[0].state_dict()
    return served


@pytest.mark.parametrize("n, layouts", [
    (10, [(2, 1, 3), (1, 1, 5), (2, 1, 4)]),   # the runs' switches, mid-epoch
    (10, [(1, 1, 3), (2, 2, 4)]),              # 3 left of 10 over 2 x 2: padded
    (12, [(3, 2, 1), (2, 3, 2), (4, 1, 5)]),   # batch size changes too
    (7, [(2, 1, 2), (3, 1, 4)]),
])
def test_the_sampler_continues_at_the_next_sample_on_another_layout(n, layouts):
    served = _stream(n, layouts)
    for epoch in {e for e, _ in served}:
        real = sorted(p for e, p in served if e == epoch and p < n)
        assert real == list(range(len(real))), (epoch, real)  # contiguous from 0: nothing skipped
        if any(p >= n for e, p in served if e == epoch):  # only a finished epoch has padding
            assert len(real) == n
        order = ResumableDistributedSampler(n, 0, 1, seed=4).order(epoch).tolist()
        assert all(served[(epoch, p)] == order[p % n] for e, p in served if e == epoch)
