"""A rollout video from a DMD run: the trained causal generator (`generator_ema` when the
checkpoint has it) generates the training length block by block through its KV cache from the
first frame of a dataset row, with the last denoising step of every block; decoded and written
as an mp4 beside the first frame. What `wanspeed demo --job dmd` shows; `wanspeed sample`'s
streaming I2V mode (issue 14) is the general tool."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch


@torch.no_grad()
def rollout_video(logdir: Path, checkpoint: Optional[Path] = None, index: int = 0, seed: int = 0,
                  out: Optional[Path] = None, fps: int = 8) -> Path:
    from data.encode import encode_i2v  # noqa: PLC0415
    from data.i2v import collate_i2v_batch  # noqa: PLC0415
    from ds_trainer.causal_sample import load_causal_generator, stream_rollout  # noqa: PLC0415
    from ds_trainer.config import load_train_config  # noqa: PLC0415
    from ds_trainer.dmd_trainer import DMDTrainer  # noqa: PLC0415
    from ds_trainer.sample import write_mp4  # noqa: PLC0415
    from model.encoders.bundle import load_frozen_encoders  # noqa: PLC0415

    config = Path(logdir) / "config.yaml"
    cfg = load_train_config(config)
    ckpt = checkpoint or DMDTrainer.find_resumable(Path(logdir), cfg)
    if ckpt is None:
        raise SystemExit(f"{logdir}: no complete DMD checkpoint")
    model = load_causal_generator(cfg, Path(ckpt), str(config))
    encoders = load_frozen_encoders(cfg.encoders)
    dataset = DMDTrainer.dataset_of(cfg)
    batch = collate_i2v_batch([dataset[index]])
    cond, first = encode_i2v(encoders, batch["image"], batch["prompts"], cfg.num_training_frames)
    rng = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, 16, *cond.y.shape[2:]), generator=rng)
    latents = stream_rollout(model, cfg, cond, first, noise, rng)
    video = encoders.vae.decode(latents)[0]
    return write_mp4(video, batch["image"][0], out or Path(logdir) / "rollout.mp4", fps)
