"""`wanspeed sample`: a video from trained weights, as an H.264 mp4 (ds_trainer/sample.py).

    wanspeed sample --config C --ckpt CHECKPOINT --prompt "..." --subject-image IMG [...] --out v.mp4
        subject-reference mode (an OpenS2V adapter config): CFG with the negative prompt, optional
        separate reference guidance (--ref-guidance), UniPC or Euler on Wan's sigma grid
    wanspeed sample --config C_dmd --ckpt checkpoint_model_*/ --image FIRST_FRAME --prompt "..." --out v.mp4
        causal I2V mode (a DMD config): block by block through the KV cache, frames streamed to the mp4
    wanspeed sample --logdir DIR
        the older form: a dataset sample's prompt and subject through a run's newest checkpoint
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="run config YAML (the job picks the mode)")
    parser.add_argument("--ckpt", type=Path, default=None,
                        help="checkpoint dir, model.pt, adapter.safetensors or a peft LoRA dir")
    parser.add_argument("--prompt", action="append", default=None,
                        help="the prompt; in causal I2V mode repeat it with --switch-at for prompt switches")
    parser.add_argument("--negative-prompt", default=None, help="default: the config's negative_prompt, else empty")
    parser.add_argument("--subject-image", action="append", default=None, metavar="IMG",
                        help="subject image (RGBA: cut out by its alpha on white; RGB: taken as a cut-out); repeatable")
    parser.add_argument("--image", type=Path, default=None, help="causal I2V mode: the first frame")
    parser.add_argument("--switch-at", type=int, action="append", default=None, metavar="FRAME",
                        help="causal I2V mode: latent frame at which the next --prompt takes over (a block start)")
    parser.add_argument("--recache-sink", action="store_true",
                        help="causal I2V mode: at a switch re-cache the sink frames too (LongLive's global_sink "
                             "false); default: the sink keeps the first prompt's K, V")
    parser.add_argument("--frames", type=int, default=None, help="pixel frames, 1 + 4k (default: the training length)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the config's sample.steps)")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (1 = none)")
    parser.add_argument("--ref-guidance", type=float, default=None,
                        help="separate reference guidance: text+reference vs text-only vs neither")
    parser.add_argument("--shift", type=float, default=None, help="flow shift of the grid (default: timestep_shift)")
    parser.add_argument("--sampler", choices=["unipc", "euler"], default="unipc")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge-lora", action="store_true", help="fold LoRA into the base weights before sampling")
    parser.add_argument("--grid", action="store_true", help="also write a PNG contact sheet beside the mp4")
    parser.add_argument("--out", type=Path, default=None, help="the mp4 (default: sample.mp4; with --logdir DIR/sample.mp4)")
    # the older form
    parser.add_argument("--logdir", type=Path, default=None, help="older form: sample a run directory")
    parser.add_argument("--checkpoint", type=Path, default=None, help="with --logdir: default the newest complete one")
    parser.add_argument("--index", type=int, default=0, help="with --logdir: dataset sample giving prompt and subject")


def run(args: argparse.Namespace) -> int:
    if args.config is None:
        if args.logdir is None:
            raise SystemExit("wanspeed sample: give --config C --ckpt CHECKPOINT --prompt ... (or --logdir DIR)")
        args.config = None
    else:
        missing = [flag for flag, value in (("--ckpt", args.ckpt), ("--prompt", args.prompt)) if value is None]
        if missing:
            raise SystemExit(f"wanspeed sample --config: also give {' and '.join(missing)}")
        args.out = args.out or Path("sample.mp4")
    from ds_trainer import sample  # noqa: PLC0415  (torch, the model, the encoders)

    try:
        return sample.run(args)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"wanspeed sample: {exc}") from exc
