"""Validation during a subject-adapter run: sampled videos of fixed prompts and subjects, and ref_gain.

Every `every` optimizer steps (and before the first step of a fresh run, the untrained baseline)
EVERY rank takes part, because under ZeRO-3 each forward gathers parameters collectively: the
prompts are sharded over the ranks (rank r samples prompts r, r + W, ...) and a rank with fewer
prompts than the most loaded one samples a stand-in (prompt 0) and discards it, so every rank runs
the same number of forwards. The same holds for ref_gain's held-out samples. Each rank writes its
videos (H.264 mp4 + contact sheet, ds_trainer/video_out.py) under
`<logdir>/validation/step_<step>/`; after a barrier rank 0 appends the metrics to
`<logdir>/validation.jsonl` and logs them, the videos and the sheets to wandb. Sampling reuses
`wanspeed sample`'s pieces (ds_trainer/sample.py); ref_gain is ds_trainer/ref_gain.py.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from model.config import ConfigError

log = logging.getLogger(__name__)


@dataclass
class ValidationSection:
    """`validation:` of an adapter run (absent = no validation)."""

    every: int = 500
    """Optimizer steps between validations; a fresh run also validates before its first step."""
    prompts: list[str] = field(default_factory=list)
    """One video per prompt at each validation (may be empty: then only ref_gain)."""
    subject_images: list[str] = field(default_factory=list)
    """One subject image per prompt, or one for every prompt (cut out on white as `wanspeed sample`
    does: an image with alpha is cut out by it, an opaque one is taken as already cut out)."""
    steps: int = 8
    """Sampler steps per video."""
    sampler: str = "unipc"
    """'unipc' or 'euler' (ds_trainer/schedulers.py)."""
    guidance: float = 5.0
    """Classifier-free guidance scale against the empty prompt; 1 = no guidance (one forward a step)."""
    seed: int = 0
    """Seeds each prompt's noise (prompt i: seed + i), the same at every validation."""
    ref_gain_cache_dir: Optional[str] = None
    """A `wanspeed cache` directory of held-out clips to measure ref_gain on; None = the run's own
    `cache_dir` (the trained clips), and no ref_gain when the run has none."""
    ref_gain_samples: int = 8
    """Samples of that cache ref_gain uses (the first ones)."""
    ref_gain_repeats: int = 2
    """Noise / timestep draws per sample."""

    def __post_init__(self):
        for name in ("every", "steps", "ref_gain_samples", "ref_gain_repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", key=name)
        if self.sampler not in ("unipc", "euler"):
            raise ConfigError(f"must be 'unipc' or 'euler', got {self.sampler!r}", key="sampler")
        if not 0 < self.guidance < float("inf"):
            raise ConfigError(f"must be a finite number > 0, got {self.guidance}", key="guidance")
        if self.prompts and len(self.subject_images) not in (1, len(self.prompts)):
            raise ConfigError(f"needs one image per prompt ({len(self.prompts)}) or one for all, got "
                              f"{len(self.subject_images)}", key="subject_images")
        for i, path in enumerate(self.subject_images):
            if not Path(path).is_file():
                raise ConfigError(f"no such file: {path}", key=f"subject_images[{i}]")

    def subject_for(self, prompt: int) -> str:
        return self.subject_images[prompt if len(self.subject_images) > 1 else 0]


def rank_slots(count: int, rank: int, world: int) -> list[Optional[int]]:
    """The items rank `rank` handles out of `count`: r, r + W, ..., padded with None (a stand-in
    to run and discard) to ceil(count / W) entries, the same number on every rank."""
    mine: list[Optional[int]] = list(range(rank, count, world))
    return mine + [None] * (math.ceil(count / world) - len(mine))


