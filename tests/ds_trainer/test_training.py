"""End-to-end DeepSpeed runs on CPU (2 ranks, gloo): what trains, what stays frozen, ZeRO stages
agree, a killed run resumes exactly, checkpoints load the way the seed loads them."""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ds_trainer import checkpointing
from ds_trainer.adapter_trainer import AdapterTrainer
from ds_trainer.config import load_train_config
from model.checkpoint import read_checkpoint
from tests.ds_trainer.conftest import finished, kill_group, launch, losses, wait_for

pytestmark = pytest.mark.slow
TRAINABLE = ("clip_proj.", "vae_proj.", ".k_vae.", ".v_vae.", ".norm_k_vae.", ".k_fused.", ".v_fused.",
             ".norm_k_fused.", ".k_img.", ".v_img.", ".norm_k_img.")
FAST = ("lr=0.01", "warmup_steps=2")
NAN_MODULE = "tests.ds_trainer.nan_injecting_train"


def _subject_png(path: Path, rgb) -> str:
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (48, 32), "white")
    ImageDraw.Draw(img).ellipse((10, 6, 38, 26), fill=rgb)
    img.save(path)
    return str(path)


def test_zero3_two_ranks_trains_only_the_adapters(demo_config, tmp_path):
    # with validation: 3 prompts on 2 ranks (rank 1 samples a stand-in), at steps 0 and 16
    images = [_subject_png(tmp_path / f"s{i}.png", c) for i, c in enumerate(["red", "blue"])]
    validation = (f"validation={{every: 16, prompts: [a red ellipse, a blue ellipse, a red ellipse moving], "
                  f"subject_images: ['{images[0]}', '{images[1]}', '{images[0]}'], steps: 2, guidance: 2.0, "
                  f"ref_gain_samples: 3, ref_gain_repeats: 1}}")
    proc = launch(demo_config, tmp_path / "run", sets=FAST + ("max_iters=16", "log_iters=8", "export_full=true",
                                                              "model.activation_checkpointing=true", validation))
    summary = finished(proc)
    assert summary["step"] == 16 and summary["nonfinite_losses"] == 0
    curve = losses(tmp_path / "run")
    assert len(curve) == 16
    assert sum(curve[-4:]) / 4 < 0.9 * sum(curve[:4]) / 4, curve  # the loss falls
    from ds_trainer.metrics import read_metrics
    rows = read_metrics(tmp_path / "run")
    assert all(0.0 <= r["data_wait_s"] <= r["step_time_s"] for r in rows), rows  # data loader wait, per step
    leaked = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{proc.port}_*"))
    assert not leaked, leaked  # DeepSpeed's shm all-reduce segments are released
    cfg = load_train_config(demo_config)
    base, _, _ = read_checkpoint(cfg.generator_ckpt)
    final = load_file(str(tmp_path / "run" / "final_model.safetensors"))
    changed = {k for k in final if k not in base or not torch.equal(final[k], base[k])}
    for key, value in base.items():  # every frozen base weight is bit-identical
        assert torch.equal(final[key], value), key
    assert changed and all(any(t in k for t in TRAINABLE) for k in changed), sorted(changed)
    moved = {k.split(".")[0] if k.startswith(("clip_proj", "vae_proj")) else k.split(".")[3] for k in changed}
    assert moved >= {"clip_proj", "vae_proj", "k_vae", "v_vae", "v_fused", "k_img", "v_img"}, moved
    # the seed's load: model.pt into a freshly built model, strict=False, only base keys missing
    ckpt = tmp_path / "run" / "checkpoint_opens2v_000016"
    trained = torch.load(ckpt / "model.pt", weights_only=True)["generator"]
    from model.wan import WanModel
    fresh = WanModel(cfg.wan_config())
    missing, unexpected = fresh.load_state_dict(trained, strict=False)
    assert not unexpected and set(missing) == set(base)
    assert set(load_file(str(ckpt / "adapter.safetensors"))) == set(trained)
    assert json.loads((ckpt / "meta.json").read_text())["complete"]
    for name in ("config.yaml", "ds_config.json", "versions.json", "metrics.jsonl"):
        assert (tmp_path / "run" / name).exists(), name
    _check_validation(tmp_path / "run", cfg)
    # wanspeed plot and wanspeed sample on the finished run
    import argparse

    import decord

    from ds_trainer import plot, sample
    assert plot.plot_loss(tmp_path / "run").stat().st_size > 1000
    sample.run(argparse.Namespace(logdir=tmp_path / "run", checkpoint=None, index=0, steps=2, out=None))
    video = decord.VideoReader(str(tmp_path / "run" / "sample.mp4"))
    assert len(video) == 4 * (cfg.num_training_frames - 1) + 1


