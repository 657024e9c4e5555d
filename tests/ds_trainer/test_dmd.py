"""The DMD job end to end: real `deepspeed` runs of the tiny I2V distillation on 2 CPU ranks,
ZeRO-3, three roles. One uninterrupted run and one stopped-and-resumed run are shared by every
assertion here (the resumed run's first leg trains from the I2V encoder cache)."""
import argparse
import contextlib
import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ds_trainer import checkpointing
from ds_trainer.commands import cache as cache_cmd
from ds_trainer.config import load_train_config
from ds_trainer.demo import prepare_dmd
from ds_trainer.dmd_trainer import DMDTrainer
from ds_trainer.metrics import read_metrics
from model.checkpoint import read_checkpoint
from tests.ds_trainer.conftest import finished, kill_group, launch

pytestmark = pytest.mark.slow
PROBE = "tests.ds_trainer.dmd_probe_train"


@pytest.fixture(scope="module")
def dmd_cache(demo_config):
    """The tiny DMD config's I2V encoder cache, filled by `wanspeed cache` as 2 ranks (one after the
    other, in this process), then rank 0 again (resume: nothing left). Returns (config, the config
    with cache_dir, cache_dir, each call's printed stats). One CPU thread, as the training runs
    encode (the VAE's CPU convolutions differ in the last bits between thread counts)."""
    config = prepare_dmd(Path(demo_config).parent)
    cache = config.parent / "i2v_cache"
    cached = config.with_name("tiny_i2v_dmd_cached.yaml")
    cached.write_text(config.read_text() + f'cache_dir: "{cache}"\n')
    stats, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for rank in (0, 1, 0):
            out = io.StringIO()
            with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
                mp.setenv("RANK", str(rank))
                mp.setenv("WORLD_SIZE", "2")
                assert cache_cmd.run(argparse.Namespace(config=str(cached), shard_size=1, local_rank=None)) == 0
            stats.append(json.loads(out.getvalue().splitlines()[-1]))
    finally:
        torch.set_num_threads(threads)
    return config, cached, cache, stats


@pytest.fixture(scope="module")
def dmd_runs(demo_config, dmd_cache, tmp_path_factory):
    from PIL import Image
    config = prepare_dmd(Path(demo_config).parent)
    root = tmp_path_factory.mktemp("dmd")
    image = root / "first.png"
    Image.new("RGB", (48, 32), (200, 60, 40)).save(image)
    # validation: 3 prompts on 2 ranks (rank 1 rolls out a stand-in), before step 1 and at steps 3 and 6
    validation = f"validation={{every: 3, prompts: [a red box, a blue ball, a red box moving], images: ['{image}']}}"
    full = launch(config, root / "full", sets=("max_iters=6", validation), module=PROBE)
    first = launch(config, root / "resumed", sets=("max_iters=3", f"cache_dir={dmd_cache[2]}"), module=PROBE)
    shutil.copy(root / "resumed" / "probe_calls.json", root / "cached_leg_probe_calls.json")
    # on the encoders again; SIGKILLed after it logged step 4 (before its next checkpoint at 6), then resumed
    victim = launch(config, root / "resumed", sets=("max_iters=6",), module=PROBE, wait=False)
    _wait_for_step(root / "resumed" / "metrics.jsonl", 4, victim)
    kill_group(victim)
    second = launch(config, root / "resumed", sets=("max_iters=6",), module=PROBE)
    return config, root, full, first, second


def _wait_for_step(metrics: Path, step: int, proc, timeout: float = 300) -> None:
    import time
    t0 = time.time()
    while not (metrics.exists() and any(json.loads(line).get("step", 0) >= step
                                        for line in metrics.read_text().splitlines() if line.strip())):
        assert proc.poll() is None, f"the run ended before logging step {step}"
        assert time.time() - t0 < timeout, f"no step {step} in {metrics} after {timeout}s"
        time.sleep(0.05)


