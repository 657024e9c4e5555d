"""The three frozen encoders of a run (T5, CLIP, VAE), loaded from paths in the run config, plus
an identity string of their weights for the encoder-output cache.

A path ending in `.pth` / `.pt` is an official Wan2.1 single file (full-size architecture); a
directory is a transformers / diffusers directory (any size: the tiny demo encoders are these).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from model.typed_config import ConfigError

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_FINGERPRINT_BYTES = 1 << 20  # hash the first and last MiB of each weight file


@dataclass
class EncoderPaths:
    """Where the frozen encoders come from (the run config's `encoders` section)."""

    t5: str
    """`models_t5_umt5-xxl-enc-bf16.pth`, or a transformers UMT5 directory."""
    t5_tokenizer: Optional[str] = None
    """Tokenizer directory (e.g. Wan2.1's `google/umt5-xxl`); default: the T5 directory."""
    clip: Optional[str] = None
    """`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` or a CLIP vision directory."""
    vae: str = ""
    """`Wan2.1_VAE.pth` or a diffusers AutoencoderKLWan directory."""
    dtype: str = "auto"
    """'auto' (bf16 on GPU, fp32 on CPU), 'bf16', 'fp16' or 'fp32'."""

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}", key="dtype")
        if not self.vae:
            raise ConfigError("is required", key="vae")


def _is_official(path: str) -> bool:
    return Path(path).suffix in (".pth", ".pt")


def _fingerprint(path: str) -> str:
    """Cheap content identity of a file or directory of weights (size + head/tail bytes)."""
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(_FINGERPRINT_BYTES))
            if size > 2 * _FINGERPRINT_BYTES:
                fh.seek(-_FINGERPRINT_BYTES, os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:16]


@dataclass
class FrozenEncoders:
    t5: object
    clip: Optional[object]
    vae: object
    identity: str
    """Changes whenever any encoder's weights change (keys of the encoder-output cache)."""


def load_frozen_encoders(paths: EncoderPaths, device: torch.device | str = "cpu") -> FrozenEncoders:
    """T5, CLIP (if configured) and VAE: frozen, eval, on `device`."""
    from model.encoders.clip import WanCLIPEncoder  # noqa: PLC0415  (heavy imports on use)
    from model.encoders.t5 import WanT5Encoder  # noqa: PLC0415
    from model.encoders.vae import WanVAE  # noqa: PLC0415

    device = torch.device(device)
    dtype = DTYPES[paths.dtype] if paths.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tok = paths.t5_tokenizer or paths.t5
    t5 = (WanT5Encoder.from_official(paths.t5, tok, dtype=dtype, device=device) if _is_official(paths.t5)
          else WanT5Encoder.from_hf_dir(paths.t5, tok, dtype=dtype, device=device))
    clip = None
    if paths.clip:
        clip = (WanCLIPEncoder.from_official(paths.clip, dtype=dtype, device=device) if _is_official(paths.clip)
                else WanCLIPEncoder.from_hf_dir(paths.clip, dtype=dtype, device=device, drop_last_block=False))
    vae = (WanVAE.from_official(paths.vae, dtype=dtype, device=device) if _is_official(paths.vae)
           else WanVAE.from_hf_dir(paths.vae, dtype=dtype, device=device))
    parts = [_fingerprint(p) for p in (paths.t5, tok, paths.clip, paths.vae) if p]
    identity = hashlib.sha256(("|".join(parts) + f"|{dtype}").encode()).hexdigest()[:16]
    return FrozenEncoders(t5=t5, clip=clip, vae=vae, identity=identity)


def write_tiny_encoders(out_dir: str | Path, text_dim: int = 48, clip_dim: int = 40, seed: int = 0) -> EncoderPaths:
    """Random tiny T5 (+ a sentencepiece tokenizer trained here), CLIP and VAE directories, in the
    same transformers / diffusers formats as real ones: the CPU demo's encoders."""
    import sentencepiece as spm  # noqa: PLC0415
    from diffusers import AutoencoderKLWan  # noqa: PLC0415
    from transformers import CLIPVisionModel, T5Tokenizer, UMT5EncoderModel  # noqa: PLC0415

    from model.encoders.clip import tiny_clip_config  # noqa: PLC0415
    from model.encoders.t5 import tiny_umt5_config  # noqa: PLC0415
    from model.encoders.vae import tiny_vae_config  # noqa: PLC0415

    out = Path(out_dir)
    torch.manual_seed(seed)
    words = ("a red blue green yellow striped checkered ellipse square circle moving left right up down "
             "over under the on gradient background subject object slowly quickly bright dark").split()
    sentences = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8)) for i in range(64)]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=proto, vocab_size=48,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    (out / "t5").mkdir(parents=True, exist_ok=True)
    (out / "t5" / "spiece.model").write_bytes(proto.getvalue())
    tokenizer = T5Tokenizer.from_pretrained(str(out / "t5"), extra_ids=0)
    tokenizer.save_pretrained(str(out / "t5"))
    UMT5EncoderModel(tiny_umt5_config(vocab_size=len(tokenizer), d_model=text_dim)).save_pretrained(str(out / "t5"))
    clip_cfg = tiny_clip_config(hidden_size=clip_dim)
    CLIPVisionModel(clip_cfg).save_pretrained(str(out / "clip"))
    AutoencoderKLWan(**tiny_vae_config()).save_pretrained(str(out / "vae"))
    return EncoderPaths(t5=str(out / "t5"), clip=str(out / "clip"), vae=str(out / "vae"), dtype="fp32")