def _check_validation(logdir: Path, cfg) -> None:
    """Every validation wrote one playable video and sheet per prompt and a finite ref_gain."""
    import decord
    rows = [json.loads(line) for line in (logdir / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 16]
    assert rows[0]["ref_gain"] == 1.0  # untrained: the zero value paths add exactly nothing
    assert all(r["ref_gain"] == r["ref_gain"] and r["ref_gain_loss_own"] > 0 for r in rows), rows
    for row in rows:
        videos = sorted((logdir / "validation" / f"step_{row['step']:06d}").glob("prompt_*.mp4"))
        assert [v.name for v in videos] == ["prompt_00.mp4", "prompt_01.mp4", "prompt_02.mp4"]
        for video in videos:
            assert len(decord.VideoReader(str(video))) == 4 * (cfg.num_training_frames - 1) + 1
            assert video.with_suffix(".png").stat().st_size > 100
    first = logdir / "validation" / "step_000016"
    assert (first / "prompt_00.mp4").read_bytes() != (first / "prompt_01.mp4").read_bytes()  # other subject


def test_zero2_zero3_and_offload_give_the_same_losses(demo_config, tmp_path):
    curves = {}
    for zero in ("2", "3", "3-offload"):
        finished(launch(demo_config, tmp_path / zero, zero=zero, sets=FAST + ("max_iters=6", "log_iters=100")))
        curves[zero] = losses(tmp_path / zero)
    assert len(curves["2"]) == 6
    torch.testing.assert_close(torch.tensor(curves["3"]), torch.tensor(curves["2"]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(curves["3-offload"]), torch.tensor(curves["3"]), rtol=1e-4, atol=1e-6)


def test_sigkill_after_a_checkpoint_then_resume_matches_the_uninterrupted_run(demo_config, tmp_path):
    sets = FAST + ("max_iters=12", "log_iters=4", "keep_last_checkpoints=3")
    full = finished(launch(demo_config, tmp_path / "full", sets=sets))
    assert full["step"] == 12
    victim = launch(demo_config, tmp_path / "killed", sets=sets, wait=False)
    wait_for(tmp_path / "killed" / "checkpoint_opens2v_000004", victim)
    kill_group(victim)
    published = AdapterTrainer.list_checkpoints(tmp_path / "killed")
    assert published and published[-1].name < "checkpoint_opens2v_000012", "killed before the end"
    resumed = launch(demo_config, tmp_path / "killed", sets=sets)
    assert finished(resumed)["step"] == 12
    assert "resumed from" in resumed.output
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "killed")), torch.tensor(losses(tmp_path / "full")),
                               rtol=1e-5, atol=1e-6)
    # a truncated newest checkpoint is detected and the previous one is used
    cfg = load_train_config(demo_config)
    newest = AdapterTrainer.list_checkpoints(tmp_path / "killed")[-1]
    with open(newest / "model.pt", "r+b") as fh:
        fh.truncate(100)
    chosen = AdapterTrainer.find_resumable(tmp_path / "killed", cfg)
    assert chosen is not None and chosen.name < newest.name
    # a checkpoint of another config is refused, saying what differs
    other = load_train_config(demo_config, {"train_fused_path": False})
    with pytest.raises(checkpointing.IncompatibleCheckpoint, match="train_fused_path"):
        AdapterTrainer.find_resumable(tmp_path / "killed", other)
    # ... but an attention backend changes no number and does not block a resume
    assert AdapterTrainer.find_resumable(tmp_path / "killed", load_train_config(
        demo_config, {"model.attn_backend": "triton"})) == chosen
    _check_resume_refusals(demo_config, tmp_path / "killed", chosen)


def _flip_a_byte(path: Path) -> None:
    """Same-size corruption: one byte in the middle of the file changes."""
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))


def _check_resume_refusals(demo_config, logdir: Path, good: Path) -> None:
    """On a real 2-rank ZeRO-3 checkpoint: another ZeRO stage is a clear refusal (also from a real
    launch; another world size is converted, tests/ds_trainer/test_world_size_resume.py); a
    same-size corrupted shard or RNG file falls back to the previous checkpoint naming the file;
    all damaged is an error, not a restart from step 0."""
    cfg = load_train_config(demo_config)
    assert AdapterTrainer.find_resumable(logdir, cfg, {"world_size": 1, "zero_stage": 3}) == good
    refused = launch(demo_config, logdir, zero="2", sets=FAST + ("max_iters=12", "log_iters=4", "keep_last_checkpoints=3"))
    assert refused.returncode != 0 and "zero_stage=3; this run has world_size=2, zero_stage=2" in refused.output
    older = [c for c in AdapterTrainer.list_checkpoints(logdir) if c.name < good.name]
    assert older, "the test needs two intact checkpoints"
    shard = next((good / "deepspeed" / "generator").glob("*optim_states.pt"))
    _flip_a_byte(shard)
    import logging
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("ds_trainer.checkpointing").addHandler(handler)
    try:
        assert AdapterTrainer.find_resumable(logdir, cfg) == older[-1]
    finally:
        logging.getLogger("ds_trainer.checkpointing").removeHandler(handler)
    assert any(shard.name in r.getMessage() and "content hash" in r.getMessage() for r in records)
    for ckpt in older:
        _flip_a_byte(ckpt / "rng_rank1.pt")
    with pytest.raises(checkpointing.NoUsableCheckpoint, match="rng_rank1.pt was changed"):
        AdapterTrainer.find_resumable(logdir, cfg)


