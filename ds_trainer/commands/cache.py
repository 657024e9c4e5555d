"""`wanspeed cache --config RUN.yaml`: fill the run's `cache_dir` with encoder outputs.

Sharded across processes when launched with several (`deepspeed` / `torchrun` set RANK and
WORLD_SIZE; each rank encodes every WORLD_SIZE-th sample); resumable (finished samples are
skipped). Afterwards `wanspeed train` with `cache_dir` set loads no encoder at all. The random
choices of each sample (frame start, subject) are those of epoch 0 and stay fixed in the cache.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run config (its opens2v, encoders and cache_dir)")
    parser.add_argument("--shard-size", type=int, default=32, help="samples per safetensors shard")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    from data.cache import build_cache  # noqa: PLC0415
    from ds_trainer.config import load_train_config  # noqa: PLC0415
    from ds_trainer.datasets import opens2v_dataset  # noqa: PLC0415
    from model.encoders.bundle import load_frozen_encoders  # noqa: PLC0415

    cfg = load_train_config(args.config)
    if not cfg.cache_dir or cfg.encoders is None:
        raise SystemExit(f"{args.config}: `wanspeed cache` needs both cache_dir and encoders set")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    encoders = load_frozen_encoders(cfg.encoders, device)
    dataset = opens2v_dataset(cfg)
    progress = (lambda it: tqdm(it, desc=f"cache rank {rank}")) if rank == 0 else None
    stats = build_cache(dataset, encoders, cfg.cache_dir, rank, world, args.shard_size, progress)
    print(json.dumps({"rank": rank, "cache_dir": cfg.cache_dir, **stats.__dict__,
                      "skipped_bad_samples": sum(led.bad for led in dataset.ledgers)}))
    return 0
