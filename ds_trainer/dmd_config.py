"""The config of the I2V Self-Forcing / LongLive DMD job (`job: dmd`).

Fields and defaults are those of Self-Forcing's `self_forcing_dmd.yaml` (merged over its
`default_config.yaml`) with the I2V seed's choices (num_frame_per_block 4 with
independent_first_frame, so 21 latent frames split into 1 + 5 x 4). Checked at load like every
run config (ds_trainer/config.py); the frame / block combination is checked with a message that
says which block sizes work (the seed's §2.3 crash).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ds_trainer.config import AdapterSection, CausalSection, ModelSection, RunConfig
from ds_trainer.dmd_validation import I2VValidationSection
from model.config import ConfigError
from model.encoders.bundle import EncoderPaths


@dataclass
class I2VDataSection:
    """Where the prompts and first frames come from: a JSONL / CSV of prompt + image, or the first
    sampled frame + caption of OpenS2V clips."""

    images: Optional[str] = None
    """JSONL or CSV with `prompt` and `image` (a path relative to the file, or to image_base)."""
    image_base: Optional[str] = None
    """Directory the `image` paths are relative to; default: the file's directory."""
    opens2v_json: Optional[str] = None
    """An OpenS2V step-5 annotation JSON instead of `images` (first frame of each clip)."""
    opens2v_video_base: Optional[str] = None
    """The video directory of `opens2v_json`."""

    def __post_init__(self):
        if (self.images is None) == (self.opens2v_json is None):
            raise ConfigError("set exactly one of data.images (JSONL/CSV) and data.opens2v_json", key="images")
        if self.opens2v_json is not None and self.opens2v_video_base is None:
            raise ConfigError("is needed with data.opens2v_json", key="opens2v_video_base")


@dataclass
class DMDCausalSection(CausalSection):
    """The DMD generator's block-causal attention, with the I2V seed's defaults."""

    num_frame_per_block: int = 4
    """Latent frames per autoregressive block (4 for 21 frames with independent_first_frame)."""
    independent_first_frame: bool = True
    """Frame 0 (the conditioning image) is a block of its own."""


@dataclass(frozen=True)
class StreamingSettings:
    """LongLive's streaming long tuning, as ds_trainer/streaming_rollout.py runs it."""

    chunk: int
    """Frames of the loss window (and of a stream's first chunk)."""
    max_length: int
    """Frames after which a stream ends."""
    min_new: int
    """Fewest new frames per step."""

    def new_frame_choices(self, block: int) -> list[int]:
        """How many frames a step may add: multiples of the block size in [min_new, chunk]."""
        return [n for n in range(block, self.chunk + 1, block) if n >= self.min_new]