def _rank_pid(port: int, rank: int) -> int:
    """The PID of one training rank of the run on `port` (not one of its DataLoader workers,
    which inherit its environment: the rank is the match whose parent does not match)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            env = set((entry / "environ").read_bytes().split(b"\0"))
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if {f"MASTER_PORT={port}".encode(), f"RANK={rank}".encode()} <= env:
            found[int(entry.name)] = ppid
    ranks = [pid for pid, ppid in found.items() if ppid not in found]
    assert len(ranks) == 1, found
    return ranks[0]


def test_one_rank_killed_ends_the_run_without_a_hang_and_keeps_its_checkpoints(demo_config, tmp_path):
    """What the OOM killer does to one rank: the other must not wait forever in a collective,
    and the checkpoints published before stay complete and resumable."""
    import os
    import signal
    run = launch(demo_config, tmp_path / "run", sets=FAST + ("max_iters=40", "log_iters=4"), wait=False)
    wait_for(tmp_path / "run" / "checkpoint_opens2v_000004", run)
    os.kill(_rank_pid(run.port, 1), signal.SIGKILL)
    try:
        out, _ = run.communicate(timeout=120)
    except Exception:
        kill_group(run)
        raise AssertionError("the surviving rank hung after its peer was killed")
    assert run.returncode != 0, out[-2000:]
    cfg = load_train_config(demo_config)
    chosen = AdapterTrainer.find_resumable(tmp_path / "run", cfg)
    assert chosen is not None and chosen.name >= "checkpoint_opens2v_000004"
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{run.port}_*"))


def test_nonfinite_loss_on_one_rank_skips_everywhere_and_too_many_stop(demo_config, tmp_path):
    # batch 3 on 2 ranks over 4 clips: an epoch smaller than world x batch (this used to spin forever)
    ok = launch(demo_config, tmp_path / "nan", sets=FAST + ("max_iters=4", "log_iters=100", "batch_size=3"),
                env={"NAN_AT": "1:2"}, module=NAN_MODULE)
    summary = finished(ok)
    assert summary == {"step": 4, "skipped_samples": 0, "nonfinite_losses": 1}
    assert "rank 1: non-finite loss (nan) at step 2, micro-batch 0, on samples " in ok.output  # names the clips
    stop = launch(demo_config, tmp_path / "stop", sets=FAST + ("max_iters=4", "max_consecutive_nonfinite=2"),
                  env={"NAN_AT": "0:1+"}, module=NAN_MODULE)
    assert stop.returncode != 0 and "non-finite losses in a row" in stop.output


def test_lora_run_exports_a_peft_adapter(demo_config, tmp_path):
    lora = ("adapter={adapter_type: lora, r: 2, lora_alpha: 2, target_modules: [to_q, to_k, to_v, to_out]}",)
    finished(launch(demo_config, tmp_path / "lora", ranks=1, sets=FAST + lora + ("max_iters=3", "log_iters=3")))
    ckpt = tmp_path / "lora" / "checkpoint_opens2v_000003"
    from peft import PeftModel
    from model.checkpoint import load_wan_model
    cfg = load_train_config(demo_config)
    base, _ = load_wan_model(cfg.generator_ckpt, reference_paths=cfg.wan_config().reference_paths)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft warns (not fails) on missing adapter keys: make it fail
        peft_model = PeftModel.from_pretrained(base, str(ckpt / "lora"))
    trained = torch.load(ckpt / "model.pt", weights_only=True)["generator"]
    lora_keys = [k for k in trained if "lora_" in k]
    assert lora_keys and any(trained[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k)
    loaded = dict(peft_model.named_parameters())
    for key in lora_keys:
        match = [n for n in loaded if n.endswith(key)]
        assert match, key
        assert torch.equal(loaded[match[0]].detach(), trained[key]), key


def test_unknown_config_key_is_an_error_naming_it(demo_config, tmp_path):
    proc = launch(demo_config, tmp_path / "bad", ranks=1, sets=("opens2v.sample_strid=3",))
    assert proc.returncode != 0 and "opens2v.sample_strid" in proc.output


def test_two_node_hostfile_launch_without_ssh(demo_config, tmp_path):
    """`deepspeed --hostfile` over two 'nodes' on this machine: one launcher per node rank."""
    import os
    import subprocess
    import sys

    from ds_trainer.demo import REPO
    from ds_trainer.distributed import free_port
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANSPEED_NO_PROGRESS="1", PYTHONPATH=str(REPO))
    procs = [subprocess.Popen(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
         f"--node_rank={r}", "--master_addr=127.0.0.1", f"--master_port={port}", "--module", "ds_trainer.train",
         "--config", str(demo_config), "--logdir", str(tmp_path / "run"), "--disable-wandb",
         "--set", "max_iters=3", "--set", "log_iters=3"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    assert '{"finished": {"step": 3' in outs[0]
    meta = json.loads((tmp_path / "run" / "checkpoint_opens2v_000003" / "meta.json").read_text())
    assert meta["world_size"] == 2


def test_a_second_job_on_the_trainer_base_trains_two_roles_checkpoints_and_resumes(tmp_path):
    """The base carries a job with two engines (DMD's shape) without AdapterTrainer: each role's
    DeepSpeed state is checkpointed and restored, and a resumed run matches an uninterrupted one."""
    import subprocess
    import sys

    from ds_trainer.demo import REPO
    from tests.ds_trainer.two_role_job import TwoRoleTrainer
    cfg = tmp_path / "two.yaml"
    # 6 samples in batches of 4, 3 micro-batches a step: no epoch is a whole number of batches or of
    # accumulation windows (the end-of-epoch case that used to spin forever)
    cfg.write_text("job: two-roles\nsamples: 6\nbatch_size: 4\ngradient_accumulation_steps: 3\nlog_iters: 5\n"
                   "num_workers: 0\nzero: '2'\n")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANSPEED_NO_PROGRESS="1", PYTHONPATH=str(REPO))

    def run(logdir, iters):
        out = subprocess.run([sys.executable, "-m", "tests.ds_trainer.two_role_job", "--config", str(cfg), "--logdir",
                              str(logdir), "--disable-wandb", "--set", f"max_iters={iters}"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout + out.stderr

    run(tmp_path / "full", 20)  # 60 micro-batches: 30 epochs of 2 batches
    run(tmp_path / "resumed", 10)
    assert "resumed from" in run(tmp_path / "resumed", 20)
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert len(full) == 20 and sum(full[-4:]) < 0.5 * sum(full[:4]), full  # the student learns
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full), rtol=1e-6, atol=1e-7)
    from ds_trainer.metrics import read_metrics
    critic = [[r["critic_loss"] for r in read_metrics(tmp_path / d)] for d in ("full", "resumed")]
    torch.testing.assert_close(torch.tensor(critic[1]), torch.tensor(critic[0]), rtol=1e-6, atol=1e-7)  # both roles restored
    assert {"lr_student", "lr_critic", "grad_norm_student", "grad_norm_critic"} <= set(read_metrics(tmp_path / "full")[0])
    newest = TwoRoleTrainer.list_checkpoints(tmp_path / "resumed")[-1]
    assert newest.name == "checkpoint_tworoles_000020"
    assert {p.name for p in (newest / "deepspeed").iterdir() if p.is_dir()} == {"student", "critic"}
    assert (newest / "student.safetensors").is_file()
    meta = json.loads((newest / "meta.json").read_text())
    assert meta["compat"]["job"] == "two-roles"
    # a pickle planted in DeepSpeed's state, with meta.json's size and hash updated to match, does not
    # run on resume: DeepSpeed's files are read with weights_only
    marker = tmp_path / "payload-ran"
    shard = next((newest / "deepspeed" / "critic").glob("*optim_states.pt"))
    torch.save({"optimizer_state_dict": _Payload(str(marker))}, shard)
    rel = str(shard.relative_to(newest))
    meta["files"][rel] = {"size": shard.stat().st_size, "sha256": checkpointing.file_digest(shard)}
    (newest / "meta.json").write_text(json.dumps(meta))
    out = subprocess.run([sys.executable, "-m", "tests.ds_trainer.two_role_job", "--config", str(cfg), "--logdir",
                          str(tmp_path / "resumed"), "--disable-wandb", "--set", "max_iters=30"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and not marker.exists()
    assert f"{shard.name}: refusing to load" in out.stdout + out.stderr, out.stderr[-2000:]


class _Payload:
    """What an attacker plants: unpickling it would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))
