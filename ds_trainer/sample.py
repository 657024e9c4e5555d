"""`wanspeed sample`: a subject-reference video from the OpenS2V adapters, as an H.264 mp4.

The generator is the config's base (or its seeded random base) with the trained weights of
`--ckpt` on top (ds_trainer/sample_weights.py). The subject images are cut out on white and
letterboxed to the reference size as the training data are (data/subjects.py), and encoded by the
same function as in training (data/encode.py: VAE latent, CLIP tokens). The sampler is a diffusers
scheduler on Wan's official sigma grid (ds_trainer/schedulers.py). Guidance, with u(text, refs)
the model's velocity:

- plain CFG (Wan's): u(neg, refs) + g (u(prompt, refs) - u(neg, refs)); the negative branch keeps
  the references, as Wan's I2V keeps clip_fea and y;
- with `ref_guidance` g2: u(neg, -) + g (u(prompt, -) - u(neg, -)) + g2 (u(prompt, refs) - u(prompt, -)),
  i.e. text-and-reference vs text-only vs neither, where "-" is the references switched off
  (zero reference tokens: every reference path then adds nothing).

A DMD config goes to the streaming causal I2V mode (ds_trainer/causal_sample.py). `run` also keeps
the older `--logdir DIR` form (a dataset sample's prompt and subject, few-step Euler, no guidance).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from model.conditioning import Conditioning

log = logging.getLogger(__name__)
ALPHA_OPAQUE = 128
"""Alpha at or above which a pixel of an RGBA subject image belongs to the subject."""


@dataclass
class SampleRequest:
    """What one `wanspeed sample` call asks for (the command's flags)."""

    prompts: list[str]
    """One prompt (subject mode); in causal I2V mode one per segment of `switch_at`."""
    out: Path
    subject_images: list[Path] = field(default_factory=list)
    image: Optional[Path] = None
    """Causal I2V mode: the first frame."""
    switch_at: list[int] = field(default_factory=list)
    """Causal I2V mode: latent frames at which the next prompt takes over."""
    recache_sink: bool = False
    """Causal I2V mode: a switch re-caches the sink frames too (LongLive's global_sink false)."""
    negative_prompt: Optional[str] = None
    """None: the config's `negative_prompt` if it has one, else empty."""
    frames: Optional[int] = None
    """Pixel frames (1 + 4k); None: the config's training length."""
    steps: Optional[int] = None
    """None: the config's sample.steps."""
    guidance: float = 5.0
    ref_guidance: Optional[float] = None
    seed: int = 0
    sampler: str = "unipc"
    shift: Optional[float] = None
    """Flow shift of the sampling grid; None: the config's timestep_shift."""
    grid: bool = False
    merge_lora: bool = False


@dataclass
class GuidanceBranches:
    """The conditionings guidance combines: prompt / negative prompt, each with and without the
    references (`text` and `neither` are None when no reference guidance is asked for)."""

    full: Conditioning
    negative: Conditioning
    text: Optional[Conditioning] = None
    neither: Optional[Conditioning] = None


def progress_disabled() -> bool:
    return os.environ.get("WANSPEED_NO_PROGRESS") == "1"


def latent_frames_for(pixel: int, flag: str = "--frames") -> int:
    """Latent frames of a `pixel`-frame video; it must be 1 + 4k (the VAE's temporal stride)."""
    from model.config import VAE_STRIDE  # noqa: PLC0415
    stride = VAE_STRIDE[0]
    if pixel < 1 or (pixel - 1) % stride:
        near = max(1, (pixel - 1) // stride * stride + 1)
        raise ValueError(f"{flag} must be 1 + {stride}k pixel frames (the VAE's temporal stride), got {pixel}; "
                         f"e.g. {near} or {near + stride}")
    return 1 + (pixel - 1) // stride


def load_subject_image(path: Path, height: int, width: int) -> torch.Tensor:
    """A subject image as training sees one: [3, height, width] in [-1, 1], on white. An image with
    transparency is cut out with its alpha as the mask (data/subjects.py: on white, cropped to the
    mask's box); an opaque image is taken as an already cut-out subject. Then letterboxed."""
    from PIL import Image  # noqa: PLC0415

    from data.subjects import cut_out, letterbox  # noqa: PLC0415
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--subject-image: no such file: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
            rgba = np.asarray(img.convert("RGBA"))
    except OSError as exc:
        raise ValueError(f"--subject-image {path}: not a readable image ({exc})") from exc
    rgb = np.ascontiguousarray(rgba[..., :3])
    if has_alpha:
        mask = rgba[..., 3] >= ALPHA_OPAQUE
        if not mask.any():
            raise ValueError(f"--subject-image {path}: fully transparent, no subject to cut out")
        rgb = cut_out(rgb, mask)
    return letterbox(rgb, height, width)


def without_references(cond: Conditioning) -> Conditioning:
    """The same conditioning with every reference token masked out (lengths 0)."""
    zeros = lambda t: None if t is None else torch.zeros_like(t)  # noqa: E731
    return cond.replace(ref_vae_lens=zeros(cond.ref_vae_lens), ref_clip_lens=zeros(cond.ref_clip_lens))


def guidance_branches(encoders, refs, prompt: str, negative: str, subjects: Optional[torch.Tensor],
                      separate_ref_guidance: bool) -> GuidanceBranches:
    """The conditionings of one video. subjects [1, R, 3, H, W] in [-1, 1] (None for a model without
    reference paths); refs: the model's ReferencePathsConfig."""
    from data.encode import encode_subjects  # noqa: PLC0415
    context, lens = encoders.t5.encode([prompt, negative])
    context, lens = context.float(), lens.to(context.device)
    text = [Conditioning(context[i:i + 1], lens[i:i + 1]) for i in range(2)]
    if subjects is not None:
        ref_vae, ref_clip = encode_subjects(encoders, subjects, clip=refs.clip)
        r, (hr, wr) = subjects.shape[1], ref_vae.shape[-2:]
        extra = dict(ref_vae=ref_vae, ref_vae_lens=torch.tensor([r * hr * wr], device=ref_vae.device))
        if refs.clip:
            extra.update(ref_clip=ref_clip, ref_clip_lens=torch.tensor([r * ref_clip.shape[2]], device=ref_clip.device))
        text = [c.replace(**extra) for c in text]
    full, negative_cond = text
    if not separate_ref_guidance:
        return GuidanceBranches(full, negative_cond)
    return GuidanceBranches(full, negative_cond, without_references(full), without_references(negative_cond))


def guided_flow(model, x: torch.Tensor, t: torch.Tensor, br: GuidanceBranches, guidance: float,
                ref_guidance: Optional[float]) -> torch.Tensor:
    """The guided velocity at x [B, 16, F, h, w], t [B] (module docstring for the formulas)."""
    if ref_guidance is None:
        cond = model(x, t, br.full)
        if guidance == 1.0:
            return cond
        uncond = model(x, t, br.negative)
        return uncond + guidance * (cond - uncond)
    full, text, neither = (model(x, t, c) for c in (br.full, br.text, br.neither))
    return neither + guidance * (text - neither) + ref_guidance * (full - text)


@torch.no_grad()
def denoise(model, noise: torch.Tensor, br: GuidanceBranches, sampler, guidance: float,
            ref_guidance: Optional[float]) -> torch.Tensor:
    """Run `sampler` (a schedulers.FlowSampler) from noise [B, 16, F, h, w] to clean latents. A
    block-causal generator is sampled block by block through its KV cache instead
    (ds_trainer/causal_denoise.py), a fresh sampler of the same kind per block."""
    from tqdm import tqdm  # noqa: PLC0415

    from model.causal import CausalWanModel  # noqa: PLC0415
    if isinstance(model, CausalWanModel):
        from ds_trainer.causal_denoise import denoise_blockwise  # noqa: PLC0415
        from ds_trainer.schedulers import FlowSampler  # noqa: PLC0415
        remake = lambda: FlowSampler(sampler.name, len(sampler), sampler.shift)  # noqa: E731
        return denoise_blockwise(model, noise, br, remake, guidance, ref_guidance)
    x = noise
    b = x.shape[0]
    for i in tqdm(range(len(sampler)), desc=f"sample ({sampler.name})", disable=progress_disabled()):
        t = sampler.timesteps[i].to(device=x.device, dtype=torch.float32).expand(b)
        flow = guided_flow(model, x, t, br, guidance, ref_guidance)
        x = sampler.step(flow.to(x.dtype), i, x)
    return x


def build_generator(cfg, ckpt: Path, config_path: str, merge_lora: bool = False,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Base + (LoRA) + the trained weights of `ckpt`, checked against the config first."""
    import dataclasses  # noqa: PLC0415

    from ds_trainer import sample_weights as sw  # noqa: PLC0415
    trained = sw.read_trained(ckpt, prefer_ema=False)
    sw.check_compatible(trained, cfg, config_path)
    wan_cfg = cfg.wan_config()
    model = sw.base_generator(cfg, wan_cfg, dtype=dtype, device=device)
    has_lora = bool(trained.lora) or any("lora_" in k for k in trained.weights)
    if has_lora and not cfg.adapter:
        raise sw.IncompatibleWeights(f"{trained.source} holds LoRA weights but {config_path} has no `adapter` section")
    if cfg.adapter:
        from ds_trainer.trainable import apply_lora  # noqa: PLC0415
        model = apply_lora(model, dataclasses.replace(cfg.adapter, lora_dropout=0.0))
    sw.load_into(model, trained)
    if cfg.adapter and merge_lora:
        log.info("merged %d LoRA layers into the base", sw.merge_lora(model))
    return model.to(device=device, dtype=dtype).eval()


def _device() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def sample_subject_video(cfg, config_path: str, ckpt: Path, req: SampleRequest) -> dict:
    """Write `req.out` (and with `req.grid` a contact sheet beside it); returns what was written."""
    from data.options import DatasetOptions  # noqa: PLC0415
    from ds_trainer.schedulers import FlowSampler  # noqa: PLC0415
    from ds_trainer.video_out import Mp4Writer, contact_sheet  # noqa: PLC0415
    from model.encoders.bundle import load_frozen_encoders  # noqa: PLC0415

    t0 = time.perf_counter()
    if cfg.encoders is None:
        raise ValueError(f"{config_path}: sampling needs `encoders` (T5, CLIP, VAE paths)")
    device, dtype = _device()
    model = build_generator(cfg, ckpt, config_path, req.merge_lora, device, dtype)
    refs = model.config.reference_paths
    if (refs.vae or refs.clip) and not req.subject_images:
        raise ValueError("the model has subject-reference paths: give the subject with --subject-image IMG "
                         "(one or more)")
    frames = latent_frames_for(req.frames) if req.frames else cfg.num_training_frames
    encoders = load_frozen_encoders(cfg.encoders, device)
    size = DatasetOptions(section=cfg.opens2v, height=cfg.height, width=cfg.width).reference_size
    subjects = (torch.stack([load_subject_image(p, *size) for p in req.subject_images])[None]
                if (refs.vae or refs.clip) else None)
    if len(req.prompts) != 1:
        raise ValueError(f"subject-reference mode takes one --prompt, got {len(req.prompts)}")
    negative = req.negative_prompt if req.negative_prompt is not None else getattr(cfg, "negative_prompt", "")
    br = guidance_branches(encoders, refs, req.prompts[0], negative, subjects, req.ref_guidance is not None)
    stride = encoders.vae.spatial_stride
    shape = (1, 16, frames, cfg.height // stride, cfg.width // stride)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(req.seed)).to(device)
    sampler = FlowSampler(req.sampler, req.steps or cfg.sample.steps, req.shift or cfg.timestep_shift)
    t1 = time.perf_counter()
    latents = denoise(model, noise, _cast(br, device, dtype), sampler, req.guidance, req.ref_guidance)
    video = encoders.vae.decode(latents.float())[0]
    seconds = time.perf_counter() - t1
    with Mp4Writer(req.out, cfg.sample.fps) as writer:
        writer.append(video)
    out = {"video": str(req.out), "frames": video.shape[1], "size": list(video.shape[2:]), "steps": len(sampler),
           "sampler": req.sampler, "sample_seconds": round(seconds, 2),
           "total_seconds": round(time.perf_counter() - t0, 2)}
    if req.grid:
        out["grid"] = str(contact_sheet(video, list(subjects[0]) if subjects is not None else [],
                                        Path(req.out).with_suffix(".png")))
    return out


def _cast(br: GuidanceBranches, device, dtype) -> GuidanceBranches:
    move = lambda c: None if c is None else c.to(device, dtype)  # noqa: E731
    return GuidanceBranches(move(br.full), move(br.negative), move(br.text), move(br.neither))


# ----------------------------------------------------------------- the older `--logdir DIR` form
def load_trained_generator(cfg, checkpoint: Path):
    """A run's generator from one of its checkpoints (base + LoRA + trained weights)."""
    return build_generator(cfg, Path(checkpoint), "the run's config.yaml")


@torch.no_grad()
def sample_video(model, inputs, steps: int, shift: float, generator: torch.Generator,
                 ref_guidance: Optional[float] = None) -> torch.Tensor:
    """Euler flow-matching sampling from noise: returns latents shaped like inputs.latents. With
    `ref_guidance` g2 the velocity is u(-) + g2 (u(refs) - u(-)), u(-) without the references
    (guided_flow's formula at guidance 1)."""
    from model.flow_matching import FlowMatchingScheduler  # noqa: PLC0415
    sch = FlowMatchingScheduler(shift=shift)
    x = torch.randn(inputs.latents.shape, generator=generator)
    sigmas = sch.sampling_sigmas(steps)
    b = x.shape[0]
    plain = without_references(inputs.cond) if ref_guidance is not None else None
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        t = sch.timestep(s).expand(b)
        flow = model(x, t, inputs.cond)
        if plain is not None:
            without = model(x, t, plain)
            flow = without + ref_guidance * (flow - without)
        x = sch.euler_step(x, flow, s.expand(b), s_next.expand(b))
    return x


def write_mp4(video: torch.Tensor, subject: Optional[torch.Tensor], path: Path, fps: int) -> Path:
    """video [3, T, H, W] and subject [3, H, W] in [-1, 1] -> mp4 (libx264), subject on the left."""
    import imageio.v2 as imageio  # noqa: PLC0415
    to8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    frames = to8(video).permute(1, 2, 3, 0).numpy()                  # [T, H, W, 3]
    if subject is not None:
        ref = to8(torch.nn.functional.interpolate(subject[None], size=frames.shape[1:3], mode="bilinear")[0])
        frames = np.concatenate([np.repeat(ref.permute(1, 2, 0).numpy()[None], len(frames), 0), frames], axis=2)
    pad_h, pad_w = (-frames.shape[1]) % 16, (-frames.shape[2]) % 16  # macroblock-friendly size
    frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    imageio.mimwrite(path, list(frames), fps=fps, codec="libx264", quality=8, macro_block_size=1)
    return path


def run_logdir(args) -> int:
    """`wanspeed sample --logdir DIR`: a dataset sample's prompt and subject through the newest
    (or `--checkpoint`) checkpoint of a run, few-step Euler, with the config's `sample.ref_guidance`."""
    from data.opens2v import collate_opens2v_batch  # noqa: PLC0415
    from ds_trainer.config import load_train_config, trainer_class  # noqa: PLC0415
    from ds_trainer.datasets import opens2v_dataset  # noqa: PLC0415
    from ds_trainer.flow_step import inputs_from_batch  # noqa: PLC0415
    from model.encoders.bundle import load_frozen_encoders  # noqa: PLC0415

    cfg = load_train_config(args.logdir / "config.yaml")
    ckpt = args.checkpoint or trainer_class(cfg).find_resumable(args.logdir, cfg)
    if ckpt is None:
        raise SystemExit(f"{args.logdir}: no complete checkpoint to sample from")
    if cfg.encoders is None:
        raise SystemExit("sampling needs the encoders (T5, CLIP, VAE) in the run config")
    model = load_trained_generator(cfg, Path(ckpt))
    encoders = load_frozen_encoders(cfg.encoders)
    sample = opens2v_dataset(cfg)[args.index]
    inputs = inputs_from_batch(collate_opens2v_batch([sample]), encoders, torch.device("cpu"),
                               model.config.reference_paths.clip)
    latents = sample_video(model, inputs, args.steps or cfg.sample.steps, cfg.timestep_shift,
                           torch.Generator().manual_seed(cfg.seed), ref_guidance=cfg.sample.ref_guidance)
    video = encoders.vae.decode(latents)[0].float()
    out = write_mp4(video, sample["subject_images"][0], args.out or args.logdir / "sample.mp4", cfg.sample.fps)
    print(f"wrote {out} ({video.shape[1]} frames, prompt: {sample['prompt']!r}, checkpoint {Path(ckpt).name})")
    return 0


def run(args) -> int:
    """args: the options of `wanspeed sample` (ds_trainer/commands/sample.py); an object with only
    `logdir` (and checkpoint, index, steps, out) runs the older form."""
    if getattr(args, "config", None) is None:
        return run_logdir(args)
    import json  # noqa: PLC0415

    from ds_trainer.config import load_train_config  # noqa: PLC0415
    cfg = load_train_config(args.config)
    if cfg.job == "dmd":
        from ds_trainer.causal_sample import sample_causal_video  # noqa: PLC0415
        result = sample_causal_video(cfg, str(args.config), Path(args.ckpt), request_from(args))
    else:
        result = sample_subject_video(cfg, str(args.config), Path(args.ckpt), request_from(args))
    print(json.dumps(result))
    return 0


def request_from(args) -> SampleRequest:
    return SampleRequest(prompts=list(args.prompt), out=Path(args.out),
                         subject_images=[Path(p) for p in args.subject_image or []], image=args.image,
                         switch_at=list(args.switch_at or []), recache_sink=bool(getattr(args, "recache_sink", False)),
                         negative_prompt=args.negative_prompt, frames=args.frames, steps=args.steps,
                         guidance=args.guidance, ref_guidance=args.ref_guidance, seed=args.seed, sampler=args.sampler,
                         shift=args.shift, grid=args.grid, merge_lora=args.merge_lora)
