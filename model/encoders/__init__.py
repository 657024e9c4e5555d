"""Frozen encoders of Wan2.1, wrapped from transformers / diffusers, with converters from the
official single-file checkpoints: umT5-XXL text encoder (`t5`), CLIP ViT-H/14 image encoder
(`clip`), video VAE (`vae`).

Names are resolved lazily, so `import model.encoders.t5` does not import diffusers.
"""
import importlib

_EXPORTS = {
    "T5_DIM": "t5",
    "T5_TOKENS": "t5",
    "WanT5Encoder": "t5",
    "convert_wan_t5_state_dict": "t5",
    "CLIP_DIM": "clip",
    "CLIP_TOKENS": "clip",
    "WanCLIPEncoder": "clip",
    "convert_wan_clip_visual_state_dict": "clip",
    "VAE_Z_DIM": "vae",
    "WanVAE": "vae",
    "convert_wan_vae_state_dict": "vae",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
