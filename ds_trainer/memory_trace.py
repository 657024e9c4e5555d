"""Activation and temporary memory of a training step, measured by running the real step on the
`meta` device (no data, no compute) and following every tensor it creates.

`LiveBytes` is a dispatch mode that adds up the bytes of every storage an op creates on the
traced device and subtracts them when the storage dies, keeping the peak: the model code,
autograd's saved tensors, the activation-checkpointing recompute, the KV cache and the
backward's gradient temporaries are all seen exactly as the code makes them. Parameters (made
before the trace) are not counted; each trainable parameter's gradient is dropped as soon as it
is accumulated (DeepSpeed moves it into its reduce bucket; the model-state formulas of
ds_trainer/memory_plan.py count gradients), so a trace counts only activations and temporaries.

On `meta`, `scaled_dot_product_attention` would take the math path and save the [B, N, Lq, Lk]
probabilities; a trace runs the model's attention through `MetaFlashBackend` instead, the flash
kernel's meta function, which saves what flash-class kernels save (q, k, v, out and the fp32 log-sum-exp), as CPU SDPA (fp32, with or
without a mask), flash-attn and our Triton kernels do. Dense attention masks (the block-causal
[L, L] mask of the SDPA backend) are counted apart, as attention workspace.

The blocks of a Wan are identical, so a role is traced with 1 and 2 layers and the result is
extrapolated linearly in the layer count (`per_layers`): exact for the stacked structure and
cheap for 40-layer models at 32k tokens.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kernels.attention import SDPABackend, _dense_block_causal_mask
from model.wan import WanCrossAttention, WanSelfAttention

TRACE_DEVICE = torch.device("meta")


@dataclass(frozen=True)
class Trace:
    """Bytes seen in one traced phase. peak: most bytes live at once (activations + temporaries,
    masks included); held: live when the phase called `mark()` (e.g. the graph a rollout keeps for
    the later backward), else at its end; masks: bytes of dense attention masks (attention
    workspace, included in peak)."""

    peak: int
    held: int
    masks: int = 0


class LiveBytes(TorchDispatchMode):
    """Live and peak bytes of the storages created on `device` while the mode is active."""

    def __init__(self, device: torch.device = TRACE_DEVICE):
        super().__init__()
        self.device = device
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device == self.device:
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live or key in _KNOWN:
            return
        self.live[key] = storage.nbytes()
        self.current += self.live[key]
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


_KNOWN: set[int] = set()  # storages made before a trace (parameters): never counted


class MetaFlashBackend(SDPABackend):
    """The attention backend of a trace: SDPA's flash kernel (its meta function), which saves
    what flash-class kernels save (module docstring). Dense masks it is given are recorded."""

    name = "meta-flash"

    def __init__(self):
        self.mask_bytes: dict[int, int] = {}

    def attention(self, q, k, v, k_lens=None):
        if k_lens is not None:
            raise ValueError("a memory trace runs with every key valid (k_lens=None)")
        return self._flash(q, k, v, None)

    def block_causal_attention(self, q, k, v, layout):
        mask = _dense_block_causal_mask(layout, str(q.device))
        st = mask.untyped_storage()
        self.mask_bytes[st._cdata] = st.nbytes()
        return self._flash(q, k, v, mask)

    @staticmethod
    def _flash(q, k, v, mask):
        """[B, L, N, D] in and out, q and k in v's dtype, as kernels.attention.sdpa_attention."""
        q, k = q.to(v.dtype), k.to(v.dtype)
        out, *_ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False, attn_mask=mask)
        return out.transpose(1, 2)


