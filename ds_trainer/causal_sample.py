"""`wanspeed sample`'s causal I2V mode: a DMD run's block-causal generator (Self-Forcing / LongLive)
from a first frame, block by block through the KV cache, each block decoded and written to the mp4
as soon as it is done.

Conditioning as in training (data/encode.py: encode_i2v: clip_fea of the image, y = mask + image
latent); the image latent is the independent first block; every other block runs the config's
(warped) few-step denoising list, re-noising each step's x0 to the next step, then one clean pass
at `context_noise` writes it to the KV cache (ds_trainer/self_forcing.py's rollout with the last
step as every block's exit). LongLive's prompt switches (`--prompt a --prompt b --switch-at F`):
from latent frame F on, prompt b, after a KV re-cache of the frames done (ds_trainer/prompt_switch.py). The KV cache is a sink + ring window when the config's causal section
sets local_attn_size / sink_size, so videos longer than the training window keep a bounded cache.
Weights: `generator_ema` when the checkpoint has it, else `generator` (Self-Forcing's `model.`
keys), checked against the config like the subject mode's; or `generator_lora` (a LoRA DMD run, or
LongLive's `lora.pt`) on the config's generator_ckpt (LongLive's `longlive_base.pt`), merged.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

log = logging.getLogger(__name__)

DEFAULT_FPS = 16
"""Wan2.1's output frame rate (the DMD config has no sample section)."""


def load_causal_generator(cfg, ckpt: Path, config_path: str, dtype: torch.dtype = torch.float32,
                          device="cpu"):
    """The CausalWanModel of a DMD config with `ckpt`'s generator weights (EMA first). Weights that
    cover the whole model are assigned on the meta device (the base is never read); partial ones
    go on top of the config's generator_ckpt."""
    from ds_trainer import sample_weights as sw  # noqa: PLC0415
    from model.causal import CausalWanModel  # noqa: PLC0415
    from model.checkpoint import read_checkpoint, strip_wrapper_prefix  # noqa: PLC0415

    trained = sw.read_trained(ckpt, prefer_ema=True)
    sw.check_compatible(trained, cfg, config_path)
    with torch.device("meta"):
        model = CausalWanModel(cfg.generator.architecture(), cfg.causal.causal_config())
    expected = model.state_dict()
    weights = dict(trained.weights)
    if set(expected) - set(weights):
        if not cfg.generator_ckpt:
            raise sw.IncompatibleWeights(f"{trained.source} lacks {sorted(set(expected) - set(weights))[:3]} and "
                                         f"{config_path} has no generator_ckpt to take them from")
        base = strip_wrapper_prefix(read_checkpoint(cfg.generator_ckpt)[0])[0]
        weights = {**{k: v for k, v in base.items() if k in expected}, **weights}
    sw.load_into(model, dataclasses.replace(trained, weights=weights, lora=None), assign=True)
    still = [n for n, p in model.named_parameters() if p.is_meta]
    if still:
        raise sw.IncompatibleWeights(f"{trained.source} and the base lack {still[:3]}")
    model = model.to(device=device, dtype=dtype)
    if trained.lora:
        model = _merged_lora(model, trained, cfg)
    return model.eval()


