"""`Conditioning`: everything a Wan forward is conditioned on besides the noisy latents and t.

One typed object instead of loose keyword tensors, so every caller (training step, sampler,
causal rollout, tests) builds the same thing and a missing input is named once.

Reference layout (the same from the dataset or the cache to the model): the reference axis R
comes right after the batch axis, one entry per subject image.
- ref_vae [B, R, 16, h, w]: each reference's VAE latent (a one-frame video, time axis dropped).
- ref_clip [B, R, K, clip_dim]: each reference's CLIP tokens.
The model turns them into tokens in (reference, row, column) order. The lengths count valid
TOKENS per sample (a sample with fewer references than R: `ref_counts * h * w` and
`ref_counts * K`); None = every token is valid.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Conditioning:
    """context [B, L <= text_len, text_dim] T5 tokens, zeroed past context_lens [B] if given.

    I2V: clip_fea [B, 257, clip_dim] first-frame CLIP tokens, y [B, 20, F, H, W] mask + first-frame
    latent. Reference paths: ref_vae / ref_clip (module docstring) with token lengths [B].
    """

    context: torch.Tensor
    context_lens: Optional[torch.Tensor] = None
    clip_fea: Optional[torch.Tensor] = None
    y: Optional[torch.Tensor] = None
    ref_clip: Optional[torch.Tensor] = None
    ref_clip_lens: Optional[torch.Tensor] = None
    ref_vae: Optional[torch.Tensor] = None
    ref_vae_lens: Optional[torch.Tensor] = None

    def __post_init__(self):
        for name, dims in (("ref_vae", 5), ("ref_clip", 4)):
            value = getattr(self, name)
            if value is not None and value.dim() != dims:
                layout = "[B, R, 16, h, w]" if name == "ref_vae" else "[B, R, K, clip_dim]"
                raise ValueError(f"`{name}` must be {layout} (reference axis after the batch axis), "
                                 f"got shape {tuple(value.shape)}")

    def replace(self, **changes) -> "Conditioning":
        return dataclasses.replace(self, **changes)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "Conditioning":
        """Every tensor moved to `device`; floating tensors (not the lengths) cast to `dtype`."""
        def move(t):
            if t is None:
                return None
            return t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)
        return Conditioning(**{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def select(self, index) -> "Conditioning":
        """The samples `index` (a slice or index tensor) of every batched tensor."""
        return Conditioning(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                               for f in dataclasses.fields(self)})
