"""Per-GPU memory of a training run under each ZeRO config, frozen-aware, from the real model code.

Behind `wanspeed plan-memory` and `wanspeed train --zero auto`. Three parts:

1. Parameters are counted on the real model built on the `meta` device (model/wan.py,
   model/causal.py) after the job's own LoRA / freezing (ds_trainer/trainable.py), role by role:
   the adapter job's generator; DMD's generator and critic (trainable) and teacher (frozen).
2. Activations and their temporaries come from running the job's real step on `meta`
   (ds_trainer/memory_trace.py): the flow-matching step for the adapter job; for DMD, the
   generator's Self-Forcing rollout with its graph, the real and fake scores' no-grad forwards
   beside that graph, its backward, the no-grad rollout and the critic's step, as
   ds_trainer/dmd_trainer.py runs them. Activation checkpointing is the model's own (the DMD
   rollout's KV-cache forwards do not recompute, so checkpointing does not shrink them).
3. Model states follow DeepSpeed's layouts (b = bytes per weight: 2 in bf16 on GPU, 4 in fp32 on
   CPU; T trainable and F frozen parameters of a role; N ranks ZeRO shards over):

   | per rank            | zero2              | zero3                  | zero3 + offload        |
   |---------------------|--------------------|------------------------|------------------------|
   | frozen weights      | b F                | b F / N                | 0 (host: b F / N)      |
   | trainable weights   | b T                | b T / N                | 0 (host: b T / N)      |
   | gradients           | b T / N            | b T / N                | 0 (host: b T / N)      |
   | optimizer states    | 12 T / N           | 12 T / N               | 0 (host: 12 T / N)     |
   | optimizer step      | 8 T / N            | 8 T / N                | 0 (host: 8 T / N)      |

   12 bytes = fp32 master copy + Adam's two moments; the step adds the fp32 gradient partition and
   one partition-sized temporary of torch's AdamW. Frozen parameters get no gradient, master
   copy or moment: DeepSpeed's `estimate_zero3_model_states_mem_needs_all_live` charges every
   parameter 18 bytes, about 8x too much for a frozen 14B with a small adapter. Under ZeRO-3,
   tensors below `stage3_param_persistence_threshold` stay whole on every rank. The DMD teacher
   is a DeepSpeed engine only under ZeRO-3; otherwise the trainer keeps it as a plain fp32
   module (b = 4, whole), and the generator's EMA (fp32, 4 T / N) counts with its optimizer.
   `none` is one process without DeepSpeed (the CPU check): weights b (T + F), gradients b T,
   Adam moments 2 b T, step temporaries 2 b x the largest trainable tensor (CPU AdamW runs tensor
   by tensor).

   Temporary buffers: zero2 keeps two reduce buckets (overlap_comm) and an all-gather bucket per
   trainable engine; zero3 one reduce bucket per trainable engine plus the gathered parameters of
   the role that runs, at most `stage3_max_live_parameters` plus a prefetch bucket (bound by the
   role's size; roles run one after another); attention workspace = dense block-causal masks
   (SDPA backend) plus flash backward's fp32 dq accumulator (4 B L dim bytes) in bf16.

   peak = weights + gradients + optimizer + max(activations + buffers, optimizer step)

   With sequence parallelism (`sp` K) a rank holds L / K tokens of the bidirectional passes
   (traced with ceil(F / K) latent frames). The KV-cache rollout runs sequence-parallel too (its
   block tokens and its cache's heads split K ways) but is sized here at SP = 1: an overestimate.
   A config fits when its peak is at most HEADROOM of the GPU (the rest: CUDA context, NCCL,
   allocator fragmentation). The recommendation is the first that fits in PREFERENCE: least
   communication and recompute first.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

from ds_trainer import memory_trace as mt
from model.config import ConfigError, WanConfig

GIB = 2 ** 30
ZERO_LAYOUTS = ("2", "3", "3-offload")
"""The configs/ds layouts (ds_trainer/ds_config.py: ZERO_FILES keys)."""
PLAIN = "none"
"""One process without DeepSpeed (what the CPU validation measures)."""
PREFERENCE = (("2", False), ("3", False), ("2", True), ("3", True), ("3-offload", False), ("3-offload", True))
"""(layout, activation checkpointing) from fastest to slowest: replicated frozen weights need no
all-gather; recompute costs a forward; offload moves every weight over PCIe each step."""
HEADROOM = 0.9
MODELS = {"wan-1.3b": "t2v-1.3B", "wan-14b": "t2v-14B", "i2v-14b": "i2v-14B"}
"""plan-memory's model names -> model.config.PRESETS."""
I2V_OVERRIDES = {"model_type": "i2v", "in_dim": 36}
DEEPSPEED_DEFAULTS = {"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7,
                      "stage3_max_live_parameters": 1e9, "stage3_param_persistence_threshold": 1e5}