def _merged_lora(model, trained, cfg):
    """Inject LoRA on the modules the weights name (LongLive: every Linear of the causal blocks,
    r = alpha = 256), load them and fold them into the base Linears. alpha comes from the
    config's adapter section when it has one, else alpha = r (LongLive's setting)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict  # noqa: PLC0415

    from ds_trainer import sample_weights as sw  # noqa: PLC0415
    targets, rank = sw.lora_targets(trained.lora, trained.source)
    missing = [t for t in targets if t not in dict(model.named_modules())]
    if missing:
        raise sw.IncompatibleWeights(f"{trained.source}: LoRA on modules the model lacks: {missing[:3]}")
    adapter = getattr(cfg, "adapter", None)
    if adapter is not None and adapter.r != rank:
        raise sw.IncompatibleWeights(f"{trained.source}: LoRA rank {rank}, but the config's adapter.r is {adapter.r}")
    alpha = adapter.lora_alpha if adapter is not None else rank
    model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), model)
    result = set_peft_model_state_dict(model, trained.lora)
    if getattr(result, "unexpected_keys", None):
        raise sw.IncompatibleWeights(f"{trained.source}: LoRA keys the model lacks: {result.unexpected_keys[:5]}")
    log.info("%s: LoRA r=%d alpha=%d on %d modules, merged into the base", trained.source, rank, alpha, len(targets))
    return sw.merge_lora_and_unwrap(model)


def i2v_inputs(cfg, encoders, image_path: Optional[Path], prompt: str, latent_frames: int):
    """(Conditioning, first-frame latent [1, 16, 1, h, w], image [3, H, W]) of the first frame."""
    from data.encode import encode_i2v  # noqa: PLC0415
    from data.skips import BadSample  # noqa: PLC0415
    from data.video import image_to_model, load_rgb_image  # noqa: PLC0415
    if image_path is None:
        raise ValueError("causal I2V mode needs the first frame: give it with --image FIRST_FRAME")
    try:
        image = image_to_model(load_rgb_image(Path(image_path)), cfg.height, cfg.width)
    except BadSample as exc:
        raise ValueError(f"--image {image_path}: {exc}") from exc
    cond, first = encode_i2v(encoders, image[None], [prompt], latent_frames)
    return cond, first, image


def prompt_conditions(encoders, cond, prompts: list[str]) -> list:
    """`cond` with each prompt's T5 context in turn (clip_fea and y stay the first frame's)."""
    out = []
    for prompt in prompts:
        context, lens = encoders.t5.encode([prompt])
        out.append(cond.replace(context=context.float().to(cond.context.device),
                                context_lens=lens.to(cond.context.device)))
    return out


@torch.no_grad()
def stream_rollout(model, cfg, cond, first: torch.Tensor, noise: torch.Tensor, rng: torch.Generator,
                   on_block: Optional[Callable[[int, torch.Tensor], None]] = None,
                   switches: Sequence = (), keep_sink: bool = True) -> torch.Tensor:
    """Every block of noise [1, 16, F, h, w] through the KV cache with the config's few-step list;
    returns the latents, calling on_block(index, x0) as each block is done. switches: prompt
    switches (ds_trainer/prompt_switch.py: PromptSwitch), the sink kept over them with keep_sink."""
    from ds_trainer.self_forcing import self_forcing_rollout, warped_steps  # noqa: PLC0415
    from model.causal import frame_blocks  # noqa: PLC0415
    from model.flow_matching import FlowMatchingScheduler  # noqa: PLC0415

    causal = cfg.causal.causal_config()
    scheduler = FlowMatchingScheduler(shift=cfg.timestep_shift)
    steps = warped_steps(cfg.denoising_step_list, scheduler, cfg.warp_denoising_step)
    blocks = len(frame_blocks(noise.shape[2], causal))
    return self_forcing_rollout(model, model, noise, cond, first, causal, steps, [len(steps) - 1] * blocks,
                                scheduler, cfg.context_noise, grad=False, rng=rng, on_block=on_block,
                                switches=switches, keep_sink=keep_sink)


def sample_causal_video(cfg, config_path: str, ckpt: Path, req) -> dict:
    """Write `req.out` block by block (and with `req.grid` a contact sheet); returns what was written."""
    from tqdm import tqdm  # noqa: PLC0415

    from ds_trainer.sample import _device, latent_frames_for, progress_disabled  # noqa: PLC0415
    from ds_trainer.stream_decode import StreamingDecoder  # noqa: PLC0415
    from ds_trainer.video_out import Mp4Writer, contact_sheet  # noqa: PLC0415
    from model.causal import frame_blocks  # noqa: PLC0415
    from model.encoders.bundle import load_frozen_encoders  # noqa: PLC0415

    from ds_trainer.prompt_switch import PromptSwitch, switch_blocks  # noqa: PLC0415

    t0 = time.perf_counter()
    frames = latent_frames_for(req.frames) if req.frames else cfg.num_training_frames
    try:
        blocks = frame_blocks(frames, cfg.causal.causal_config())
    except ValueError as exc:
        raise ValueError(f"--frames {req.frames}: {frames} latent frames do not split into blocks: {exc}") from exc
    at = switch_blocks(req.switch_at, blocks, len(req.prompts))
    if req.image is None:
        raise ValueError("causal I2V mode needs the first frame: give it with --image FIRST_FRAME")
    device, dtype = _device()
    model = load_causal_generator(cfg, ckpt, config_path, dtype, device)
    encoders = load_frozen_encoders(cfg.encoders, device)
    cond, first, image = i2v_inputs(cfg, encoders, req.image, req.prompts[0], frames)
    later = prompt_conditions(encoders, cond, req.prompts[1:])
    switches = [PromptSwitch(block, c.to(device, dtype)) for block, c in zip(at, later)]
    rng = torch.Generator().manual_seed(req.seed)
    noise = torch.randn((1, 16, *cond.y.shape[2:]), generator=rng).to(device)
    decoder, chunks = StreamingDecoder(encoders.vae), []
    bar = tqdm(total=len(blocks), desc="blocks", disable=progress_disabled())
    t1 = time.perf_counter()
    with Mp4Writer(req.out, getattr(getattr(cfg, "sample", None), "fps", DEFAULT_FPS)) as writer:
        def write_block(index: int, x0: torch.Tensor) -> None:
            pixels = decoder.push(x0)[0]
            writer.append(pixels)
            chunks.append(pixels.cpu())
            bar.update(1)

        stream_rollout(model, cfg, cond.to(device, dtype), first.to(device, dtype), noise.to(dtype), rng, write_block,
                       switches, keep_sink=not req.recache_sink)
    decoder.close()
    bar.close()
    video = torch.cat(chunks, dim=1)
    out = {"video": str(req.out), "frames": video.shape[1], "size": list(video.shape[2:]), "blocks": len(blocks),
           "switch_blocks": at,
           "sample_seconds": round(time.perf_counter() - t1, 2), "total_seconds": round(time.perf_counter() - t0, 2)}
    if req.grid:
        out["grid"] = str(contact_sheet(video, [image], Path(req.out).with_suffix(".png")))
    return out
