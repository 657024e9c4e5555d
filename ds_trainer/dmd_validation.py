"""Validation during a DMD run: the causal generator's streaming I2V videos of fixed prompts and
first frames, as `wanspeed sample` makes them (ds_trainer/causal_sample.py: the few-step list block
by block through the KV cache), every `every` generator steps and before the first step.

As the adapter job's validation (ds_trainer/validation.py): every rank takes part (ZeRO-3 gathers
are collectives), prompts sharded over the ranks with stand-ins so every rank runs the same number of
forwards, mp4 + contact sheet (first frame beside the sampled frames) under
`<logdir>/validation/step_<step>/`, `validation.jsonl` and wandb media from rank 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ds_trainer.validation import VideoValidation
from model.config import ConfigError


@dataclass
class I2VValidationSection:
    """`validation:` of a DMD run (absent = no validation)."""

    every: int = 200
    """Steps between validations; a fresh run also validates before its first step."""
    prompts: list[str] = field(default_factory=list)
    """One video per prompt at each validation."""
    images: list[str] = field(default_factory=list)
    """The first frame of each prompt's video, or one for every prompt."""
    num_frames: Optional[int] = None
    """Latent frames per video; None = num_training_frames (more runs the sink + window past training)."""
    seed: int = 0
    """Seeds each prompt's noise (prompt i: seed + i), the same at every validation."""

    def __post_init__(self):
        if self.every < 1:
            raise ConfigError(f"must be >= 1, got {self.every}", key="every")
        if not self.prompts:
            raise ConfigError("needs at least one prompt", key="prompts")
        if len(self.images) not in (1, len(self.prompts)):
            raise ConfigError(f"needs one first frame per prompt ({len(self.prompts)}) or one for all, got "
                              f"{len(self.images)}", key="images")
        for i, path in enumerate(self.images):
            if not Path(path).is_file():
                raise ConfigError(f"no such file: {path}", key=f"images[{i}]")
        if self.num_frames is not None and self.num_frames < 1:
            raise ConfigError(f"must be >= 1, got {self.num_frames}", key="num_frames")

    def image_for(self, prompt: int) -> str:
        return self.images[prompt if len(self.images) > 1 else 0]


class CausalI2VValidator(VideoValidation):
    """One validation (`run`) of a DMD run's generator; built once per run on every rank."""

    def __init__(self, cfg, encoders, logdir: Path, rank: int, world: int, device: torch.device, fps: int = 16):
        self.cfg, self.section = cfg, cfg.validation
        self.encoders, self.logdir, self.rank, self.world = encoders, Path(logdir), rank, world
        self.sp_size = cfg.sequence_parallel_size
        self.device, self.fps = device, fps
        self.frames = self.section.num_frames or cfg.num_training_frames

    @torch.no_grad()
    def _videos(self, model, step: int) -> list[Path]:
        from ds_trainer.causal_sample import i2v_inputs, stream_rollout  # noqa: PLC0415
        from ds_trainer.video_out import Mp4Writer, contact_sheet  # noqa: PLC0415
        sec, written, dtype = self.section, [], next(model.parameters()).dtype
        for slot in self._slots(len(sec.prompts)):
            index = 0 if slot is None else slot
            cond, first, image = i2v_inputs(self.cfg, self.encoders, Path(sec.image_for(index)), sec.prompts[index],
                                            self.frames)
            rng = torch.Generator().manual_seed(sec.seed + index)
            noise = torch.randn((1, 16, *cond.y.shape[2:]), generator=rng)
            latents = stream_rollout(model, self.cfg, cond.to(self.device, dtype), first.to(self.device, dtype),
                                     noise.to(self.device, dtype), rng)
            if slot is None or not self.writes:
                continue  # a stand-in (the same forwards as the others) or another SP rank: nothing written
            video = self.encoders.vae.decode(latents.float())[0].float().cpu()
            out = self.step_dir(step) / f"prompt_{slot:02d}.mp4"
            with Mp4Writer(out, self.fps) as writer:
                writer.append(video)
            contact_sheet(video, [image], out.with_suffix(".png"))
            written.append(out)
        return written
