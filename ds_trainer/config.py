"""The run config of `wanspeed train`: the OpenS2V seed's fields and defaults, typed and validated.

Loaded from YAML (`load_train_config`); unknown keys and bad values are errors naming the file and
the dotted key. Command-line flags override the file only when they are given (the seed's
`disable_wandb` bug: an argparse default silently re-enabled wandb).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from model.config import PRESETS, ConfigError, ReferencePathsConfig, WanConfig
from model.encoders.bundle import EncoderPaths
from model.typed_config import from_mapping, load_yaml

SEED_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out"]
ZERO_CHOICES = ("2", "3", "3-offload")


@dataclass
class OpenS2VSection:
    """`opens2v:` data paths (one entry per dataset part, zipped) and sampling."""

    json_paths: list[str] = field(default_factory=list)
    video_base_paths: list[str] = field(default_factory=list)
    background_base_paths: list[str] = field(default_factory=list)
    sample_stride: int = 3
    """Pixel-frame stride inside `face_cut`."""
    max_subjects_per_sample: int = 1
    subject_selection: str = "first"
    """'first', 'random' or 'best_score'."""
    cross_frames_cluster_path: Optional[str] = None
    """step6 `cluster_videos.json` (only with `is_cross_frame`)."""
    cross_frames_base_path: Optional[str] = None
    """step6 `cross-frames-pairs/final_output` directory (only with `is_cross_frame`)."""

    def __post_init__(self):
        if self.background_base_paths and len(self.background_base_paths) != len(self.json_paths):
            raise ConfigError("opens2v.background_base_paths must have one entry per json_paths entry")
        if len(self.video_base_paths) != len(self.json_paths):
            raise ConfigError("opens2v.video_base_paths must have one entry per json_paths entry")


@dataclass
class AdapterSection:
    """Optional LoRA on the attention projections (peft)."""

    adapter_type: str = "lora"
    r: int = 64
    lora_alpha: int = 64
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(SEED_LORA_TARGETS))
    """diffusers names (to_q, to_k, to_v, to_out) are mapped to Wan's q, k, v, o."""

    def __post_init__(self):
        if self.adapter_type != "lora":
            raise ConfigError(f"adapter.adapter_type must be 'lora', got {self.adapter_type!r}")
        if self.r < 1:
            raise ConfigError("adapter.r must be >= 1")


@dataclass
class ModelSection:
    """The generator's architecture: a preset name, optionally overridden field by field."""

    preset: str = "t2v-1.3B"
    overrides: dict = field(default_factory=dict)
    """WanConfig fields to change (e.g. num_layers for a quick test)."""
    attn_backend: Optional[str] = None
    """sdpa / flash_attn / triton; None = $WANSPEED_ATTN_BACKEND or sdpa."""
    activation_checkpointing: bool = True
    """Recompute each block in the backward pass (non-reentrant; frozen weights are fine)."""

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ConfigError(f"model.preset must be one of {sorted(PRESETS)}, got {self.preset!r}")


@dataclass
class WandbSection:
    project: str = "wanspeed"
    entity: Optional[str] = None
    run_name: Optional[str] = None
    mode: str = "auto"
    """'auto' (online with a key in WANDB_API_KEY, else offline), 'online' or 'offline'."""


@dataclass
class SampleSection:
    """The short video written from the trained model at the end of a run."""

    enabled: bool = True
    steps: int = 8
    """Euler flow-matching steps."""
    fps: int = 8