def test_a_few_dmd_steps_train_generator_and_critic_and_leave_the_teacher_bit_identical(dmd_runs):
    config, root, full, _, _ = dmd_runs
    assert finished(full) == {"step": 6, "skipped_samples": 0, "nonfinite_losses": 0}
    rows = read_metrics(root / "full")
    assert len(rows) == 6 and all(torch.isfinite(torch.tensor(r["critic_loss"])) for r in rows)
    generator_steps = [r["step"] for r in rows if "generator_loss" in r]
    assert generator_steps == [1, 3, 5]  # dfake_gen_update_ratio 2: steps 0, 2, 4 (logged as 1, 3, 5)
    assert all(r["generator_loss"] == r["generator_loss"] for r in rows if "generator_loss" in r)  # finite
    assert {"time_rollout_s", "time_dmd_s", "time_critic_s", "grad_norm_generator"} <= set(rows[0])
    assert "grad_norm_generator" not in rows[1]  # logged only on the steps it updated
    cfg = load_train_config(config)
    base, _, _ = read_checkpoint(cfg.real_score_ckpt)
    teacher = load_file(str(root / "full" / "teacher_after.safetensors"))
    assert teacher.keys() == base.keys()
    for key, value in base.items():
        assert torch.equal(teacher[key], value), key  # the frozen teacher never moved
    saved = torch.load(root / "full" / "checkpoint_model_000006" / "model.pt", weights_only=True)
    assert set(saved) == {"generator", "critic", "generator_ema"}
    ema = saved["generator_ema"]
    assert ema.keys() == saved["generator"].keys()
    assert any(not torch.equal(ema[k], saved["generator"][k]) for k in ema)  # an average, not a copy
    for role in ("generator", "critic"):
        weights = {k.removeprefix("model."): v for k, v in saved[role].items()}
        assert weights.keys() == base.keys() and all(k.startswith("model.") for k in saved[role])
        assert any(not torch.equal(weights[k], base[k]) for k in base), f"{role} did not train"
    # each role's model state on a rank: half of every parameter (ZeRO-3 over 2 ranks), Adam's two
    # moments (+ fp32 master partition) for the trainable roles, nothing for the teacher's optimizer
    full_mb = sum(v.numel() * 4 for v in base.values()) / 2 ** 20
    mem = rows[0]
    for role in ("generator", "critic", "real_score"):
        assert abs(mem[f"memory_{role}_params_mb"] - full_mb / 2) < 0.05 * full_mb, (role, mem, full_mb)
    for role in ("generator", "critic"):
        assert mem[f"memory_{role}_optimizer_mb"] >= 2 * 0.95 * mem[f"memory_{role}_params_mb"], mem
    assert mem["memory_real_score_optimizer_mb"] == 0 and "memory_generator_params_mb" not in rows[1]
    calls = json.loads((root / "full" / "probe_calls.json").read_text())
    assert calls["generator"] > 0 and calls["critic"] > 0 and calls["teacher"] > 0  # each checked its inputs


def test_validation_streams_one_video_per_prompt_at_each_validation(dmd_runs):
    import decord
    config, root, _, _, _ = dmd_runs
    rows = [json.loads(line) for line in (root / "full" / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 3, 6]
    frames = 4 * (load_train_config(config).num_training_frames - 1) + 1
    for row in rows:
        videos = sorted((root / "full" / "validation" / f"step_{row['step']:06d}").glob("prompt_*.mp4"))
        assert [v.name for v in videos] == ["prompt_00.mp4", "prompt_01.mp4", "prompt_02.mp4"] == \
            [Path(v).name for v in row["videos"]]
        assert all(len(decord.VideoReader(str(v))) == frames and v.with_suffix(".png").is_file() for v in videos)
    step = lambda s, i: (root / "full" / "validation" / f"step_{s:06d}" / f"prompt_{i:02d}.mp4").read_bytes()  # noqa: E731
    assert step(6, 0) != step(6, 1)  # another prompt (and noise seed)
    assert step(0, 0) != step(6, 0)  # the generator trained in between


def test_every_rank_rolled_out_with_the_same_exit_steps(dmd_runs):
    _, root, _, _, _ = dmd_runs
    per_rank = [(root / "full" / f"exits_rank{r}.jsonl").read_text().splitlines() for r in range(2)]
    assert per_rank[0] == per_rank[1] and len(per_rank[0]) == 6 + 3  # 6 critic + 3 generator rollouts


def test_a_stopped_and_a_sigkilled_run_resume_with_the_losses_of_the_uninterrupted_one(dmd_runs):
    _, root, _, first, second = dmd_runs
    assert finished(first)["step"] == 3 and finished(second)["step"] == 6
    assert "resumed from" in second.output and "checkpoint_model_000003" in second.output  # the kill lost 4-5
    ours, theirs = read_metrics(root / "resumed"), read_metrics(root / "full")
    for key in ("critic_loss", "generator_loss"):
        a = [r.get(key, 0.0) for r in ours]
        b = [r.get(key, 0.0) for r in theirs]
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-7)
    ema = [torch.load(root / d / "checkpoint_model_000006" / "model.pt", weights_only=True)["generator_ema"]
           for d in ("full", "resumed")]
    for key in ema[0]:  # the EMA shards were saved per rank and restored
        torch.testing.assert_close(ema[1][key], ema[0][key], rtol=1e-5, atol=1e-7)


