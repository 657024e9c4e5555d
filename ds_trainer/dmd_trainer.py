"""`DMDTrainer`: I2V Self-Forcing / LongLive DMD distillation on DeepSpeed (`job: dmd`).

Three roles in one process group, each built partitioned under ZeRO-3 (or whole under ZeRO-2):
- generator: a `CausalWanModel` (trainable: full, or LoRA), its own engine, AdamW and schedule;
- critic (fake score): a bidirectional Wan (trainable), its own engine, AdamW and schedule;
- real score: the frozen teacher (may be larger), an engine without optimizer under ZeRO-3,
  a plain frozen module otherwise; never checkpointed (it reloads from its weights).

A step: every `dfake_gen_update_ratio` steps the generator rolls out a video through its KV cache
with gradients at the exit step (ds_trainer/self_forcing.py) and takes the DMD gradient of the real
(CFG) and fake scores; every step the critic learns the flow of a no-grad rollout. `clip_fea` and
`y` (sliced per block for the generator) condition every call (data/encode.py: encode_i2v; with
`cache_dir`, read from `wanspeed cache` outputs, data/i2v_cache.py, and no encoder is loaded).
With `sequence_parallel_size` K all three roles run sequence-parallel (model/sequence_parallel.py)
and the K ranks of a group make the same draws (noise and DMD timesteps seeded by the
data-parallel rank, exit steps broadcast from rank 0), so they roll out, score and learn one video.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch

from data.i2v import I2VImageDataset, OpenS2VFirstFrameDataset, collate_i2v_batch
from ds_trainer import checkpointing as ckpt
from ds_trainer.distributed import any_rank, process_rank
from ds_trainer.config import architecture_key
from ds_trainer.dmd_config import DMDConfig
from ds_trainer.dmd_loss import DMDTimesteps, critic_loss, distribution_matching_loss
from ds_trainer.ds_config import eval_ds_config
from ds_trainer.ema import ShardedEMA
from ds_trainer.engine import build_engine, count_parameters
from ds_trainer.flow_step import step_generator
from ds_trainer.generator import build_wan
from ds_trainer.self_forcing import draw_exit_steps, self_forcing_rollout, warped_steps
from ds_trainer.trainable import apply_activation_checkpointing, apply_freeze, apply_lora
from ds_trainer.trainer import Trainer
from model.causal import CausalConfig
from model.flow_matching import FlowMatchingScheduler
from model.sequence_parallel import apply_sequence_parallel

log = logging.getLogger(__name__)
LORA_ONLY = (r"lora_",)
EVERYTHING = (r".",)


class DMDTrainer(Trainer):
    name = "dmd"
    checkpoint_prefix = "checkpoint_model_"
    weights_file = "model.pt"
    headline_metric = "critic_loss"
    supports_sequence_parallel = True
    cfg: DMDConfig

    # ------------------------------------------------------------------------------- build
    def build_models(self) -> None:
        cfg = self.cfg
        self.causal = cfg.causal.causal_config()
        self.generator = self._role("generator", cfg.generator, cfg.generator_ckpt, causal=self.causal,
                                    lora=cfg.adapter is not None)
        self.critic = self._role("critic", cfg.fake_score, cfg.fake_score_ckpt or cfg.real_score_ckpt,
                                 lora=cfg.adapter is not None and cfg.apply_lora_to_critic)
        stage3 = self.stage == 3
        teacher_ds = eval_ds_config(self.ds_config)
        teacher = build_wan(cfg.real_score.architecture(), teacher_ds, cfg.real_score_ckpt, self.device)
        teacher.requires_grad_(False)
        if self.sp is not None:
            apply_sequence_parallel(teacher, self.sp)
        self.real_score_module = teacher.eval()
        self.real_score = build_engine(teacher, teacher_ds) if stage3 else teacher
        self.ema: Optional[ShardedEMA] = None
        self.scheduler = FlowMatchingScheduler(shift=cfg.timestep_shift)
        self.steps = warped_steps(cfg.denoising_step_list, self.scheduler, cfg.warp_denoising_step)
        self.dmd_steps = DMDTimesteps(cfg.min_step, cfg.max_step, cfg.timestep_shift)
        log.info("generator steps %s (warped: %s)", cfg.denoising_step_list, [round(t, 1) for t in self.steps])

    def _role(self, role: str, section, checkpoint: Optional[str], causal: Optional[CausalConfig] = None,
              lora: bool = False):
        model = build_wan(section.architecture().replace(attn_backend=section.attn_backend), self.ds_config,
                          checkpoint, self.device, causal=causal)
        if lora:
            model = apply_lora(model, self.cfg.adapter)
        apply_activation_checkpointing(model, section)
        if self.sp is not None:  # the rollout, scores and critic loss shard each video's tokens
            apply_sequence_parallel(model, self.sp)
        names = apply_freeze(model, LORA_ONLY if lora else EVERYTHING)
        total, train = count_parameters(model)
        log.info("%s: %.2fM parameters, %.3fM trainable (%d tensors)", role, total / 1e6, train / 1e6, len(names))
        return model

    def build_engines(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "generator": build_engine(self.generator, self.ds_config, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      warmup_steps=cfg.warmup_steps, betas=(cfg.beta1, cfg.beta2)),
            "critic": build_engine(self.critic, self.ds_config, lr=cfg.lr_critic, weight_decay=cfg.weight_decay,
                                   warmup_steps=cfg.warmup_steps, betas=(cfg.beta1_critic, cfg.beta2_critic)),
        }

    def build_data(self):
        cfg = self.cfg
        if cfg.cache_dir:  # `wanspeed cache` outputs, the negative prompt's too: no encoder is loaded
            from data.i2v_cache import CachedI2VDataset  # noqa: PLC0415
            self.encoders = None
            dataset = CachedI2VDataset(cfg.cache_dir, cfg.num_training_frames, cfg.height, cfg.width)
            context, lens = dataset.negative(cfg.negative_prompt)
        else:
            from model.encoders.bundle import load_frozen_encoders  # noqa: PLC0415
            self.encoders = load_frozen_encoders(cfg.encoders, self.device)
            context, lens = self.encoders.t5.encode([cfg.negative_prompt])  # the real score's CFG, once
            dataset = self.dataset_of(cfg)
        self.negative = (context.float().to(self.device), lens.to(self.device))
        return dataset

    @staticmethod
    def dataset_of(cfg: DMDConfig):
        """The prompts + first frames of a DMD config."""
        d = cfg.data
        if d.images is not None:
            return I2VImageDataset(d.images, cfg.height, cfg.width, image_base=d.image_base)
        return OpenS2VFirstFrameDataset(d.opens2v_json, d.opens2v_video_base, cfg.height, cfg.width, seed=cfg.seed)

    def make_loader(self):
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.cfg.batch_size, sampler=self.sampler,
                                           num_workers=self.cfg.num_workers, drop_last=True,
                                           collate_fn=getattr(self.dataset, "collate_fn", collate_i2v_batch))

    def roles_stepped(self) -> list[str]:
        return (["generator"] if (self.step - 1) % self.cfg.dfake_gen_update_ratio == 0 else []) + ["critic"]

    def describe_batch(self, batch) -> str:
        return "rows " + ", ".join(str(int(i)) for i in batch["indices"])

    # -------------------------------------------------------------------------------- step
    def conditioning(self, batch, frames: Optional[int] = None):
        """(cond, uncond, first latent) of a batch, y covering `frames` (default num_training_frames)."""
        cond, first = _encode(self.encoders, batch, frames or self.cfg.num_training_frames)
        cond, first = cond.to(self.device), first.to(self.device)
        b = first.shape[0]
        context, lens = self.negative
        uncond = cond.replace(context=context.expand(b, -1, -1), context_lens=lens.expand(b))
        return cond, uncond, first

    def rollout(self, cond, first, rng: torch.Generator, grad: bool) -> torch.Tensor:
        b, (_, f, h, w) = first.shape[0], cond.y.shape[1:]
        noise = torch.randn((b, 16, f, h, w), generator=rng).to(self.device)
        exit_rng = step_generator(self.cfg.seed, self.step, int(grad), 0)  # one draw for every rank
        blocks = len(range(int(self.causal.independent_first_frame), f, self.causal.num_frame_per_block)) + 1
        exits = draw_exit_steps(blocks, len(self.steps), exit_rng, self.cfg.same_step_across_blocks,
                                self.cfg.last_step_only)
        self.last_exits = exits
        return self_forcing_rollout(self.engines["generator"], self.generator, noise, cond, first, self.causal,
                                    self.steps, exits, self.scheduler, self.cfg.context_noise, grad, rng)

    def train_step(self, batch, micro: int) -> Optional[dict[str, float]]:
        cfg, row, times = self.cfg, {}, {}
        rng = step_generator(cfg.seed, self.step, micro, self.dp_rank)  # one draw per SP group: noise, t, x_t
        if cfg.streaming_training:
            return self.streaming_step(batch, rng)
        cond, uncond, first = self.conditioning(batch)
        if self.step % cfg.dfake_gen_update_ratio == 0:
            t0 = time.perf_counter()
            with self.phase_peak("rollout", row):
                video = self.rollout(cond, first, rng, grad=True)
            times["rollout"] = time.perf_counter() - t0
            if not self.generator_update(video, cond, uncond, batch, rng, row, times):
                return None

        def critic_video():
            with torch.no_grad():
                return self.rollout(cond, first, rng, grad=False)
        if not self.critic_update(critic_video, cond, batch, rng, row, times):
            return None
        row.update({f"time_{k}_s": v for k, v in times.items()})
        return self.with_role_memory(row)

    def generator_update(self, video: torch.Tensor, cond, uncond, batch, rng: torch.Generator, row: dict,
                         times: dict, frame_mask: Optional[torch.Tensor] = None) -> bool:
        """The DMD loss of the generator's `video` (carrying its graph), backward and step; False
        when the loss was not finite on some rank (the step is skipped on every rank)."""
        cfg, gen, t0 = self.cfg, self.engines["generator"], time.perf_counter()
        with self.phase_peak("dmd", row):
            loss, grad_mean = distribution_matching_loss(video, self.real_score, self.engines["critic"], cond, uncond,
                                                         cfg.guidance_scale, self.dmd_steps, rng, frame_mask=frame_mask)
            if self._skip(loss, "generator", batch):
                return False
            gen.backward(loss)
        gen.step()
        self.update_ema()
        times["dmd"] = time.perf_counter() - t0
        row.update(generator_loss=loss.item(), dmd_grad=grad_mean)
        return True

    def critic_update(self, make_video, cond, batch, rng: torch.Generator, row: dict, times: dict) -> bool:
        """The critic's flow loss on make_video() (no gradient to the generator), backward and step."""
        critic, t0 = self.engines["critic"], time.perf_counter()
        with self.phase_peak("critic", row):
            loss = critic_loss(make_video().detach(), critic, cond, self.dmd_steps, rng)
            if self._skip(loss, "critic", batch):
                return False
            critic.backward(loss)
        critic.step()
        times["critic"] = time.perf_counter() - t0
        row["critic_loss"] = loss.item()
        return True

    def with_role_memory(self, row: dict) -> dict:
        """`row`, plus each role's model state on the first step this process logs."""
        if not getattr(self, "_memory_logged", False):
            row.update(self.role_memory())
            self._memory_logged = True
        return row

    def role_memory(self) -> dict[str, float]:
        """memory_<role>_<params|optimizer|cpu|cuda>_mb of generator, critic and teacher on this rank."""
        from ds_trainer.engine_memory import role_memory  # noqa: PLC0415
        roles = {"generator": (self.generator, self.engines["generator"].optimizer),
                 "critic": (self.critic, self.engines["critic"].optimizer), "real_score": (self.real_score_module, None)}
        return {f"memory_{role}_{k}": v for role, (module, optim) in roles.items()
                for k, v in role_memory(module, optim).items()}

    @contextlib.contextmanager
    def phase_peak(self, phase: str, row: dict):
        """On GPU, the peak allocation during the block as peak_<phase>_mb (the largest if repeated)."""
        from ds_trainer.engine_memory import phase_peak_mb, phase_peak_reset  # noqa: PLC0415
        phase_peak_reset(self.device)
        yield
        peak = phase_peak_mb(self.device)
        if peak is not None:
            row[f"peak_{phase}_mb"] = max(peak, row.get(f"peak_{phase}_mb", 0.0))

    def streaming_step(self, batch, rng: torch.Generator) -> Optional[dict[str, float]]:
        """LongLive's streaming long tuning (ds_trainer/streaming_rollout.py): the stream advances
        once a step (with gradients on generator steps); the generator's DMD loss covers the new
        frames of the window, the critic learns on the whole window."""
        from ds_trainer.streaming_rollout import StreamingRollout, reencode_window  # noqa: PLC0415
        cfg, row, times = self.cfg, {}, {}
        if getattr(self, "streaming", None) is None:
            self.streaming = StreamingRollout(cfg.streaming_settings, self.causal, self.steps, self.scheduler,
                                              cfg.context_noise, cfg.same_step_across_blocks, cfg.last_step_only)
        gen = self.engines["generator"]
        gen_step = self.step % cfg.dfake_gen_update_ratio == 0
        draws = step_generator(cfg.seed, self.step, 1, 0)  # new-frame count and exit steps: one draw for every rank
        t0 = time.perf_counter()
        with self.phase_peak("rollout", row), torch.set_grad_enabled(gen_step):
            window = self.streaming.advance(gen, self.generator,
                                            lambda: self.conditioning(batch, cfg.streaming_max_length),
                                            lambda v, c, u: reencode_window(self.encoders, v, c, u), rng, draws,
                                            grad=gen_step)
        times["rollout"] = time.perf_counter() - t0
        row.update(stream_frames=float(window.stream_frames), stream_new_frames=float(window.new_mask.sum()))
        if gen_step and not self.generator_update(window.video, window.cond, window.uncond, batch, rng, row, times,
                                                  frame_mask=window.new_mask):
            return None
        if not self.critic_update(lambda: window.video, window.cond, batch, rng, row, times):
            return None
        row.update({f"time_{k}_s": v for k, v in times.items()})
        return self.with_role_memory(row)

    def update_ema(self) -> None:
        if not self.cfg.use_ema or self.step < self.cfg.ema_start_step:
            return
        if self.ema is None:
            self.ema = ShardedEMA(self.generator)  # Self-Forcing: a copy at the first update from ema_start_step
        else:
            self.ema.update(self.cfg.ema_weight)

    # -------------------------------------------------------------------------- validation
    def before_training(self) -> None:
        if self.cfg.validation is not None and self.step == 0:  # the starting generator's videos
            self.validate()

    def after_step(self) -> None:
        val = self.cfg.validation
        if val is not None and (self.step % val.every == 0 or self.step == self.cfg.max_iters):
            self.validate()

    def validate(self) -> None:
        """Streaming I2V videos of the generator (ds_trainer/dmd_validation.py), on every rank."""
        if getattr(self, "validator", None) is None:
            from ds_trainer.dmd_validation import CausalI2VValidator  # noqa: PLC0415
            from model.encoders.bundle import load_frozen_encoders  # noqa: PLC0415
            encoders = getattr(self, "encoders", None) or load_frozen_encoders(self.cfg.encoders, self.device)
            self.validator = CausalI2VValidator(self.cfg, encoders, self.logdir, self.rank, self.world, self.device)
        self.validator.run(self.generator, self.step, self.metrics.wandb)

    def _skip(self, loss: torch.Tensor, role: str, batch) -> bool:
        finite = bool(torch.isfinite(loss).item())
        if not finite:
            log.warning("rank %d: non-finite %s loss at step %d on %s", self.rank, role, self.step,
                        self.describe_batch(batch))
        return any_rank(not finite)

    # ------------------------------------------------------------------------ checkpoints
    @classmethod
    def compatibility_fields(cls, cfg: DMDConfig) -> dict[str, Any]:
        arch = {role: architecture_key(getattr(cfg, role).architecture())
                for role in ("generator", "real_score", "fake_score")}
        return {**arch,
                "causal": dataclasses.asdict(cfg.causal), "adapter": dataclasses.asdict(cfg.adapter) if cfg.adapter else None,
                "num_training_frames": cfg.num_training_frames, "height": cfg.height, "width": cfg.width,
                "denoising_step_list": list(cfg.denoising_step_list), "warp_denoising_step": cfg.warp_denoising_step}

    def write_exports(self, tmp: Path) -> None:
        """`model.pt` as Self-Forcing writes it: {"generator": {"model.<key>": ...}, "critic": ...,
        "generator_ema": ...} (trainable weights: all of them, or with LoRA `generator_lora` /
        `critic_lora`), so its and LongLive's inference load it; `ema_rank<r>.pt`: each rank's EMA
        shards, for an exact resume."""
        lora = self.cfg.adapter is not None
        out = {}
        for role, model in (("generator", self.generator), ("critic", self.critic)):
            weights = ckpt.export_trainable(model, self.stage)
            if weights is not None:
                key = f"{role}_lora" if lora and (role == "generator" or self.cfg.apply_lora_to_critic) else role
                out[key] = {f"model.{k}": v for k, v in weights.items()}
        if self.ema is not None:
            torch.save(self.ema.state_dict(), tmp / f"ema_rank{process_rank()}.pt")
            ema = self.ema.full_tensors()
            if ema is not None:
                out["generator_ema"] = {f"model.{k}": v for k, v in ema.items()}
        if process_rank() == 0:
            torch.save(out, tmp / "model.pt")

    def restore(self, checkpoint: Path) -> None:
        path = checkpoint / f"ema_rank{process_rank()}.pt"
        if self.cfg.use_ema and path.exists():
            self.ema = ShardedEMA(self.generator)
            self.ema.load_state_dict(torch.load(path, weights_only=True))


def _encode(encoders, batch, frames: int):
    if "conditioning" in batch:  # read back from the I2V encoder cache (data/i2v_cache.py)
        if batch["conditioning"].y.shape[2] != frames:
            raise ValueError(f"the encoder cache holds {batch['conditioning'].y.shape[2]} latent frames per sample, "
                             f"this rollout needs {frames}: train with the encoders")
        return batch["conditioning"], batch["first_latent"]
    from data.encode import encode_i2v  # noqa: PLC0415
    return encode_i2v(encoders, batch["image"], batch["prompts"], frames)