# ------------------------------------------------------------------------------ the job
@dataclass(frozen=True)
class RoleSpec:
    """One model of a job. trainable: apply_freeze patterns (None: a frozen role); engine_always:
    a DeepSpeed engine under every ZeRO stage (DMD's teacher is one only under ZeRO-3)."""

    name: str
    arch: WanConfig
    trainable: Optional[tuple[str, ...]]
    lora: Any = None
    causal: Any = None
    checkpointing: bool = True
    engine_always: bool = True


@dataclass(frozen=True)
class JobSpec:
    """What a plan needs of a run: its roles, one micro-batch's shapes and the DMD settings."""

    job: str
    roles: tuple[RoleSpec, ...]
    shapes: mt.Shapes
    sp: int = 1
    teacher_forcing: bool = False
    ema: bool = False
    steps: tuple[float, ...] = ()
    context_noise: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float = 1.0

    def with_checkpointing(self, on: bool) -> "JobSpec":
        return dataclasses.replace(self, roles=tuple(dataclasses.replace(r, checkpointing=on)
                                                     if r.trainable is not None else r for r in self.roles))

    @property
    def tokens(self) -> int:
        s = self.shapes
        return s.frames * (s.height // 2) * (s.width // 2)


def job_from_config(cfg) -> JobSpec:
    """The JobSpec of a loaded run config (ds_trainer/config.py TrainConfig or DMDConfig), with the
    roles, freezing and LoRA the trainers build."""
    from ds_trainer.dmd_trainer import EVERYTHING, LORA_ONLY  # noqa: PLC0415
    from ds_trainer.trainable import reference_trainable_patterns  # noqa: PLC0415
    from model.config import VAE_STRIDE  # noqa: PLC0415
    sp = getattr(cfg, "sequence_parallel_size", 1)
    shapes = mt.Shapes(cfg.batch_size, cfg.num_training_frames, cfg.height // VAE_STRIDE[1], cfg.width // VAE_STRIDE[2],
                       getattr(getattr(cfg, "opens2v", None), "max_subjects_per_sample", 1))
    common = dict(shapes=shapes, sp=sp, grad_accum=cfg.gradient_accumulation_steps, max_grad_norm=cfg.max_grad_norm)
    if cfg.job == "dmd":
        from ds_trainer.self_forcing import warped_steps  # noqa: PLC0415
        from model.flow_matching import FlowMatchingScheduler  # noqa: PLC0415
        lora = cfg.adapter
        steps = warped_steps(cfg.denoising_step_list, FlowMatchingScheduler(shift=cfg.timestep_shift),
                             cfg.warp_denoising_step)
        roles = (RoleSpec("generator", cfg.generator.architecture(), LORA_ONLY if lora else EVERYTHING, lora,
                          cfg.causal.causal_config(), cfg.generator.activation_checkpointing),
                 RoleSpec("critic", cfg.fake_score.architecture(),
                          LORA_ONLY if lora and cfg.apply_lora_to_critic else EVERYTHING,
                          lora if cfg.apply_lora_to_critic else None, None, cfg.fake_score.activation_checkpointing),
                 RoleSpec("teacher", cfg.real_score.architecture(), None, engine_always=False))
        return JobSpec("dmd", roles, ema=cfg.use_ema, steps=tuple(steps), context_noise=cfg.context_noise, **common)
    arch = cfg.wan_config()
    causal = cfg.model.causal
    role = RoleSpec("generator", arch, reference_trainable_patterns(arch), cfg.adapter,
                    causal.causal_config() if causal else None, cfg.model.activation_checkpointing)
    return JobSpec(cfg.job, (role,), teacher_forcing=bool(causal and causal.teacher_forcing), **common)


def preset_config(model: str, job: str, frames: int, height: int, width: int, lora_rank: Optional[int] = None,
                  batch: int = 1, sp: int = 1):
    """A run config of `job` ('adapter' or 'dmd') on a named model (MODELS), as a user would write
    it (activation checkpointing on; the adapter job's CLIP path only on a T2V base). DMD needs an
    I2V model: wan-1.3b becomes an I2V variant of the 1.3B dims (no such weights are released)."""
    from ds_trainer.config import AdapterModelSection, AdapterSection, ModelSection, TrainConfig  # noqa: PLC0415
    if model not in MODELS:
        raise ConfigError(f"--model: must be one of {sorted(MODELS)} or a run config YAML, got {model!r}")
    preset = MODELS[model]
    adapter = AdapterSection(r=lora_rank, lora_alpha=lora_rank) if lora_rank else None
    extra = {"sequence_parallel_size": sp} if sp > 1 else {}
    if job == "dmd":
        from ds_trainer.dmd_config import DMDConfig  # noqa: PLC0415
        from model.encoders.bundle import EncoderPaths  # noqa: PLC0415
        overrides = {} if preset.startswith("i2v") else dict(I2V_OVERRIDES)
        section = lambda: ModelSection(preset=preset, overrides=dict(overrides))  # noqa: E731
        return DMDConfig(encoders=EncoderPaths(t5="plan", clip="plan", vae="plan"), generator=section(),
                         real_score=section(), fake_score=section(), num_training_frames=frames, height=height,
                         width=width, batch_size=batch, adapter=adapter, **extra)
    if job != "adapter":
        raise ConfigError(f"--job: must be 'adapter' or 'dmd', got {job!r}")
    return TrainConfig(cache_dir="plan", model=AdapterModelSection(preset=preset), num_training_frames=frames,
                       height=height, width=width, batch_size=batch, adapter=adapter,
                       train_clip_path=not preset.startswith("i2v"), **extra)


# ------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParamCounts:
    """A role's parameters: (numel, trainable) per tensor."""

    sizes: tuple[tuple[int, bool], ...]

    @property
    def trainable(self) -> int:
        return sum(n for n, t in self.sizes if t)

    @property
    def frozen(self) -> int:
        return sum(n for n, t in self.sizes if not t)

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    def persistent(self, threshold: float, trainable: bool) -> int:
        """Numel of the tensors ZeRO-3 keeps whole on every rank (below the persistence threshold)."""
        return sum(n for n, t in self.sizes if t == trainable and n < threshold)

    @property
    def largest_trainable(self) -> int:
        return max((n for n, t in self.sizes if t), default=0)


def build_role(role: RoleSpec, num_layers: Optional[int] = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The role's model on the meta device, as its trainer builds it: LoRA, freezing and activation
    checkpointing applied, in training mode. `num_layers` replaces the block count (traces)."""
    from ds_trainer.trainable import apply_freeze, apply_lora  # noqa: PLC0415
    from model.causal import CausalWanModel  # noqa: PLC0415
    from model.wan import WanModel  # noqa: PLC0415
    arch = role.arch.replace(attn_backend=None, fused_qk_norm_rope=False)  # kernels change no byte held
    if num_layers is not None:
        arch = arch.replace(num_layers=num_layers)
    with torch.device(mt.TRACE_DEVICE):
        model = CausalWanModel(arch, role.causal) if role.causal is not None else WanModel(arch)
        if role.lora is not None:
            model = apply_lora(model, role.lora)
    model.to(dtype)
    if role.trainable is None:
        model.requires_grad_(False)
    else:
        apply_freeze(model, role.trainable)
    model.gradient_checkpointing = role.checkpointing
    return model.train(role.trainable is not None)


def count_params(role: RoleSpec) -> ParamCounts:
    model = build_role(role)
    return ParamCounts(tuple((p.numel(), p.requires_grad) for p in model.parameters()))


# ------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Breakdown:
    """Bytes per rank (host: CPU RAM per rank, for offload)."""

    frozen_weights: int
    trainable_weights: int
    gradients: int
    optimizer: int
    activations: int
    buffers: int
    step: int
    host: int = 0

    @property
    def states(self) -> int:
        return self.frozen_weights + self.trainable_weights + self.gradients + self.optimizer

    @property
    def peak(self) -> int:
        return self.states + max(self.activations + self.buffers, self.step)


@dataclass(frozen=True)
class Row:
    layout: str
    checkpointing: bool
    memory: Breakdown
    fits: bool


@dataclass
class Plan:
    job: JobSpec
    gpus: int
    gpu_bytes: int
    on_gpu: bool
    counts: dict[str, ParamCounts]
    rows: list[Row] = field(default_factory=list)

    @property
    def limit(self) -> int:
        return int(self.gpu_bytes * HEADROOM)

    def row(self, layout: str, checkpointing: bool) -> Optional[Row]:
        return next((r for r in self.rows if r.layout == layout and r.checkpointing == checkpointing), None)

    def recommended(self, checkpointing: Optional[bool] = None) -> Optional[Row]:
        """The first planned row in PREFERENCE order that fits (only those with `checkpointing` if given)."""
        for layout, ckpt in PREFERENCE:
            row = self.row(layout, ckpt)
            if row is not None and row.fits and checkpointing in (None, ckpt):
                return row
        return None

    def no_fit_message(self) -> str:
        best = min(self.rows, key=lambda r: r.memory.peak)
        return (f"no ZeRO config fits {self.gpus} GPU(s) of {self.gpu_bytes / GIB:.0f} GiB: the smallest peak is "
                f"{best.memory.peak / GIB:.1f} GiB (ZeRO-{best.layout}, activation checkpointing "
                f"{'on' if best.checkpointing else 'off'}) against {self.limit / GIB:.1f} GiB usable "
                f"({HEADROOM:.0%}); use more GPUs, sequence parallelism (--sp), fewer frames or a smaller size")


def zero_settings(layout: str) -> dict[str, float]:
    """The buffer sizes of a configs/ds layout (DeepSpeed's defaults where the file has none)."""
    from ds_trainer.ds_config import read_ds_config  # noqa: PLC0415
    zero = read_ds_config(layout)["zero_optimization"] if layout != PLAIN else {}
    return {k: float(zero.get(k, v)) for k, v in DEEPSPEED_DEFAULTS.items()}


def role_states(role: RoleSpec, counts: ParamCounts, layout: str, n: int, on_gpu: bool, z: dict[str, float],
                ema: bool = False) -> Breakdown:
    """Model states and buffers of one role on one rank (module docstring), activations left 0."""
    frozen_role = role.trainable is None
    engine = layout != PLAIN and (role.engine_always or layout != "2")
    b = 2 if on_gpu and (engine or layout == PLAIN) else 4  # a module outside an engine stays fp32
    t, f = counts.trainable, counts.frozen
    if layout in (PLAIN, "2"):
        fw, tw = b * f, b * t
    else:
        thr = z["stage3_param_persistence_threshold"]
        pf, pt = counts.persistent(thr, False), counts.persistent(thr, True)
        offload = layout == "3-offload"
        fw = b * (pf + (0 if offload else (f - pf) / n))
        tw = b * (pt + (0 if offload else (t - pt) / n))
    if layout == PLAIN:
        return Breakdown(int(fw), int(tw), b * t, 2 * b * t, 0, 0, 2 * b * counts.largest_trainable)
    share = t / n
    grads, optim, step, host = b * share, 12 * share + (4 * share if ema else 0), 8 * share, 0.0
    buffers = 0.0
    if not frozen_role:
        buffers = (2 * z["reduce_bucket_size"] + z["allgather_bucket_size"]) * b if layout == "2" \
            else z["reduce_bucket_size"] * b
    if layout == "3-offload":
        host = b * (t + f) / n + grads + optim + step
        grads, optim, step = 0, 0, 0
    if frozen_role:
        grads = optim = step = 0
    return Breakdown(int(fw), int(tw), int(grads), int(optim), 0, int(buffers), int(step), int(host))


def gathered_bytes(counts: ParamCounts, z: dict[str, float], on_gpu: bool) -> int:
    """ZeRO-3's live gathered parameters of a role: at most max_live + one prefetch bucket."""
    whole = counts.total - counts.persistent(z["stage3_param_persistence_threshold"], True) \
        - counts.persistent(z["stage3_param_persistence_threshold"], False)
    live = min(whole, z["stage3_max_live_parameters"] + z["stage3_prefetch_bucket_size"])
    return int(live * (2 if on_gpu else 4))


def make_plan(job: JobSpec, gpus: int, gpu_bytes: int, on_gpu: bool = True,
              layouts: tuple[str, ...] = ZERO_LAYOUTS, checkpointing: tuple[bool, ...] = (False, True)) -> Plan:
    """Every (layout, activation checkpointing) row of `job` on `gpus` ranks of `gpu_bytes` each."""
    if gpus < 1:
        raise ConfigError(f"--gpus: must be >= 1, got {gpus}")
    if job.sp > 1 and gpus % job.sp:
        raise ConfigError(f"--sp {job.sp} must divide the number of GPUs ({gpus})")
    counts = {r.name: count_params(r) for r in job.roles}
    plan = Plan(job, gpus, gpu_bytes, on_gpu, counts)
    acts = ActivationTracer(job, on_gpu)
    for layout in layouts:
        z = zero_settings(layout)
        for ckpt in checkpointing:
            states = [role_states(r, counts[r.name], layout, gpus, on_gpu, z, ema=job.ema and r.name == "generator")
                      for r in job.roles]
            act, attention = acts.peak(ckpt, teacher_fp32=layout == "2")  # the plain teacher module
            buffers = sum(s.buffers for s in states) + attention
            if layout in ("3", "3-offload"):
                buffers += max(gathered_bytes(counts[r.name], z, on_gpu) for r in job.roles)
            total = Breakdown(*(sum(getattr(s, k) for s in states) for k in
                                ("frozen_weights", "trainable_weights", "gradients", "optimizer")),
                              activations=act - attention, buffers=buffers, step=sum(s.step for s in states),
                              host=sum(s.host for s in states))
            plan.rows.append(Row(layout, ckpt, total, total.peak <= plan.limit))
    return plan


class ActivationTracer:
    """Activation peaks of a job's step from meta-device traces (memory_trace), cached per
    (role, phase, dtype, checkpointing)."""

    def __init__(self, job: JobSpec, on_gpu: bool):
        self.job, self.on_gpu = job, on_gpu
        self.dtype = torch.bfloat16 if on_gpu else torch.float32
        self.cache: dict[tuple, mt.Trace] = {}

    def _trace(self, role: RoleSpec, kind: str, dtype: torch.dtype, make_phase) -> mt.Trace:
        key = (role.name, role.checkpointing, kind, dtype)
        if key not in self.cache:
            def one(layers: int) -> mt.Trace:
                model = build_role(role, layers, dtype)
                return mt.trace(model, make_phase(model))
            self.cache[key] = mt.per_layers(one, role.arch.num_layers)
        return self.cache[key]

    def sp_shapes(self) -> mt.Shapes:
        s = self.job.shapes
        return dataclasses.replace(s, frames=math.ceil(s.frames / self.job.sp))

    def flash_dq(self, role: RoleSpec, shapes: mt.Shapes) -> int:
        """flash backward's fp32 dq accumulator for one self-attention, in bf16 only."""
        if not self.on_gpu:
            return 0
        return 4 * shapes.batch * shapes.frames * (shapes.height // 2) * (shapes.width // 2) * role.arch.dim

    def peak(self, checkpointing: bool, teacher_fp32: bool = False) -> tuple[int, int]:
        """(activation peak incl. attention workspace, attention workspace) of one step, bytes."""
        job = self.job.with_checkpointing(checkpointing)
        s = self.sp_shapes()
        if job.job != "dmd":
            (gen,) = job.roles
            t = self._trace(gen, "flow", self.dtype,
                            lambda m: mt.flow_step_phase(m, s, gen.causal, job.teacher_forcing))
            attention = t.masks + self.flash_dq(gen, s)
            return t.peak + self.flash_dq(gen, s), attention
        gen, critic, teacher = job.roles
        full = job.shapes
        roll = self._trace(gen, "rollout-grad", self.dtype,
                           lambda m: mt.rollout_phase(m, full, grad=True))
        teacher_dtype = torch.float32 if teacher_fp32 else self.dtype
        scores = max(self._trace(critic, "no-grad", self.dtype, lambda m: mt.no_grad_forward_phase(m, s)).peak,
                     self._trace(teacher, "no-grad", teacher_dtype, lambda m: mt.no_grad_forward_phase(m, s)).peak)
        gen_phase = max(roll.peak + self.flash_dq(gen, full), roll.held + scores)
        roll_free = self._trace(gen, "rollout", self.dtype,
                                lambda m: mt.rollout_phase(m, full, grad=False))
        crit = self._trace(critic, "flow", self.dtype, lambda m: mt.flow_step_phase(m, s))
        critic_phase = max(roll_free.peak, roll_free.held + crit.peak + self.flash_dq(critic, s))
        masks = max(roll.masks, crit.masks)
        return max(gen_phase, critic_phase), masks + self.flash_dq(gen, full)


# --------------------------------------------------------------- DeepSpeed and --zero auto
def deepspeed_config(plan: Plan, row: Row) -> dict[str, Any]:
    """The DeepSpeed JSON of a plan's row, as the trainer would resolve it (ds_trainer/ds_config.py)."""
    from ds_trainer.ds_config import read_ds_config, resolve_ds_config  # noqa: PLC0415
    job = plan.job
    extra = {"sequence_parallel_size": job.sp} if job.sp > 1 else {}
    return resolve_ds_config(read_ds_config(row.layout), job.shapes.batch, job.grad_accum, job.max_grad_norm,
                             plan.on_gpu, plan.gpus // job.sp, **extra)


def choose_zero(plan: Plan, checkpointing: bool) -> str:
    """The ZeRO layout `--zero auto` takes: the first in PREFERENCE that fits with the run's own
    activation checkpointing; an error saying by how much the smallest misses when none does."""
    row = plan.recommended(checkpointing)
    if row is None:
        other = plan.recommended(not checkpointing)
        hint = (f"; with model.activation_checkpointing: {str(not checkpointing).lower()} ZeRO-{other.layout} "
                f"would fit" if other is not None else "")
        raise ConfigError(f"zero: auto: {plan.no_fit_message()}{hint}")
    return row.layout


def device_memory(on_gpu: bool, local_ranks: int) -> int:
    """Bytes one rank may use: the GPU's memory, or on CPU the host's available memory shared by
    the node's ranks."""
    if on_gpu:
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    with open("/proc/meminfo") as fh:
        info = dict(line.split(":", 1) for line in fh)
    return int(info["MemAvailable"].split()[0]) * 1024 // max(1, local_ranks)


def resolve_auto_zero(cfg, world: int, local_ranks: int, on_gpu: bool) -> tuple[str, Plan]:
    """`zero: auto` of a run config on `world` ranks: (the chosen layout, its plan)."""
    if cfg.deepspeed_config is not None:
        raise ConfigError("zero: auto picks one of configs/ds/; it cannot be combined with deepspeed_config")
    job = job_from_config(cfg)
    ckpt = job.roles[0].checkpointing
    plan = make_plan(job, world, device_memory(on_gpu, local_ranks), on_gpu, checkpointing=(ckpt,))
    return choose_zero(plan, ckpt), plan