def test_a_run_from_the_encoder_cache_loads_no_encoder_and_has_the_encoder_runs_losses(dmd_runs, dmd_cache):
    _, root, _, first, _ = dmd_runs
    assert finished(first)["step"] == 3
    assert json.loads((root / "cached_leg_probe_calls.json").read_text()).get("encoder_loads", 0) == 0
    assert json.loads((root / "full" / "probe_calls.json").read_text())["encoder_loads"] == 1  # training + validation
    assert [(s["rank"], s["encoded"], s["already_cached"]) for s in dmd_cache[3]] == [(0, 2, 0), (1, 2, 0), (0, 0, 2)]
    ours, theirs = read_metrics(root / "resumed")[:3], read_metrics(root / "full")[:3]
    for key in ("critic_loss", "generator_loss"):
        a, b = [r.get(key, 0.0) for r in ours], [r.get(key, 0.0) for r in theirs]
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-7)


def _data_side(cfg) -> DMDTrainer:
    """A DMDTrainer with only its data built (build_data, make_loader, conditioning): no process
    group, no engines."""
    trainer = DMDTrainer.__new__(DMDTrainer)
    trainer.cfg, trainer.device = cfg, torch.device("cpu")
    trainer.dataset = trainer.build_data()
    trainer.sampler = range(len(trainer.dataset))
    return trainer


def test_from_the_cache_the_trainer_builds_the_encoder_paths_conditioning_without_an_encoder(dmd_cache, monkeypatch):
    import model.encoders.bundle
    from data.i2v_cache import NegativePromptMismatch
    config, cached_config, _, _ = dmd_cache
    encoded = _data_side(load_train_config(config))
    monkeypatch.setattr(model.encoders.bundle, "load_frozen_encoders",
                        lambda *a, **k: pytest.fail("a run from the cache loaded the encoders"))
    cached = _data_side(load_train_config(cached_config))
    assert cached.encoders is None and len(cached.dataset) == len(encoded.dataset) == 4
    pairs = list(zip(encoded.make_loader(), cached.make_loader()))
    assert len(pairs) == 4
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the cache was filled
    try:
        conditionings = [(encoded.conditioning(a), cached.conditioning(b)) for a, b in pairs]
    finally:
        torch.set_num_threads(threads)
    for (a, b), ((cond_a, uncond_a, first_a), (cond_b, uncond_b, first_b)) in zip(pairs, conditionings):
        assert a["prompts"] == b["prompts"]
        assert torch.equal(first_a, first_b)
        for want, got in ((cond_a, cond_b), (uncond_a, uncond_b)):
            for f in dataclasses.fields(want):
                x, y = getattr(want, f.name), getattr(got, f.name)
                assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y)), f.name
    with pytest.raises(NegativePromptMismatch, match=r"'blurry, static', this run's negative_prompt is 'dull'"):
        _data_side(load_train_config(cached_config, {"negative_prompt": "dull"}))


def test_the_checkpoint_loads_into_wan_and_causal_wan(dmd_runs):
    _, root, _, _, _ = dmd_runs
    from model.causal import CausalConfig, CausalWanModel
    from model.checkpoint import load_wan_model, strip_wrapper_prefix
    path = root / "full" / "checkpoint_model_000006" / "model.pt"
    from model.config import WAN_TINY_I2V
    model, report = load_wan_model(path, config=WAN_TINY_I2V)  # Self-Forcing's {"generator": {"model.<key>"}} layout
    assert model.config.model_type == "i2v" and report.loaded == len(model.state_dict())
    sd, _ = strip_wrapper_prefix(torch.load(path, weights_only=True)["generator"])
    causal = CausalWanModel(model.config, CausalConfig(2, independent_first_frame=True))
    causal.load_state_dict(sd, strict=True)