@dataclass
class DMDConfig(RunConfig):
    """An I2V DMD distillation run: causal generator, critic (fake score), frozen teacher (real score)."""

    job: str = "dmd"
    """This job."""
    data: I2VDataSection = field(default_factory=lambda: I2VDataSection(images="prompts.jsonl"))
    """Prompts and first frames."""
    encoders: Optional[EncoderPaths] = None
    """Frozen T5 / CLIP / VAE (CLIP is required: clip_fea conditions every I2V call); not loaded for
    training when `cache_dir` is set (validation still loads them)."""
    cache_dir: Optional[str] = None
    """Train from `wanspeed cache --config <this config>` outputs (data/i2v_cache.py: T5 tokens, CLIP
    tokens and the [image, black frames] VAE latent of every sample, the negative prompt's T5 tokens)
    instead of running the encoders; None = encode every batch."""
    generator: ModelSection = field(default_factory=lambda: ModelSection(preset="i2v-14B"))
    """The student's architecture (an i2v model; built as CausalWanModel)."""
    real_score: ModelSection = field(default_factory=lambda: ModelSection(preset="i2v-14B"))
    """The frozen teacher's architecture (Self-Forcing's real_name; may be larger than the student)."""
    fake_score: ModelSection = field(default_factory=lambda: ModelSection(preset="i2v-14B"))
    """The critic's architecture (Self-Forcing's fake_name)."""
    generator_ckpt: Optional[str] = None
    """Starting generator weights (an ODE-init / LongLive base / Wan checkpoint); None = random (tests)."""
    real_score_ckpt: Optional[str] = None
    """Teacher weights; None = random (tests)."""
    fake_score_ckpt: Optional[str] = None
    """Critic starting weights; default: the teacher's (Self-Forcing starts the critic from fake_name's base)."""
    causal: DMDCausalSection = field(default_factory=DMDCausalSection)
    """The generator's block-causal attention."""
    adapter: Optional[AdapterSection] = None
    """LoRA on the generator (and the critic with apply_to_critic); None = full fine-tuning, as Self-Forcing."""
    apply_lora_to_critic: bool = True
    """With `adapter`, LoRA on the critic too (LongLive's apply_to_critic)."""
    num_training_frames: int = 21
    """Latent frames of a training rollout (21 -> 81 pixel frames)."""
    height: int = 480
    """Frame height in pixels."""
    width: int = 832
    """Frame width in pixels."""
    denoising_step_list: list[float] = field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])
    """The generator's few-step timesteps per block (before warping)."""
    warp_denoising_step: bool = True
    """Map the step list onto the shifted training grid ([1000,750,500,250] -> [1000,937.5,833.3,625])."""
    timestep_shift: float = 5.0
    """Flow-matching shift of the training grid."""
    guidance_scale: float = 3.0
    """CFG scale of the real score (the fake score runs without guidance)."""
    negative_prompt: str = ""
    """The unconditional prompt of the real score's CFG (its T5 embedding is computed once)."""
    min_step: int = 20
    """Lowest DMD timestep (of 1000)."""
    max_step: int = 980
    """Highest DMD timestep (of 1000)."""
    same_step_across_blocks: bool = True
    """Every block exits at the same denoising step (Self-Forcing's default)."""
    last_step_only: bool = False
    """Always exit at the last denoising step."""
    context_noise: float = 0.0
    """Timestep at which a finished block's clean latents are written to the KV cache."""
    lr: float = 2e-6
    """Generator learning rate."""
    lr_critic: float = 4e-7
    """Critic learning rate."""
    beta1: float = 0.0
    """Generator AdamW beta1."""
    beta2: float = 0.999
    """Generator AdamW beta2."""
    beta1_critic: float = 0.0
    """Critic AdamW beta1."""
    beta2_critic: float = 0.999
    """Critic AdamW beta2."""
    weight_decay: float = 0.01
    """AdamW weight decay of both roles."""
    warmup_steps: int = 0
    """Linear lr warm-up of both roles, in optimizer steps."""
    dfake_gen_update_ratio: int = 5
    """The generator is updated every this many steps; the critic every step."""
    ema_weight: float = 0.99
    """Generator EMA decay (`generator_ema` in the checkpoint); 0 = none. Off with LoRA, as LongLive."""
    ema_start_step: int = 200
    """The EMA starts as a copy of the generator at the first generator update from this step on."""
    max_grad_norm: float = 10.0
    """Gradient clipping of both roles (Self-Forcing: 10)."""
    validation: Optional[I2VValidationSection] = None
    """Streaming I2V videos of fixed prompts and first frames every `validation.every` steps
    (ds_trainer/dmd_validation.py); None = none."""
    streaming_training: bool = False
    """LongLive's streaming long tuning (ds_trainer/streaming_rollout.py): each step adds frames to a
    long video through the KV cache and trains on the last `streaming_chunk_size` frames."""
    streaming_chunk_size: Optional[int] = None
    """Frames of the loss window and of a stream's first chunk; None = num_training_frames (LongLive: 21)."""
    streaming_max_length: int = 240
    """Frames after which a stream ends and the next step starts a new one (LongLive: 240)."""
    streaming_min_new_frame: int = 18
    """Fewest new frames per step; the count is a multiple of num_frame_per_block up to the chunk (LongLive: 18)."""

    def __post_init__(self):
        super().__post_init__()
        heads = {name: getattr(self, name).architecture().num_heads
                 for name in ("generator", "real_score", "fake_score")}
        role = min(heads, key=heads.get)
        if self.sequence_parallel_size > heads[role]:
            raise ConfigError(f"{self.sequence_parallel_size} is more than the {role}'s {heads[role]} attention heads "
                              f"(each sequence-parallel rank attends over at least one head)",
                              key="sequence_parallel_size")
        for name in ("generator", "real_score", "fake_score"):
            section = getattr(self, name)
            if section.architecture().model_type != "i2v":
                raise ConfigError(f"must be an i2v model (clip_fea and y condition every call), got preset "
                                  f"{section.preset!r}", key=f"{name}.preset")
        try:
            self.causal.check_frames(self.num_training_frames)
        except ConfigError as exc:
            raise ConfigError(exc.message, key=f"causal.{exc.key}") from exc
        if self.height % 16 or self.width % 16 or self.height < 16 or self.width < 16:
            raise ConfigError(f"height and width must be positive multiples of 16, got {self.height}x{self.width}",
                              key="height")
        if not self.denoising_step_list or any(not 0 < t <= 1000 for t in self.denoising_step_list) \
                or list(self.denoising_step_list) != sorted(self.denoising_step_list, reverse=True):
            raise ConfigError(f"must be decreasing timesteps in (0, 1000], got {self.denoising_step_list}",
                              key="denoising_step_list")
        if not 0 <= self.min_step < self.max_step <= 1000:
            raise ConfigError(f"need 0 <= min_step < max_step <= 1000, got {self.min_step}, {self.max_step}",
                              key="min_step")
        for name in ("lr", "lr_critic", "timestep_shift"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ConfigError(f"must be a finite number > 0, got {getattr(self, name)}", key=name)
        for name in ("beta1", "beta2", "beta1_critic", "beta2_critic", "ema_weight"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"must be in [0, 1), got {getattr(self, name)}", key=name)
        if not 0 <= self.guidance_scale < float("inf"):
            raise ConfigError(f"must be a finite number >= 0, got {self.guidance_scale}", key="guidance_scale")
        if not 0 <= self.context_noise < 1000:
            raise ConfigError(f"must be in [0, 1000), got {self.context_noise}", key="context_noise")
        for name in ("dfake_gen_update_ratio",):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", key=name)
        if self.gradient_accumulation_steps != 1:
            raise ConfigError("must be 1 for the DMD job (each step is one generator and one critic update); "
                              "raise batch_size or the number of ranks instead", key="gradient_accumulation_steps")
        for name in ("warmup_steps", "ema_start_step"):
            if getattr(self, name) < 0:
                raise ConfigError(f"must be >= 0, got {getattr(self, name)}", key=name)
        if not 0 <= self.weight_decay < float("inf"):
            raise ConfigError(f"must be a finite number >= 0, got {self.weight_decay}", key="weight_decay")
        if self.encoders is None and self.cache_dir is None:
            raise ConfigError("T5 / CLIP / VAE paths are required (or train from a filled cache_dir)", key="encoders")
        if self.encoders is not None and self.encoders.clip is None:
            raise ConfigError("is required: clip_fea (CLIP tokens of the first frame) conditions every I2V call",
                              key="encoders.clip")

        if self.streaming_training:
            self._check_streaming()
        if self.validation is not None and self.encoders is None:
            raise ConfigError("validation samples videos: set `encoders` (T5/CLIP/VAE paths)", key="validation")
        if self.validation is not None and self.validation.num_frames is not None:
            try:
                self.causal.check_frames(self.validation.num_frames)
            except ConfigError as exc:
                raise ConfigError(exc.message, key="validation.num_frames") from exc

    @property
    def streaming_settings(self) -> StreamingSettings:
        return StreamingSettings(self.streaming_chunk_size or self.num_training_frames, self.streaming_max_length,
                                 self.streaming_min_new_frame)

    def _check_streaming(self) -> None:
        chunk = self.streaming_settings.chunk
        try:
            self.causal.check_frames(chunk)
        except ConfigError as exc:
            raise ConfigError(exc.message, key="streaming_chunk_size") from exc
        if self.streaming_max_length < chunk:
            raise ConfigError(f"must be at least the chunk of {chunk} frames, got {self.streaming_max_length}",
                              key="streaming_max_length")
        block = self.causal.num_frame_per_block
        if not self.streaming_settings.new_frame_choices(block):
            raise ConfigError(f"no multiple of num_frame_per_block {block} lies in [{self.streaming_min_new_frame}, "
                              f"{chunk}] (the chunk): lower it to at most {chunk // block * block}",
                              key="streaming_min_new_frame")
        if getattr(self, "cache_dir", None):
            raise ConfigError("streaming re-encodes each window's first frame with the VAE and CLIP: train with the "
                              "encoders (unset cache_dir)", key="streaming_training")

    @property
    def use_ema(self) -> bool:
        return self.ema_weight > 0 and self.adapter is None
