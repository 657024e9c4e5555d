"""Run configs of `wanspeed train`, typed and validated at load, and the table of jobs.

`RunConfig` holds what every job's loop needs (batch, accumulation, checkpoint cadence, ZeRO
config, logging); each job's config extends it (`TrainConfig`: the subject adapters, with the
OpenS2V seed's fields and defaults). The YAML's `job:` key picks the job (`JOBS`). Loaded from
YAML by `load_train_config`: unknown keys and bad values are errors naming the file and the
dotted key, raised before anything is built. Command-line flags override the file only when they
are given (the seed's `disable_wandb` bug: an argparse default silently re-enabled wandb).
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from data.options import OpenS2VSection
from ds_trainer.validation import ValidationSection
from model.config import PRESETS, ConfigError, ReferencePathsConfig, WanConfig
from model.encoders.bundle import EncoderPaths
from model.typed_config import from_mapping, load_yaml

SEED_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out"]
ZERO_CHOICES = ("2", "3", "3-offload", "auto")
MAX_SEQUENCE_PARALLEL = 64  # a rank needs at least one attention head; no Wan has more than 40
DEFAULT_JOB = "opens2v-adapters"
JOBS: dict[str, tuple[str, str]] = {
    DEFAULT_JOB: ("ds_trainer.config:TrainConfig", "ds_trainer.adapter_trainer:AdapterTrainer"),
    "dmd": ("ds_trainer.dmd_config:DMDConfig", "ds_trainer.dmd_trainer:DMDTrainer"),
}
"""job name -> (its config class, its Trainer subclass), as "module:attribute" (imported when used)."""


@dataclass
class AdapterSection:
    """Optional LoRA on the attention projections (peft)."""

    adapter_type: str = "lora"
    """Only 'lora'."""
    r: int = 64
    """LoRA rank."""
    lora_alpha: int = 64
    """LoRA scale numerator (the update is scaled by lora_alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input during training."""
    target_modules: list[str] = field(default_factory=lambda: list(SEED_LORA_TARGETS))
    """diffusers names (to_q, to_k, to_v, to_out) are mapped to Wan's q, k, v, o; `[all-linear]`:
    every Linear of the transformer blocks (LongLive's choice), the reference adapters' excepted."""

    def __post_init__(self):
        if self.adapter_type != "lora":
            raise ConfigError(f"must be 'lora', got {self.adapter_type!r}", key="adapter_type")
        if self.r < 1:
            raise ConfigError(f"must be >= 1, got {self.r}", key="r")
        if not 0.0 <= self.lora_dropout < 1.0:  # also NaN
            raise ConfigError(f"must be in [0, 1), got {self.lora_dropout}", key="lora_dropout")
        if not self.target_modules:
            raise ConfigError("is empty", key="target_modules")


@dataclass
class ModelSection:
    """The generator's architecture: a preset name, optionally overridden field by field."""

    preset: str = "t2v-1.3B"
    """One of model.config.PRESETS (tiny, tiny-i2v, t2v-1.3B, t2v-14B, i2v-14B)."""
    overrides: dict = field(default_factory=dict)
    """WanConfig fields to change (e.g. num_layers for a quick test); checked at load."""
    attn_backend: Optional[str] = None
    """sdpa / flash_attn / triton; None = $WANSPEED_ATTN_BACKEND or sdpa."""
    activation_checkpointing: bool = True
    """Recompute each block in the backward pass (non-reentrant; frozen weights are fine)."""

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ConfigError(f"must be one of {sorted(PRESETS)}, got {self.preset!r}", key="preset")
        try:
            self.architecture()
        except ConfigError as exc:
            raise ConfigError(str(exc), key="overrides") from exc

    def architecture(self) -> WanConfig:
        """The preset with the overrides applied (types and values checked like a config.json)."""
        return from_mapping(WanConfig, {**PRESETS[self.preset].to_dict(), **self.overrides}, "WanConfig")


@dataclass
class CausalSection:
    """A block-causal generator (model.causal.CausalConfig), for both jobs. Defaults are
    Self-Forcing / LongLive T2V's (3-frame blocks, no independent first frame: 21 frames = 7
    blocks); the DMD job's are the I2V seed's (4-frame blocks after an independent first frame)."""
    num_frame_per_block: int = 3
    """Latent frames per autoregressive block; all frames of a block share one training timestep."""
    independent_first_frame: bool = False
    """Frame 0 is a block of its own (with its own timestep), as in the I2V recipe."""
    local_attn_size: int = -1
    """Frames a query may see, sink included; -1 = everything before (LongLive: 12)."""
    sink_size: int = 0
    """First frames that stay visible whatever the window (LongLive: 3)."""

    def __post_init__(self):
        if self.num_frame_per_block < 1:
            raise ConfigError(f"must be >= 1, got {self.num_frame_per_block}", key="num_frame_per_block")
        if self.local_attn_size > 0 and not 0 <= self.sink_size < self.local_attn_size:
            raise ConfigError(f"must be in [0, local_attn_size={self.local_attn_size}), got {self.sink_size}",
                              key="sink_size")
        if self.sink_size < 0:
            raise ConfigError(f"must be >= 0, got {self.sink_size}", key="sink_size")
        if self.local_attn_size != -1 and self.local_attn_size < 1:
            raise ConfigError(f"must be -1 (no window) or >= 1, got {self.local_attn_size}", key="local_attn_size")

    def causal_config(self):
        """The model's CausalConfig."""
        from model.causal import CausalConfig  # noqa: PLC0415
        return CausalConfig(self.num_frame_per_block, self.independent_first_frame, self.local_attn_size,
                            self.sink_size)

    def check_frames(self, num_frames: int) -> None:
        """`num_frames` must split into blocks (model.causal.frame_blocks' rule); the error says
        which block sizes work."""
        from model.causal import frame_blocks  # noqa: PLC0415
        try:
            frame_blocks(num_frames, self.causal_config())
        except ValueError:
            first = int(self.independent_first_frame)
            rest = num_frames - first
            ok = [b for b in range(1, rest + 1) if rest % b == 0] if rest > 0 else []
            rule = (f"(num_training_frames - 1) = {rest} must be a multiple of num_frame_per_block with "
                    f"independent_first_frame" if first else
                    f"num_training_frames = {num_frames} must be a multiple of num_frame_per_block")
            raise ConfigError(f"{rule}; got num_frame_per_block = {self.num_frame_per_block}; block sizes that "
                              f"work with {num_frames} frames: {ok}", key="num_frame_per_block") from None


@dataclass
class AdapterCausalSection(CausalSection):
    """The adapter job's block-causal generator (LongLive's causal generator, the OpenS2V seed's
    base), trained as Self-Forcing's causal diffusion trainer does: one timestep per block, the
    block-causal mask, optionally teacher forcing."""

    teacher_forcing: bool = False
    """Feed the clean latents as the [clean | noisy] prefix (noisy block i attends to the clean
    blocks before it and to itself) instead of the noisy frames of earlier blocks."""


@dataclass
class AdapterModelSection(ModelSection):
    """The adapter job's generator: a ModelSection plus the optional block-causal variant."""

    causal: Optional[AdapterCausalSection] = None
    """Train on the block-causal CausalWanModel (per-block timesteps, block-causal mask); None =
    the bidirectional WanModel."""


@dataclass
class WandbSection:
    """wandb logging (rank 0 only)."""

    project: str = "wanspeed"
    """wandb project."""
    entity: Optional[str] = None
    """wandb team or user; None = the key's default."""
    run_name: Optional[str] = None
    """Run name; None = wandb's generated one."""
    mode: str = "auto"
    """'auto' (online with a key in WANDB_API_KEY, else offline), 'online' or 'offline'."""

    def __post_init__(self):
        if self.mode not in ("auto", "online", "offline"):
            raise ConfigError(f"must be 'auto', 'online' or 'offline', got {self.mode!r}", key="mode")


@dataclass
class SampleSection:
    """Defaults of `wanspeed sample` for a run of this config."""

    steps: int = 8
    """Euler flow-matching steps."""
    fps: int = 8
    """Frame rate of the written mp4."""
    ref_guidance: Optional[float] = None
    """Reference guidance of `wanspeed sample --logdir` and the demo's samples: the velocity with the
    subject references, scaled by this against the one without them (None: plain, no guidance)."""

    def __post_init__(self):
        for name in ("steps", "fps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", key=name)
        if self.ref_guidance is not None and not 0 < self.ref_guidance < float("inf"):
            raise ConfigError(f"must be a finite number > 0 (or absent), got {self.ref_guidance}", key="ref_guidance")


@dataclass
class RunConfig:
    """What every job's training loop reads (ds_trainer/trainer.py); each job's config extends it."""

    job: str = DEFAULT_JOB
    """Which training job this config is for (a key of ds_trainer.config.JOBS)."""
    seed: int = 0
    """Seeds new layers (identical on every rank), data order and the per-step noise."""
    batch_size: int = 1
    """Micro-batch per rank."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    max_grad_norm: float = 1.0
    """Gradient clipping (DeepSpeed `gradient_clipping`)."""
    max_iters: int = 10000
    """Optimizer steps to train."""
    log_iters: int = 500
    """Checkpoint interval in optimizer steps."""
    keep_last_checkpoints: int = 3
    """Published checkpoints kept in the log dir (older ones are deleted); 0 keeps all."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    max_consecutive_nonfinite: int = 5
    """Stop the run after this many non-finite losses in a row."""
    zero: str = "3"
    """DeepSpeed config: '2', '3' or '3-offload' (configs/ds/), unless deepspeed_config is given;
    'auto': the first of those that fits this run on its ranks (ds_trainer/memory_plan.py)."""
    deepspeed_config: Optional[str] = None
    """A DeepSpeed JSON file to use instead of configs/ds/ ("auto" values are filled from this config)."""
    disable_wandb: bool = False
    """No wandb logging at all (metrics.jsonl is still written)."""
    sequence_parallel_size: int = 1
    """Ranks that split one sample's video tokens (DeepSpeed-Ulysses, model/sequence_parallel.py);
    must divide the world size. Ranks form world/K data-parallel groups of K consecutive ranks;
    every rank of a group trains on the same samples. 1 = no sequence parallelism."""
    wandb: WandbSection = field(default_factory=WandbSection)
    """wandb settings."""

    def __post_init__(self):
        if self.job not in JOBS:
            raise ConfigError(f"must be one of {sorted(JOBS)}, got {self.job!r}", key="job")
        if self.zero not in ZERO_CHOICES:
            raise ConfigError(f"must be one of {list(ZERO_CHOICES)}, got {self.zero!r}", key="zero")
        for name in ("max_iters", "log_iters", "batch_size", "gradient_accumulation_steps",
                     "max_consecutive_nonfinite"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", key=name)
        for name in ("keep_last_checkpoints", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"must be >= 0, got {getattr(self, name)}", key=name)
        if not 1 <= self.sequence_parallel_size <= MAX_SEQUENCE_PARALLEL:
            raise ConfigError(f"must be between 1 and {MAX_SEQUENCE_PARALLEL}, got {self.sequence_parallel_size}",
                              key="sequence_parallel_size")
        if not self.max_grad_norm > 0:  # also NaN
            raise ConfigError(f"must be > 0, got {self.max_grad_norm}", key="max_grad_norm")
        if self.deepspeed_config is not None and not Path(self.deepspeed_config).is_file():
            raise ConfigError(f"no such file: {self.deepspeed_config}", key="deepspeed_config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig(RunConfig):
    """A subject-adapter run (`job: opens2v-adapters`); defaults are the OpenS2V seed's."""

    CONFIG_ALIASES: ClassVar[dict[str, str]] = {"pixel_height": "height", "pixel_width": "width"}
    """The seed's YAML names the frame size pixel_height / pixel_width."""

    opens2v: OpenS2VSection = field(default_factory=OpenS2VSection)
    """Data parts and how samples are drawn from them."""
    is_cross_frame: bool = False
    """Take each subject from another clip of the same source video (step-6 pairs)."""
    num_training_frames: int = 21
    """Latent frames (21 -> 81 pixel frames)."""
    height: int = 480
    """Frame height in pixels (the seed's `pixel_height`)."""
    width: int = 832
    """Frame width in pixels (the seed's `pixel_width`)."""
    generator_ckpt: Optional[str] = None
    """Base generator weights (any format model/checkpoint.py reads); None = random init (tests)."""
    model: AdapterModelSection = field(default_factory=AdapterModelSection)
    """The generator's architecture (optionally block-causal: model.causal)."""
    encoders: Optional[EncoderPaths] = None
    """Frozen T5 / CLIP / VAE; not loaded at all when `cache_dir` is set."""
    cache_dir: Optional[str] = None
    """Train from `wanspeed cache` outputs instead of running the encoders."""
    train_fused_path: bool = False
    """Also add and train the fused (CLIP + VAE) reference path."""
    train_clip_path: bool = True
    """Add the CLIP reference path (needs encoders.clip or cached CLIP tokens)."""
    adapter: Optional[AdapterSection] = None
    """LoRA on the attention projections; None = no LoRA."""
    lr: float = 1e-4
    """AdamW learning rate of the trainable layers."""
    warmup_steps: int = 100
    """Linear lr warm-up, then constant."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    timestep_shift: float = 5.0
    """Flow-matching shift of the training timestep distribution."""
    export_full: bool = False
    """At the end, also write every weight (frozen base + adapters) to final_model.safetensors
    (gathered module by module under ZeRO-3; rank 0 writes)."""
    sample: SampleSection = field(default_factory=SampleSection)
    """Defaults of `wanspeed sample`."""
    validation: Optional[ValidationSection] = None
    """Sampled videos and ref_gain every `validation.every` steps (ds_trainer/validation.py); None = none."""

    def __post_init__(self):
        super().__post_init__()
        if self.num_training_frames < 1:
            raise ConfigError(f"must be >= 1, got {self.num_training_frames}", key="num_training_frames")
        if self.height % 16 or self.width % 16 or self.height < 16 or self.width < 16:
            raise ConfigError(f"height and width must be positive multiples of 16 (VAE x8, patch x2), "
                              f"got {self.height}x{self.width}", key="height")
        if not 0 < self.lr < float("inf"):  # also NaN
            raise ConfigError(f"must be a finite number > 0, got {self.lr}", key="lr")
        if self.warmup_steps < 0:
            raise ConfigError(f"must be >= 0, got {self.warmup_steps}", key="warmup_steps")
        if not 0 <= self.weight_decay < float("inf"):
            raise ConfigError(f"must be a finite number >= 0, got {self.weight_decay}", key="weight_decay")
        if not 0 < self.timestep_shift < float("inf"):
            raise ConfigError(f"must be > 0, got {self.timestep_shift}", key="timestep_shift")
        if self.cache_dir is None and self.encoders is None:
            raise ConfigError("set `encoders` (T5/CLIP/VAE paths) or `cache_dir` (train from the encoder cache)",
                              key="encoders")
        if self.cache_dir is None and self.train_clip_path and self.encoders.clip is None:
            raise ConfigError("train_clip_path is on but no CLIP encoder is set (or train from a cache_dir "
                              "holding CLIP tokens, or set train_clip_path: false)", key="encoders.clip")
        if self.cache_dir is None and not self.opens2v.json_paths:
            raise ConfigError("is empty: nothing to train on", key="opens2v.json_paths")
        if self.validation is not None and self.encoders is None:
            raise ConfigError("validation samples videos: set `encoders` (T5/CLIP/VAE paths)", key="validation")
        if self.is_cross_frame and not (self.opens2v.cross_frames_cluster_path and self.opens2v.cross_frames_base_path):
            raise ConfigError("is_cross_frame needs opens2v.cross_frames_cluster_path and cross_frames_base_path",
                              key="is_cross_frame")
        heads = self.wan_config().num_heads  # also: the model section and the reference paths must agree
        if self.sequence_parallel_size > heads:
            raise ConfigError(f"{self.sequence_parallel_size} is more than the model's {heads} attention heads "
                              f"(each sequence-parallel rank attends over at least one head)",
                              key="sequence_parallel_size")
        if self.model.causal is not None:
            try:
                self.model.causal.check_frames(self.num_training_frames)
            except ConfigError as exc:
                raise ConfigError(exc.message, key=f"model.causal.{exc.key}") from exc

    def wan_config(self) -> WanConfig:
        """The generator architecture with this run's reference paths."""
        refs = ReferencePathsConfig(clip=self.train_clip_path, vae=True, fused=self.train_fused_path)
        try:
            return self.model.architecture().replace(reference_paths=refs, attn_backend=self.model.attn_backend)
        except ConfigError as exc:
            raise ConfigError(str(exc), key="model") from exc


def architecture_key(cfg: WanConfig) -> dict[str, Any]:
    """The architecture fields a checkpoint must share with a run that resumes it: all but the
    kernel choices, which change no number (a resume may switch them)."""
    key = cfg.to_dict()
    for same_numbers in ("attn_backend", "fused_qk_norm_rope"):
        key.pop(same_numbers)
    return key


def _import(spec: str):
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def trainer_class(cfg: RunConfig):
    """The Trainer subclass of `cfg.job` (imports it: deepspeed and the models)."""
    return _import(JOBS[cfg.job][1])


def load_train_config(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> RunConfig:
    """YAML -> the config of the job it names (`job:`, default opens2v-adapters); `overrides`
    (dotted keys -> values) are applied before validation."""
    data = load_yaml(path)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: --set {dotted}: {p} is not a section")
        node[leaf] = value
    job = data.get("job", DEFAULT_JOB)
    if job not in JOBS:
        raise ConfigError(f"{path}: job: must be one of {sorted(JOBS)}, got {job!r}")
    return from_mapping(_import(JOBS[job][0]), data, str(path))