class VideoValidation:
    """What every job's validation shares: `run` on every rank (this rank's videos, then the job's
    metrics), the per-step directory, and rank 0's log line + wandb media. A job's validator sets
    `logdir`, `rank`, `world` (and `sp_size` under sequence parallelism) and provides `_videos` (and
    `_metrics`). Under SP the ranks of a group (consecutive ranks, model/sequence_parallel.py) hold
    shards of ONE video, so prompts are sharded over the groups, and only a group's first rank writes."""

    logdir: Path
    rank: int
    world: int
    sp_size: int = 1

    def _slots(self, count: int) -> list[Optional[int]]:
        """This rank's items of `count` (rank_slots over the data-parallel groups)."""
        return rank_slots(count, self.rank // self.sp_size, self.world // self.sp_size)

    @property
    def writes(self) -> bool:
        """Whether this rank writes the videos it samples (its SP group's first rank)."""
        return self.rank % self.sp_size == 0

    def run(self, model, step: int, wandb_run=None) -> dict[str, float]:
        """Every rank: this rank's videos, then the metrics over all ranks; rank 0 logs. Returns the metrics."""
        from ds_trainer.distributed import barrier  # noqa: PLC0415
        was_training = model.training
        model.eval()
        try:
            videos = self._videos(model, step)
            metrics = self._metrics(model)
        finally:
            model.train(was_training)
        barrier()  # every rank's files are on disk before rank 0 logs them
        if self.rank == 0:
            self._log(step, metrics, wandb_run)
        log.info("validation at step %d: %s (%d videos on rank %d)", step,
                 ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "videos only", len(videos), self.rank)
        return metrics

    def _videos(self, model, step: int) -> list[Path]:
        raise NotImplementedError

    def _metrics(self, model) -> dict[str, float]:
        return {}

    def step_dir(self, step: int) -> Path:
        return self.logdir / "validation" / f"step_{step:06d}"

    def _log(self, step: int, metrics: dict[str, float], wandb_run) -> None:
        videos = sorted(self.step_dir(step).glob("prompt_*.mp4"))
        with (self.logdir / "validation.jsonl").open("a") as fh:
            fh.write(json.dumps({"step": step, **metrics, "videos": [str(v) for v in videos]}) + "\n")
        if wandb_run is None:
            return
        import wandb  # noqa: PLC0415
        media = {f"validation/{v.stem}": wandb.Video(str(v), format="mp4") for v in videos}
        media.update({f"validation/{v.stem}_sheet": wandb.Image(str(v.with_suffix(".png"))) for v in videos})
        wandb_run.log({**{f"validation/{k}": v for k, v in metrics.items()}, **media}, step=step)


class Validator(VideoValidation):
    """Runs one validation (`run`) of an adapter run's generator; built once per run on every rank."""

    def __init__(self, section: ValidationSection, encoders, logdir: Path, rank: int, world: int,
                 reference_size: tuple[int, int], latent_shape: tuple[int, int, int], timestep_shift: float,
                 fps: int, ref_gain_cache: Optional[str], refs, device: torch.device, sp_size: int = 1):
        """latent_shape: (F, h, w) of a sampled video's latents; refs: the generator's
        ReferencePathsConfig; sp_size: the run's sequence_parallel_size."""
        self.section, self.encoders, self.logdir = section, encoders, Path(logdir)
        self.refs, self.device = refs, device
        self.rank, self.world, self.sp_size = rank, world, sp_size
        self.reference_size, self.latent_shape = reference_size, latent_shape
        self.shift, self.fps = timestep_shift, fps
        self.samples, self.keys = [], []
        if ref_gain_cache:
            from ds_trainer.ref_gain import cached_samples, swap_partners  # noqa: PLC0415
            self.samples, self.keys = cached_samples(ref_gain_cache, refs.clip, section.ref_gain_samples)
            self.partners = swap_partners(self.keys)

    def _metrics(self, model) -> dict[str, float]:
        return self._ref_gain(model) if self.samples else {}

    @torch.no_grad()
    def _videos(self, model, step: int) -> list[Path]:
        from ds_trainer.sample import denoise, guidance_branches, load_subject_image  # noqa: PLC0415
        from ds_trainer.schedulers import FlowSampler  # noqa: PLC0415
        from ds_trainer.video_out import Mp4Writer, contact_sheet  # noqa: PLC0415
        sec, written, device = self.section, [], self.device
        for slot in self._slots(len(sec.prompts)):
            index = 0 if slot is None else slot
            subjects = load_subject_image(Path(sec.subject_for(index)), *self.reference_size)[None, None]
            br = guidance_branches(self.encoders, self.refs, sec.prompts[index], "", subjects.to(device), False)
            noise = torch.randn((1, 16, *self.latent_shape), generator=torch.Generator().manual_seed(sec.seed + index))
            latents = denoise(model, noise.to(device), br, FlowSampler(sec.sampler, sec.steps, self.shift),
                              sec.guidance, None)
            if slot is None or not self.writes:
                continue  # a stand-in (the same forwards as the others) or another SP rank: nothing written
            video = self.encoders.vae.decode(latents.float())[0]
            out = self.step_dir(step) / f"prompt_{slot:02d}.mp4"
            with Mp4Writer(out, self.fps) as writer:
                writer.append(video)
            contact_sheet(video.cpu(), [subjects[0, 0]], out.with_suffix(".png"))
            written.append(out)
        return written

    def _ref_gain(self, model) -> dict[str, float]:
        from ds_trainer.distributed import all_reduce_scalar  # noqa: PLC0415
        from ds_trainer.ref_gain import RefGain, sample_losses  # noqa: PLC0415
        from model.flow_matching import FlowMatchingScheduler  # noqa: PLC0415
        scheduler, reps = FlowMatchingScheduler(shift=self.shift), self.section.ref_gain_repeats
        device = self.device
        own = other = count = 0.0
        for slot in self._slots(len(self.samples)):
            i = 0 if slot is None else slot
            inputs, donor = self.samples[i], self.samples[self.partners[i]]
            inputs = type(inputs)(inputs.latents.to(device), inputs.cond.to(device))
            a, b = sample_losses(model, inputs, donor.cond.to(device), scheduler, self.section.seed, i, reps)
            if slot is not None:
                own, other, count = own + a, other + b, count + reps
        own, other, count = (all_reduce_scalar(v) for v in (own, other, count))
        return RefGain(own / count, other / count, len(self.samples)).metrics()