def trace(model: nn.Module, phase: Callable[[Callable[[], None]], None]) -> Trace:
    """Run `phase()` (which uses `model`, a meta-device module) under `LiveBytes`, every attention
    of `model` through a `MetaFlashBackend`."""
    _forget_meta_caches()
    _KNOWN.clear()
    for p in model.parameters():
        _KNOWN.add(p.untyped_storage()._cdata)
    hooks = [p.register_post_accumulate_grad_hook(_drop_grad) for p in model.parameters() if p.requires_grad]
    flash, live = MetaFlashBackend(), LiveBytes()
    for mod in model.modules():
        if isinstance(mod, (WanSelfAttention, WanCrossAttention)):
            mod.backend = flash
    held = []
    try:
        with live:
            phase(lambda: held.append(live.current))
    finally:
        for h in hooks:
            h.remove()
        _KNOWN.clear()
        _forget_meta_caches()
    return Trace(live.peak, held[0] if held else live.current, sum(flash.mask_bytes.values()))


def _forget_meta_caches() -> None:
    """Drop the meta tensors the model code caches across calls (RoPE tables, dense block-causal
    masks): each trace must see them made, as the first step of a real run does."""
    from model import layers  # noqa: PLC0415
    _dense_block_causal_mask.cache_clear()
    for key in [k for k in layers._ROPE_CACHE if k[3].type == TRACE_DEVICE.type]:
        del layers._ROPE_CACHE[key]


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


TRACED_LAYERS = (3, 4)
"""Layer counts a role is traced with. From 3 blocks on every block adds the same bytes (checked
down to the tiny model); with fewer, the peak can fall elsewhere (in the embeddings or the text
context while activation checkpointing is on)."""


def per_layers(trace_with: Callable[[int], Trace], num_layers: int) -> Trace:
    """A trace of a `num_layers`-block model from traces with TRACED_LAYERS blocks (linear in the
    layers; masks are shared by the layers, so they do not scale)."""
    a, b = TRACED_LAYERS
    if num_layers <= b:
        return trace_with(num_layers)
    lo, hi = trace_with(a), trace_with(b)
    extra = num_layers - a
    return Trace(lo.peak + extra * (hi.peak - lo.peak), lo.held + extra * (hi.held - lo.held), max(lo.masks, hi.masks))


# ------------------------------------------------------------------- the jobs' phases
@dataclass(frozen=True)
class Shapes:
    """The inputs of one micro-batch: batch B, latent grid (F, h, w) of the video (VAE: pixels / 8),
    `subjects` reference images per sample (each a full-frame VAE latent and 257 CLIP tokens)."""

    batch: int
    frames: int
    height: int
    width: int
    subjects: int = 1


def _meta(*shape, dtype=torch.float32, device: torch.device = TRACE_DEVICE) -> torch.Tensor:
    if device.type == TRACE_DEVICE.type:
        return torch.empty(*shape, device=device, dtype=dtype)
    return torch.randn(*shape, device=device, dtype=dtype)


def adapter_inputs(cfg, s: Shapes, device: torch.device = TRACE_DEVICE):
    """The FlowInputs of a cached OpenS2V batch (ds_trainer/flow_step.py: inputs_from_batch) on
    `device` (random values off meta, for measuring a real step), with
    every reference token valid: per-sample reference lengths need data (`.item()`), and the
    key-padding masks they add are B x K bytes per path."""
    from ds_trainer.flow_step import FlowInputs  # noqa: PLC0415
    from model.conditioning import Conditioning  # noqa: PLC0415
    from model.config import CLIP_TOKENS, T5_TOKENS, VAE_Z_DIM  # noqa: PLC0415
    b, r, d = s.batch, s.subjects, device
    cond = Conditioning(_meta(b, T5_TOKENS, cfg.text_dim, device=d), torch.full((b,), T5_TOKENS, device=d),
                        ref_vae=_meta(b, r, VAE_Z_DIM, s.height, s.width, device=d))
    if cfg.reference_paths.clip:
        cond = cond.replace(ref_clip=_meta(b, r, CLIP_TOKENS, cfg.clip_dim, device=d))
    if cfg.model_type == "i2v":
        cond = cond.replace(clip_fea=_meta(b, CLIP_TOKENS, cfg.clip_dim, device=d),
                            y=_meta(b, 20, s.frames, s.height, s.width, device=d))
    return FlowInputs(_meta(b, VAE_Z_DIM, s.frames, s.height, s.width, device=d), cond)


