"""`wanspeed cache --config RUN.yaml`: fill the run's `cache_dir` with encoder outputs: for the
adapter job the OpenS2V cache (data/cache.py), for the DMD job (`job: dmd`) the I2V cache of
first frames, prompts and the negative prompt (data/i2v_cache.py).

Sharded across processes when launched with several (`deepspeed` / `torchrun` set RANK and
WORLD_SIZE; each rank encodes every WORLD_SIZE-th sample); resumable (finished samples are
skipped). Afterwards `wanspeed train` with `cache_dir` set loads no encoder at all. The random
choices of each sample (frame start, subject; a clip's first frame) are those of epoch 0 and stay
fixed in the cache.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run config (its data, encoders and cache_dir)")
    parser.add_argument("--shard-size", type=int, default=32, help="samples per safetensors shard")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    from ds_trainer.config import load_train_config  # noqa: PLC0415
    from model.encoders.bundle import load_frozen_encoders  # noqa: PLC0415

    cfg = load_train_config(args.config)
    if not getattr(cfg, "cache_dir", None) or cfg.encoders is None:
        raise SystemExit(f"{args.config}: `wanspeed cache` needs both cache_dir and encoders set")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    encoders = load_frozen_encoders(cfg.encoders, device)
    progress = (lambda it: tqdm(it, desc=f"cache rank {rank}")) if rank == 0 else None
    fill = _fill_i2v_cache if cfg.job == "dmd" else _fill_opens2v_cache
    stats = fill(cfg, encoders, rank, world, args.shard_size, progress)
    print(json.dumps({"rank": rank, "cache_dir": cfg.cache_dir, **stats}))
    return 0


def _fill_opens2v_cache(cfg, encoders, rank, world, shard_size, progress) -> dict:
    from data.cache import build_cache  # noqa: PLC0415
    from ds_trainer.datasets import opens2v_dataset  # noqa: PLC0415

    dataset = opens2v_dataset(cfg)
    stats = build_cache(dataset, encoders, cfg.cache_dir, rank, world, shard_size, progress)
    return {**stats.__dict__, "skipped_bad_samples": sum(led.bad for led in dataset.ledgers)}


def _fill_i2v_cache(cfg, encoders, rank, world, shard_size, progress) -> dict:
    """The DMD config's prompts + first frames (its training dataset) and its negative prompt."""
    from data.i2v_cache import build_i2v_cache  # noqa: PLC0415
    from ds_trainer.dmd_trainer import DMDTrainer  # noqa: PLC0415

    stats = build_i2v_cache(DMDTrainer.dataset_of(cfg), encoders, cfg.cache_dir, cfg.num_training_frames,
                            cfg.negative_prompt, rank, world, shard_size, progress)
    return stats.__dict__
