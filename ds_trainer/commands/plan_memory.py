"""`wanspeed plan-memory`: the predicted per-GPU peak of a run under ZeRO-2 / ZeRO-3 / ZeRO-3 +
offload, with activation checkpointing on and off, split into frozen weights, trainable weights,
gradients, optimizer states, activations and temporary buffers; which fit, the recommended
config, and `--write PATH` for its DeepSpeed JSON. The formulas: ds_trainer/memory_plan.py.

    wanspeed plan-memory --model wan-14b --frames 21 --height 480 --width 832 --gpus 8 --gpu-mem 80
    wanspeed plan-memory --model configs/train_i2v_dmd.yaml --gpus 16 --write ds.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = (("frozen W", "frozen_weights"), ("train W", "trainable_weights"), ("grads", "gradients"),
           ("optim", "optimizer"), ("activ", "activations"), ("buffers", "buffers"), ("opt step", "step"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="wan-1.3b, wan-14b, i2v-14b, or a run config YAML (its job, model, sizes and LoRA)")
    parser.add_argument("--job", choices=["adapter", "dmd"], default=None,
                        help="with a model name: the subject adapters (default) or DMD distillation")
    parser.add_argument("--frames", type=int, default=None,
                        help="latent frames, as num_training_frames (21 = 81 pixel frames; default 21)")
    parser.add_argument("--height", type=int, default=None, help="pixels (default 480)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default 832)")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch per rank (default 1)")
    parser.add_argument("--lora-rank", type=int, default=None, help="LoRA rank on the attention projections")
    parser.add_argument("--sp", type=int, default=None, help="sequence-parallel ranks per sample")
    parser.add_argument("--gpus", type=int, required=True, help="ranks in total (ZeRO shards over all of them)")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="memory of one GPU, GiB (default 80)")
    parser.add_argument("--write", default=None, metavar="PATH", help="write the recommended DeepSpeed JSON here")


def load_job(args: argparse.Namespace):
    """The run config the options describe: a YAML (flags override its sizes) or a named model."""
    from ds_trainer import memory_plan  # noqa: PLC0415
    sizes = {"num_training_frames": args.frames, "height": args.height, "width": args.width,
             "batch_size": args.batch, "sequence_parallel_size": args.sp}
    if args.model.endswith((".yaml", ".yml")) or Path(args.model).is_file():
        from ds_trainer.config import load_train_config  # noqa: PLC0415
        if args.job is not None or args.lora_rank is not None:
            raise SystemExit("plan-memory: --job and --lora-rank come from the run config; set them there")
        return load_train_config(args.model, {k: v for k, v in sizes.items() if v is not None})
    return memory_plan.preset_config(args.model, args.job or "adapter", args.frames or 21, args.height or 480,
                                     args.width or 832, args.lora_rank, args.batch or 1, args.sp or 1)


def format_plan(plan) -> str:
    from ds_trainer.memory_plan import GIB  # noqa: PLC0415
    job, lines = plan.job, []
    counts = ", ".join(f"{name} {c.total / 1e9:.3f}B ({c.trainable / 1e6:.1f}M trainable, {c.frozen / 1e9:.3f}B frozen)"
                       for name, c in plan.counts.items())
    s = job.shapes
    lines.append(f"{job.job}: {counts}")
    lines.append(f"micro-batch {s.batch} x {s.frames} latent frames x {s.height * 8}x{s.width * 8} = {job.tokens} tokens"
                 f" per sample{f', sequence parallel {job.sp}' if job.sp > 1 else ''}; {plan.gpus} GPU(s) of "
                 f"{plan.gpu_bytes / GIB:.0f} GiB ({plan.limit / GIB:.1f} GiB usable); GiB per GPU:")
    head = f"{'config':<22}" + "".join(f"{name:>10}" for name, _ in COLUMNS) + f"{'peak':>10}  fits  host/rank"
    lines.append(head)
    for r in plan.rows:
        m = r.memory
        name = f"zero{r.layout.replace('-offload', '+offload')} ckpt {'on' if r.checkpointing else 'off'}"
        cells = "".join(f"{getattr(m, key) / GIB:>10.2f}" for _, key in COLUMNS)
        host = f"{m.host / GIB:.1f}" if m.host else "-"
        lines.append(f"{name:<22}{cells}{m.peak / GIB:>10.2f}  {'yes ' if r.fits else 'no  '}  {host}")
    best = plan.recommended()
    if best is None:
        lines.append(plan.no_fit_message())
    else:
        lines.append(f"recommended: --zero {best.layout} with model.activation_checkpointing: "
                     f"{str(best.checkpointing).lower()} (peak {best.memory.peak / GIB:.1f} GiB)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ds_trainer import memory_plan  # noqa: PLC0415
    cfg = load_job(args)
    plan = memory_plan.make_plan(memory_plan.job_from_config(cfg), args.gpus, int(args.gpu_mem * memory_plan.GIB))
    print(format_plan(plan))
    best = plan.recommended()
    if args.write:
        if best is None:
            print(f"plan-memory: nothing written to {args.write}: no config fits")
            return 1
        ds = memory_plan.deepspeed_config(plan, best)
        Path(args.write).write_text(json.dumps(ds, indent=2) + "\n")
        print(f"wrote {args.write} (ZeRO-{best.layout}); set model.activation_checkpointing: "
              f"{str(best.checkpointing).lower()} in the run config")
    return 0 if best is not None else 1
