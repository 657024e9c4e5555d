"""`AdapterTrainer`: frozen-backbone subject-adapter training on DeepSpeed (the OpenS2V seed).

The generator is built partitioned (ZeRO-3) with the base weights loaded, LoRA added when
configured, then frozen except the reference paths' new layers; one engine trains it with the
flow-matching loss. Raw OpenS2V batches go through the frozen encoders; with `cache_dir` the
encoder outputs are read from `wanspeed cache` shards and no encoder is loaded. With
`model.causal` the generator is the block-causal CausalWanModel (LongLive's), trained with one
timestep per block under the block-causal mask (teacher forcing optional), as Self-Forcing's
causal diffusion trainer.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from data.cache import CachedOpenS2VDataset
from data.opens2v import create_opens2v_dataloader
from ds_trainer import checkpointing as ckpt
from ds_trainer.config import TrainConfig, architecture_key
from ds_trainer.datasets import opens2v_dataset
from ds_trainer.distributed import process_rank
from ds_trainer.engine import build_engine, count_parameters
from ds_trainer.flow_step import flow_matching_loss, inputs_from_batch, step_generator
from ds_trainer.generator import build_wan
from ds_trainer.trainable import apply_activation_checkpointing, apply_freeze, apply_lora, reference_trainable_patterns
from ds_trainer.trainer import Trainer
from model.flow_matching import FlowMatchingScheduler
from model.sequence_parallel import apply_sequence_parallel

log = logging.getLogger(__name__)


class AdapterTrainer(Trainer):
    name = "opens2v-adapters"
    checkpoint_prefix = "checkpoint_opens2v_"
    weights_file = "model.pt"
    supports_sequence_parallel = True
    cfg: TrainConfig

    def build_models(self) -> None:
        cfg = self.cfg
        causal = cfg.model.causal
        self.causal = causal.causal_config() if causal is not None else None
        self.teacher_forcing = causal is not None and causal.teacher_forcing
        model = build_wan(cfg.wan_config(), self.ds_config, cfg.generator_ckpt, self.device, causal=self.causal)
        if cfg.adapter:
            model = apply_lora(model, cfg.adapter)
        apply_activation_checkpointing(model, cfg.model)
        if self.sp is not None:
            apply_sequence_parallel(model, self.sp)
        self.trainable_names = apply_freeze(model, reference_trainable_patterns(model.config))
        total, train = count_parameters(model)
        log.info("generator: %s%.2fM parameters, %.3fM trainable (%d tensors), ZeRO stage %d, world %d",
                 f"block-causal {self.causal}{' teacher-forced' if self.teacher_forcing else ''}, "
                 if self.causal else "", total / 1e6, train / 1e6, len(self.trainable_names), self.stage, self.world)
        self.model = model
        self.scheduler = FlowMatchingScheduler(shift=cfg.timestep_shift)

    def build_engines(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"generator": build_engine(self.model, self.ds_config, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                          warmup_steps=cfg.warmup_steps)}

    def build_data(self):
        cfg = self.cfg
        # validation samples videos: it needs the encoders even when training from the cache
        self.encoders = self._load_encoders() if cfg.cache_dir is None or cfg.validation else None
        self.validator = self._build_validator() if cfg.validation else None
        if cfg.cache_dir:
            return CachedOpenS2VDataset(cfg.cache_dir)
        return opens2v_dataset(cfg)

    def _build_validator(self):
        from data.options import DatasetOptions  # noqa: PLC0415
        from ds_trainer.validation import Validator  # noqa: PLC0415
        cfg, stride = self.cfg, self.encoders.vae.spatial_stride
        size = DatasetOptions(section=cfg.opens2v, height=cfg.height, width=cfg.width).reference_size
        return Validator(cfg.validation, self.encoders, self.logdir, self.rank, self.world, size,
                         (cfg.num_training_frames, cfg.height // stride, cfg.width // stride), cfg.timestep_shift,
                         cfg.sample.fps, cfg.validation.ref_gain_cache_dir or cfg.cache_dir,
                         self.model.config.reference_paths, self.device, cfg.sequence_parallel_size)

    def before_training(self) -> None:
        if self.validator is not None and self.step == 0:  # the untrained baseline (ref_gain 1)
            self.validator.run(self.engine, self.step, self.metrics.wandb)

    def after_step(self) -> None:
        if self.validator is not None and (self.step % self.cfg.validation.every == 0
                                           or self.step == self.cfg.max_iters):
            self.validator.run(self.engine, self.step, self.metrics.wandb)

    def _load_encoders(self):
        from model.encoders.bundle import load_frozen_encoders  # noqa: PLC0415
        return load_frozen_encoders(self.cfg.encoders, self.device)

    def make_loader(self):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.sampler.epoch)
        return create_opens2v_dataloader(self.dataset, self.cfg.batch_size, self.sampler, self.cfg.num_workers)

    def batch_inputs(self, batch):
        return inputs_from_batch(batch, self.encoders, self.device, self.model.config.reference_paths.clip)

    def describe_batch(self, batch) -> str:
        return "samples " + ", ".join(map(str, batch.keys))

    def compute_loss(self, batch, micro: int) -> torch.Tensor:
        gen = step_generator(self.cfg.seed, self.step, micro, self.dp_rank)  # one draw per SP group
        return flow_matching_loss(self.engine, self.batch_inputs(batch), self.scheduler, gen, causal=self.causal,
                                  teacher_forcing=self.teacher_forcing)

    # ------------------------------------------------------------------------ checkpoints
    @classmethod
    def compatibility_fields(cls, cfg: TrainConfig) -> dict[str, Any]:
        import dataclasses  # noqa: PLC0415
        return {"model": architecture_key(cfg.wan_config()),
                "adapter": dataclasses.asdict(cfg.adapter) if cfg.adapter else None,
                "train_fused_path": cfg.train_fused_path, "train_clip_path": cfg.train_clip_path,
                "num_training_frames": cfg.num_training_frames, "height": cfg.height, "width": cfg.width,
                # only when set, so checkpoints of bidirectional runs keep their key
                **({"causal": dataclasses.asdict(cfg.model.causal)} if cfg.model.causal else {})}

    def write_exports(self, tmp: Path) -> None:
        """`model.pt` = {"generator": trainable weights only} (the seed's format:
        `load_state_dict(strict=False)` into a freshly built model), `adapter.safetensors` (the same
        tensors without LoRA), `lora/` (a peft adapter directory) when LoRA is on. Under ZeRO-3 only
        the trainable parameters are gathered (never the frozen backbone)."""
        weights = ckpt.export_trainable(self.model, self.stage)
        if process_rank() != 0:
            return
        torch.save({"generator": weights}, tmp / "model.pt")
        save_file({k: v for k, v in weights.items() if "lora_" not in k}, str(tmp / "adapter.safetensors"))
        if self.cfg.adapter is not None:
            (tmp / "lora").mkdir()
            save_file(_lora_state(self.model, weights), str(tmp / "lora" / "adapter_model.safetensors"))
            self.model.peft_config["default"].save_pretrained(str(tmp / "lora"))

    def finish(self) -> None:
        if self.cfg.export_full:
            ckpt.export_full(self.model, self.stage, self.logdir / "final_model.safetensors")


def _lora_state(model, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The peft adapter state dict (keys as `get_peft_model_state_dict` names them)."""
    from peft import get_peft_model_state_dict  # noqa: PLC0415
    state = get_peft_model_state_dict(model, state_dict={k: v for k, v in weights.items() if "lora_" in k})
    return {f"base_model.model.{k}": v for k, v in state.items()}  # PeftModel.save_pretrained's key layout
