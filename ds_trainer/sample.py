"""`wanspeed sample --logdir DIR`: a short video from a trained run, as an mp4.

Builds the generator the way the seed's inference does: base weights, then the run's
`model.pt` loaded with `strict=False` (only base keys may be missing), then a few-step Euler
flow-matching sampler conditioned on a dataset sample's prompt and subject, decoded by the VAE.
The subject image is shown left of each frame.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

log = logging.getLogger(__name__)


def load_trained_generator(cfg, checkpoint: Path):
    """Base + LoRA + the checkpoint's trainable weights (`load_state_dict(strict=False)`)."""
    import dataclasses  # noqa: PLC0415

    from ds_trainer.trainable import apply_lora  # noqa: PLC0415
    from model.checkpoint import load_wan_model  # noqa: PLC0415
    from model.wan import WanModel  # noqa: PLC0415

    wan_cfg = cfg.wan_config()
    model = (load_wan_model(cfg.generator_ckpt, reference_paths=wan_cfg.reference_paths)[0]
             if cfg.generator_ckpt else WanModel(wan_cfg))
    if cfg.adapter:
        model = apply_lora(model, dataclasses.replace(cfg.adapter, lora_dropout=0.0))
    trained = torch.load(checkpoint / "model.pt", map_location="cpu", weights_only=True)["generator"]
    missing, unexpected = model.load_state_dict(trained, strict=False)
    if unexpected:
        raise ValueError(f"{checkpoint}/model.pt has keys this model lacks: {unexpected[:5]}")
    return model.eval()


@torch.no_grad()
def sample_video(model, inputs, steps: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Euler flow-matching sampling from noise: returns latents shaped like inputs.latents."""
    from model.flow_matching import FlowMatchingScheduler  # noqa: PLC0415
    sch = FlowMatchingScheduler(shift=shift)
    x = torch.randn(inputs.latents.shape, generator=generator)
    sigmas = sch.sampling_sigmas(steps)
    b = x.shape[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        flow = model(x, sch.timestep(s).expand(b), inputs.cond)
        x = sch.euler_step(x, flow, s.expand(b), s_next.expand(b))
    return x


def write_mp4(video: torch.Tensor, subject: Optional[torch.Tensor], path: Path, fps: int) -> Path:
    """video [3, T, H, W] and subject [3, H, W] in [-1, 1] -> mp4 (libx264), subject on the left."""
    import imageio.v2 as imageio  # noqa: PLC0415
    to8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    frames = to8(video).permute(1, 2, 3, 0).numpy()                  # [T, H, W, 3]
    if subject is not None:
        ref = to8(torch.nn.functional.interpolate(subject[None], size=frames.shape[1:3], mode="bilinear")[0])
        frames = np.concatenate([np.repeat(ref.permute(1, 2, 0).numpy()[None], len(frames), 0), frames], axis=2)
    pad_h, pad_w = (-frames.shape[1]) % 16, (-frames.shape[2]) % 16  # macroblock-friendly size
    frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    imageio.mimwrite(path, list(frames), fps=fps, codec="libx264", quality=8, macro_block_size=1)
    return path


def run(args) -> int:
    """args: the options of `wanspeed sample` (ds_trainer/commands/sample.py)."""
    from data.opens2v import collate_opens2v_batch  # noqa: PLC0415
    from ds_trainer.config import load_train_config, trainer_class  # noqa: PLC0415
    from ds_trainer.datasets import opens2v_dataset  # noqa: PLC0415
    from ds_trainer.flow_step import inputs_from_batch  # noqa: PLC0415
    from model.encoders.bundle import load_frozen_encoders  # noqa: PLC0415

    cfg = load_train_config(args.logdir / "config.yaml")
    ckpt = args.checkpoint or trainer_class(cfg).find_resumable(args.logdir, cfg)
    if ckpt is None:
        raise SystemExit(f"{args.logdir}: no complete checkpoint to sample from")
    if cfg.encoders is None:
        raise SystemExit("sampling needs the encoders (T5, CLIP, VAE) in the run config")
    model = load_trained_generator(cfg, Path(ckpt))
    encoders = load_frozen_encoders(cfg.encoders)
    sample = opens2v_dataset(cfg)[args.index]
    inputs = inputs_from_batch(collate_opens2v_batch([sample]), encoders, torch.device("cpu"),
                               model.config.reference_paths.clip)
    latents = sample_video(model, inputs, args.steps or cfg.sample.steps, cfg.timestep_shift,
                           torch.Generator().manual_seed(cfg.seed))
    video = encoders.vae.decode(latents)[0].float()
    out = write_mp4(video, sample["subject_images"][0], args.out or args.logdir / "sample.mp4", cfg.sample.fps)
    print(f"wrote {out} ({video.shape[1]} frames, prompt: {sample['prompt']!r}, checkpoint {Path(ckpt).name})")
    return 0