def test_a_checkpoint_of_another_config_or_job_is_refused(dmd_runs, demo_config, tmp_path):
    config, root, _, _, _ = dmd_runs
    other = load_train_config(config, {"causal.num_frame_per_block": 4})
    with pytest.raises(checkpointing.IncompatibleCheckpoint, match="causal.num_frame_per_block"):
        DMDTrainer.find_resumable(root / "full", other)
    from ds_trainer.adapter_trainer import AdapterTrainer
    adapter_cfg = load_train_config(demo_config)
    assert AdapterTrainer.find_resumable(root / "full", adapter_cfg) is None  # other prefix: never picked up
    shutil.copytree(root / "full" / "checkpoint_model_000006", tmp_path / "checkpoint_opens2v_000006")
    with pytest.raises(checkpointing.IncompatibleCheckpoint, match="job: checkpoint 'dmd' vs this run 'opens2v-adapters'"):
        AdapterTrainer.find_resumable(tmp_path, adapter_cfg)


def test_the_trained_generator_rolls_out_a_video_and_the_losses_plot(dmd_runs):
    """What `wanspeed demo --job dmd` ends with: both loss curves and a decoded rollout mp4."""
    import decord

    from ds_trainer.dmd_sample import rollout_video
    from ds_trainer.plot import plot_loss
    _, root, _, _, _ = dmd_runs
    png = plot_loss(root / "full", keys=("generator_loss", "critic_loss"))
    assert png.stat().st_size > 10_000
    video = rollout_video(root / "full", seed=1)
    frames = decord.VideoReader(str(video))
    assert len(frames) == 17  # 5 latent frames -> 1 + 4 * 4 pixel frames
    assert frames[0].shape[1] >= 2 * 48  # the first frame beside the rollout


def test_lora_dmd_under_zero2_trains_only_adapters_and_exports_them_as_longlive(dmd_runs, tmp_path):
    """LongLive's stage 2: its LoRA recipe (every Linear of the blocks) on generator and critic, with
    ZeRO-2 (the teacher a plain frozen module), and streaming long tuning (chunk 5, streams of at most
    9 frames, 2 or 4 new frames a step); the checkpoint samples through the causal loader, merged."""
    config = dmd_runs[0]
    lora = "adapter={adapter_type: lora, r: 2, lora_alpha: 2, target_modules: [all-linear]}"
    streaming = ("streaming_training=true", "streaming_max_length=9", "streaming_min_new_frame=2")
    run = launch(config, tmp_path / "lora", ranks=1, zero="2", sets=(lora, "max_iters=6", "log_iters=3", *streaming))
    assert finished(run)["step"] == 6
    rows = read_metrics(tmp_path / "lora")
    frames = [int(r["stream_frames"]) for r in rows]
    assert frames[0] == 5 and all(5 <= n <= 9 for n in frames), frames
    steps = list(zip(frames, frames[1:]))
    assert any(b - a in (2, 4) for a, b in steps) and all(b - a in (2, 4) or b == 5 for a, b in steps), frames
    assert all(b == 5 for a, b in steps if a + 2 > 9), frames  # a stream that cannot grow restarts
    assert [r["step"] for r in rows if "generator_loss" in r] == [1, 3, 5]
    assert all(r["critic_loss"] == r["critic_loss"] and r.get("generator_loss", 0) == r.get("generator_loss", 0)
               for r in rows)  # finite
    saved = torch.load(tmp_path / "lora" / "checkpoint_model_000003" / "model.pt", weights_only=True)
    assert set(saved) == {"generator_lora", "critic_lora"}  # no EMA with LoRA, as LongLive
    for role in saved.values():
        assert role and all("lora_" in k and k.startswith("model.") for k in role)
    assert any(v.abs().sum() > 0 for k, v in saved["generator_lora"].items() if "lora_B" in k)  # it trained
    targets = {k.split(".lora_")[0].removeprefix("model.") for k in saved["generator_lora"]}
    assert {"blocks.0.self_attn.q", "blocks.0.cross_attn.o", "blocks.0.ffn.0", "blocks.0.ffn.2"} <= targets

    from ds_trainer.causal_sample import load_causal_generator
    cfg = load_train_config(config, {"adapter": {"adapter_type": "lora", "r": 2, "lora_alpha": 2,
                                                 "target_modules": ["all-linear"]}})
    model = load_causal_generator(cfg, tmp_path / "lora" / "checkpoint_model_000003", str(config))
    assert not any("lora" in n for n, _ in model.named_parameters())