def i2v_inputs(cfg, s: Shapes):
    """(Conditioning, first-frame latent) of an I2V batch (data/encode.py: encode_i2v)."""
    from model.conditioning import Conditioning  # noqa: PLC0415
    from model.config import CLIP_TOKENS, I2V_MASK_CHANNELS, T5_TOKENS, VAE_Z_DIM  # noqa: PLC0415
    b = s.batch
    cond = Conditioning(_meta(b, T5_TOKENS, cfg.text_dim), torch.full((b,), T5_TOKENS, device=TRACE_DEVICE),
                        clip_fea=_meta(b, CLIP_TOKENS, cfg.clip_dim),
                        y=_meta(b, I2V_MASK_CHANNELS + VAE_Z_DIM, s.frames, s.height, s.width))
    return cond, _meta(b, VAE_Z_DIM, 1, s.height, s.width)


def flow_step_phase(model, s: Shapes, causal=None, teacher_forcing: bool = False) -> Callable:
    """Forward + backward of the flow-matching loss (the adapter job's step, DMD's critic step
    without its rollout), exactly as ds_trainer/flow_step.py runs it."""
    from ds_trainer.flow_step import flow_matching_loss  # noqa: PLC0415
    from model.flow_matching import FlowMatchingScheduler  # noqa: PLC0415

    def run(mark):
        inputs = adapter_inputs(model.config, s)
        loss = flow_matching_loss(model, inputs, FlowMatchingScheduler(), torch.Generator().manual_seed(0),
                                  causal=causal, teacher_forcing=teacher_forcing)
        loss.backward()
    return run


def no_grad_forward_phase(model, s: Shapes) -> Callable:
    """One inference forward (DMD's real and fake scores on the generator's video)."""
    def run(mark):
        cond, _ = i2v_inputs(model.config, s)
        with torch.no_grad():
            model(_meta(s.batch, 16, s.frames, s.height, s.width), torch.full((s.batch,), 500.0, device=TRACE_DEVICE),
                  cond)
    return run


def rollout_phase(model, s: Shapes, grad: bool) -> Callable:
    """Self-Forcing's rollout (ds_trainer/self_forcing.py) as it holds memory: the KV caches, the
    cross-attention cache, and per block of frames the exit step's forward through the caches (with
    gradients when `grad`), whose graph the rollout keeps; then, with `grad`, the DMD loss's
    backward. The real rollout runs the exit step in lookahead mode (the cache gathered into fresh
    tensors, which needs the cache's positions: data, not meta) and writes the block with one more
    no-grad pass; here the exit step writes it, which saves the same gathered keys and values.
    The no-grad denoising steps before the exit hold nothing afterwards. `held`: what is live after
    the rollout (the video and, with `grad`, its graph), beside which the scores then run."""
    from model.causal import BlockStep, frame_blocks  # noqa: PLC0415

    def run(mark):
        cond, first = i2v_inputs(model.config, s)
        b, causal = s.batch, model.causal
        dtype = next(model.parameters()).dtype
        caches = model.new_kv_caches(b, (s.height // 2) * (s.width // 2), s.frames, device=TRACE_DEVICE, dtype=dtype)
        t = torch.full((b,), 500.0, device=TRACE_DEVICE)
        with torch.set_grad_enabled(grad):
            cross = model.cross_attention_cache(cond)
            out = []
            for index, (start, end) in enumerate(frame_blocks(s.frames, causal)):
                step = BlockStep(start, caches, cross, cond.y[:, :, start:end])
                if causal.independent_first_frame and index == 0:
                    with torch.no_grad():
                        model(first, t, block=step)
                    out.append(first)
                else:
                    out.append(model(_meta(b, 16, end - start, s.height, s.width), t, block=step))
            video = torch.cat(out, dim=2)
        del caches, cross, out
        mark()
        if grad:
            (0.5 * F.mse_loss(video.double(), video.detach().double())).backward()
    return run
