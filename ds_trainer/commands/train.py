"""`wanspeed train`: the training job the config names (`job:`; default the subject adapters). Launch with `deepspeed` (one node or --hostfile):

    deepspeed --num_gpus 8 --module ds_trainer.train --config configs/train_opens2v.yaml --logdir out/
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module ds_trainer.train --config configs/tiny_opens2v.yaml --logdir out/

or as a single plain process for debugging: `wanspeed train --config ... --logdir ...`.
Flags override the config file only when given.
"""
from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "--config_path", dest="config", required=True,
                        help="run config YAML (see configs/train_opens2v.yaml); --config_path is the seed's name")
    parser.add_argument("--logdir", required=True, help="checkpoints, metrics and copies of the configs go here")
    parser.add_argument("--no-auto-resume", action="store_true", help="start fresh even if DIR has checkpoints")
    parser.add_argument("--zero", choices=["2", "3", "3-offload", "auto"], default=None,
                        help="DeepSpeed ZeRO config to use; auto: the first that fits by ds_trainer/memory_plan.py")
    parser.add_argument("--deepspeed-config", default=None, help="a DeepSpeed JSON instead of configs/ds/*")
    parser.add_argument("--disable-wandb", action="store_true", default=None, help="no wandb logging")
    parser.add_argument("--max-iters", type=int, default=None)
    parser.add_argument("--sp", type=int, default=None, metavar="K",
                        help="sequence parallelism: K ranks split each sample's tokens (sequence_parallel_size)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key (dotted, YAML value), e.g. --set lr=5e-5")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # added by `deepspeed`


def overrides_from(args: argparse.Namespace) -> dict:
    import yaml  # noqa: PLC0415
    out = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    for flag, key in (("zero", "zero"), ("deepspeed_config", "deepspeed_config"), ("disable_wandb", "disable_wandb"),
                      ("max_iters", "max_iters"), ("sp", "sequence_parallel_size")):
        if getattr(args, flag) is not None:  # only flags actually given override the file
            out[key] = getattr(args, flag)
    return out


def run(args: argparse.Namespace) -> int:
    from ds_trainer.config import load_train_config, trainer_class  # noqa: PLC0415

    cfg = load_train_config(args.config, overrides_from(args))
    if cfg.zero == "auto":
        cfg.zero = auto_zero(cfg)
    trainer = trainer_class(cfg)(cfg, args.logdir, auto_resume=not args.no_auto_resume)
    summary = trainer.train()
    if trainer.rank == 0:
        print(json.dumps({"finished": summary}))
    return 0


def auto_zero(cfg) -> str:
    """The ZeRO layout `zero: auto` resolves to for this run's config and world size (the launcher's
    WORLD_SIZE / LOCAL_WORLD_SIZE; 1 for a plain process), logged with its estimate on rank 0."""
    import os  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from ds_trainer.commands.plan_memory import format_plan  # noqa: PLC0415
    from ds_trainer.memory_plan import GIB, resolve_auto_zero  # noqa: PLC0415
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout, plan = resolve_auto_zero(cfg, world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
                                     torch.cuda.is_available())
    if int(os.environ.get("RANK", "0")) == 0:
        row = plan.row(layout, plan.job.roles[0].checkpointing)
        log.info("zero: auto -> ZeRO-%s (predicted peak %.1f GiB of %.1f GiB per rank)\n%s", layout,
                 row.memory.peak / GIB, plan.gpu_bytes / GIB, format_plan(plan))
    return layout