@dataclass
class TrainConfig:
    """Everything a subject-adapter run needs; defaults are the OpenS2V seed's."""

    opens2v: OpenS2VSection = field(default_factory=OpenS2VSection)
    is_cross_frame: bool = False
    num_training_frames: int = 21
    """Latent frames (21 -> 81 pixel frames)."""
    height: int = 480
    width: int = 832
    generator_ckpt: Optional[str] = None
    """Base generator weights (any format model/checkpoint.py reads); None = random init (tests)."""
    model: ModelSection = field(default_factory=ModelSection)
    encoders: Optional[EncoderPaths] = None
    """Frozen T5 / CLIP / VAE; not loaded at all when `cache_dir` is set."""
    cache_dir: Optional[str] = None
    """Train from `wanspeed cache` outputs instead of running the encoders."""
    train_fused_path: bool = False
    """Also add and train the fused (CLIP + VAE) reference path."""
    train_clip_path: bool = True
    """Add the CLIP reference path (needs encoders.clip or cached CLIP tokens)."""
    adapter: Optional[AdapterSection] = None
    lr: float = 1e-4
    warmup_steps: int = 100
    """Linear lr warm-up, then constant."""
    weight_decay: float = 0.0
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    max_iters: int = 10000
    log_iters: int = 500
    """Checkpoint interval in optimizer steps."""
    keep_last_checkpoints: int = 3
    batch_size: int = 1
    """Micro-batch per rank."""
    timestep_shift: float = 5.0
    """Flow-matching shift of the training timestep distribution."""
    seed: int = 0
    num_workers: int = 2
    max_consecutive_nonfinite: int = 5
    """Stop the run after this many non-finite losses in a row."""
    zero: str = "3"
    """DeepSpeed config: '2', '3' or '3-offload' (configs/ds/), unless deepspeed_config is given."""
    deepspeed_config: Optional[str] = None
    export_full: bool = False
    """At the end, also write every weight (frozen base + adapters) to final_model.safetensors
    (gathered module by module under ZeRO-3; rank 0 writes)."""
    disable_wandb: bool = False
    wandb: WandbSection = field(default_factory=WandbSection)
    sample: SampleSection = field(default_factory=SampleSection)

    def __post_init__(self):
        if self.zero not in ZERO_CHOICES:
            raise ConfigError(f"zero must be one of {list(ZERO_CHOICES)}, got {self.zero!r}")
        for name in ("num_training_frames", "max_iters", "log_iters", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.height % 16 or self.width % 16:
            raise ConfigError(f"height and width must be multiples of 16 (VAE x8, patch x2), got {self.height}x{self.width}")
        if self.cache_dir is None and self.encoders is None:
            raise ConfigError("set `encoders` (T5/CLIP/VAE paths) or `cache_dir` (train from the encoder cache)")
        if self.cache_dir is None and not self.opens2v.json_paths:
            raise ConfigError("opens2v.json_paths is empty: nothing to train on")
        if self.is_cross_frame and not (self.opens2v.cross_frames_cluster_path and self.opens2v.cross_frames_base_path):
            raise ConfigError("is_cross_frame needs opens2v.cross_frames_cluster_path and cross_frames_base_path")

    def wan_config(self) -> WanConfig:
        """The generator architecture with this run's reference paths."""
        try:
            base = PRESETS[self.model.preset].replace(**self.model.overrides)
        except TypeError as exc:
            raise ConfigError(f"model.overrides: {exc}") from exc
        refs = ReferencePathsConfig(clip=self.train_clip_path, vae=True, fused=self.train_fused_path)
        return base.replace(reference_paths=refs, attn_backend=self.model.attn_backend)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def compatibility_key(self) -> dict[str, Any]:
        """What a checkpoint must share with this run to be resumed by it."""
        return {"job": "opens2v-adapters", "model": self.wan_config().to_dict(),
                "adapter": dataclasses.asdict(self.adapter) if self.adapter else None,
                "train_fused_path": self.train_fused_path, "train_clip_path": self.train_clip_path,
                "num_training_frames": self.num_training_frames, "height": self.height, "width": self.width}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.compatibility_key(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_train_config(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> TrainConfig:
    """YAML -> TrainConfig; `overrides` (dotted keys -> values) are applied before validation."""
    data = load_yaml(path)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return from_mapping(TrainConfig, data, str(path))
