"""`wanspeed demo`: the README's main job on its embedded tiny default (steps in ds_trainer/demo.py)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="where everything goes")
    parser.add_argument("--ranks", type=int, default=2, help="CPU processes under deepspeed (default 2)")
    parser.add_argument("--zero", choices=["2", "3", "3-offload"], default="3")
    parser.add_argument("--clips", type=int, default=48, help="synthetic training clips (default 48)")
    parser.add_argument("--job", choices=["opens2v-adapters", "dmd"], default="opens2v-adapters",
                        help="the subject-adapter job (default) or the I2V DMD distillation (configs/tiny_i2v_dmd.yaml)")


REF_GAIN_REPEATS = 4
"""Noise / timestep draws per sample of every ref_gain the demo reports."""
HELDOUT_VALIDATION_EVERY = 240
"""Steps between the training run's held-out ref_gain validations (and one before the first step)."""


def run(args: argparse.Namespace) -> int:
    if args.job == "dmd":
        return run_dmd(args)
    from ds_trainer import sample  # noqa: PLC0415
    from ds_trainer.adapter_trainer import AdapterTrainer  # noqa: PLC0415
    from ds_trainer.commands import cache  # noqa: PLC0415
    from ds_trainer.demo import (launch_training, measure_likeness, measure_ref_gain, prepare,  # noqa: PLC0415
                                 prepare_heldout)
    from ds_trainer.metrics import read_metrics, summarise  # noqa: PLC0415
    from ds_trainer.plot import plot_loss  # noqa: PLC0415

    t0, times = time.perf_counter(), {}
    root = args.out.resolve()
    config = prepare(root, args.clips)
    times["prepare"] = time.perf_counter() - t0
    heldout = prepare_heldout(root)
    for cfg_path in (config, heldout):
        cache.run(argparse.Namespace(config=str(cfg_path), shard_size=32, local_rank=None))
    times["cache"] = time.perf_counter() - t0 - sum(times.values())
    caches = {"train_clips": root / "cache", "heldout_clips": root / "cache_heldout"}
    gain = {"untrained": {name: measure_ref_gain(config, d, repeats=REF_GAIN_REPEATS) for name, d in caches.items()}}
    logdir = root / "run"
    # held-out ref_gain at every validation, on the draws the before/after measurement uses
    validation = (f"validation={{every: {HELDOUT_VALIDATION_EVERY}, ref_gain_cache_dir: '{caches['heldout_clips']}', "
                  f"ref_gain_samples: {gain['untrained']['heldout_clips'].samples}, ref_gain_repeats: {REF_GAIN_REPEATS}}}")
    launch_training(config, logdir, args.ranks, args.zero, extra=["--no-auto-resume", "--set", validation])
    times["train"] = time.perf_counter() - t0 - sum(times.values())
    final = AdapterTrainer.list_checkpoints(logdir)[-1]
    gain["trained"] = {name: measure_ref_gain(config, d, final, repeats=REF_GAIN_REPEATS) for name, d in caches.items()}
    likeness = measure_likeness(config, final)
    times["ref_gain+likeness"] = time.perf_counter() - t0 - sum(times.values())
    png = plot_loss(logdir)
    sample.run(argparse.Namespace(logdir=logdir, checkpoint=None, index=0, steps=None, out=None))
    times["plot+sample"] = time.perf_counter() - t0 - sum(times.values())
    summary = summarise(read_metrics(logdir))
    print(json.dumps({"logdir": str(logdir), "loss_curve": str(png), "sample": str(logdir / "sample.mp4"),
                      "loss": summary, "ref_gain": _ref_gain_table(gain),
                      "heldout_ref_gain_during_training": _validation_curve(logdir),
                      "subject_likeness": likeness, "seconds": {k: round(v, 1) for k, v in times.items()},
                      "total_seconds": round(time.perf_counter() - t0, 1)}, indent=2))
    return 0 if summary and summary["relative_drop"] > 0 else 1


def _validation_curve(logdir: Path) -> list[dict]:
    """[{step, ref_gain}] of the run's validations (validation.jsonl, written by rank 0)."""
    path = logdir / "validation.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [{"step": r["step"], "ref_gain": round(r["ref_gain"], 4)} for r in rows if "ref_gain" in r]


def _ref_gain_table(gain: dict) -> dict:
    """{untrained|trained: {train_clips|heldout_clips: ratio and the two losses}} for the summary:
    train_clips are the clips trained on (fresh noise), heldout_clips show subjects never seen."""
    return {when: {name: {"ref_gain": round(g.ratio, 4), "loss_own": round(g.loss_own, 4),
                          "loss_other": round(g.loss_other, 4), "samples": g.samples} for name, g in row.items()}
            for when, row in gain.items()}


def run_dmd(args: argparse.Namespace) -> int:
    """Tiny I2V DMD: 3 roles under deepspeed on CPU, then the loss curves and a rollout mp4."""
    from ds_trainer.demo import launch_training, prepare_dmd  # noqa: PLC0415
    from ds_trainer.dmd_sample import rollout_video  # noqa: PLC0415
    from ds_trainer.metrics import read_metrics  # noqa: PLC0415
    from ds_trainer.plot import plot_loss  # noqa: PLC0415

    t0 = time.perf_counter()
    root = args.out.resolve()
    config = prepare_dmd(root, min(args.clips, 4))
    logdir = root / "dmd"
    launch_training(config, logdir, args.ranks, args.zero, extra=["--no-auto-resume", "--set", "max_iters=20",
                                                                  "--set", "log_iters=10"])
    png = plot_loss(logdir, keys=("generator_loss", "critic_loss"))
    video = rollout_video(logdir)
    rows = read_metrics(logdir)
    phases = {k: round(sum(r.get(k, 0.0) for r in rows) / len(rows), 3)
              for k in ("time_rollout_s", "time_dmd_s", "time_critic_s", "step_time_s")}
    print(json.dumps({"logdir": str(logdir), "loss_curves": str(png), "rollout": str(video),
                      "steps": len(rows), "mean_seconds_per_step": phases,
                      "total_seconds": round(time.perf_counter() - t0, 1)}, indent=2))
    return 0
