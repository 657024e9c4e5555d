"""Tiny random state dicts in the OFFICIAL Wan2.1 single-file layouts, for converter tests.

Each `*_layout` function lists (key, shape) exactly as the official modules name them for the
given hyperparameters (checked once against Wan2.1's own modules); `*_state_dict` fills the
layout with seeded random values at a scale that keeps activations O(1):
matrices and convs ~ N(0, 1/fan_in), lookup tables ~ N(0, 1), norm weights ~ 1 + N(0, 0.1^2),
biases and scalars ~ N(0, 0.1^2).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

Layout = list[tuple[str, tuple[int, ...]]]


def _fill(layout: Layout, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded random tensors for a layout (see the module docstring for the scales)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in layout:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "gamma" or ("norm" in key and leaf == "weight"):
            x = 1.0 + 0.1 * x
        elif leaf == "bias" or len(shape) <= 1:
            x = 0.1 * x
        elif "embedding" not in key or "patch" in key:  # lookup tables stay N(0, 1)
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            x = x / fan_in**0.5
        out[key] = x.to(dtype)
    return out


# ---------------------------------------------------------------- T5 (`wan/modules/t5.py`)

def wan_t5_layout(vocab: int = 64, dim: int = 32, dim_attn: int = 32, dim_ffn: int = 48,
                  num_heads: int = 4, num_layers: int = 2, num_buckets: int = 32) -> Layout:
    """Keys of `umt5_xxl(encoder_only=True)`-style `T5Encoder` (per-layer relative bias)."""
    layout: Layout = [("token_embedding.weight", (vocab, dim))]
    for i in range(num_layers):
        b = f"blocks.{i}."
        layout += [
            (b + "norm1.weight", (dim,)),
            (b + "attn.q.weight", (dim_attn, dim)),
            (b + "attn.k.weight", (dim_attn, dim)),
            (b + "attn.v.weight", (dim_attn, dim)),
            (b + "attn.o.weight", (dim, dim_attn)),
            (b + "norm2.weight", (dim,)),
            (b + "ffn.gate.0.weight", (dim_ffn, dim)),
            (b + "ffn.fc1.weight", (dim_ffn, dim)),
            (b + "ffn.fc2.weight", (dim, dim_ffn)),
            (b + "pos_embedding.embedding.weight", (num_buckets, num_heads)),
        ]
    return layout + [("norm.weight", (dim,))]


def wan_t5_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, **layout_kw) -> dict:
    """Random official-layout T5 encoder weights; `layout_kw` as in `wan_t5_layout`."""
    return _fill(wan_t5_layout(**layout_kw), seed, dtype)


# ------------------------------------------------------------ CLIP (`wan/modules/clip.py`)

def _clip_visual_layout(image_size: int, patch_size: int, dim: int, mlp_ratio: int,
                        num_layers: int, embed_dim: int) -> Layout:
    """`visual.*` of `XLMRobertaCLIP` (pool 'token', pre-norm: bias-free patch conv)."""
    tokens = 1 + (image_size // patch_size) ** 2
    mlp = dim * mlp_ratio
    layout: Layout = [
        ("visual.cls_embedding", (1, 1, dim)),
        ("visual.pos_embedding", (1, tokens, dim)),
        ("visual.head", (dim, embed_dim)),  # a bare Parameter: listed before the submodules
        ("visual.patch_embedding.weight", (dim, 3, patch_size, patch_size)),
        ("visual.pre_norm.weight", (dim,)),
        ("visual.pre_norm.bias", (dim,)),
    ]
    for i in range(num_layers):
        b = f"visual.transformer.{i}."
        layout += [
            (b + "norm1.weight", (dim,)), (b + "norm1.bias", (dim,)),
            (b + "attn.to_qkv.weight", (3 * dim, dim)), (b + "attn.to_qkv.bias", (3 * dim,)),
            (b + "attn.proj.weight", (dim, dim)), (b + "attn.proj.bias", (dim,)),
            (b + "norm2.weight", (dim,)), (b + "norm2.bias", (dim,)),
            (b + "mlp.0.weight", (mlp, dim)), (b + "mlp.0.bias", (mlp,)),
            (b + "mlp.2.weight", (dim, mlp)), (b + "mlp.2.bias", (dim,)),
        ]
    return layout + [
        ("visual.post_norm.weight", (dim,)),
        ("visual.post_norm.bias", (dim,)),
    ]


def _clip_textual_layout(vocab: int, max_text_len: int, dim: int, num_layers: int,
                         embed_dim: int) -> Layout:
    """`textual.*` of `XLMRobertaCLIP` (XLM-R with a mean-pool head), type_size 1."""
    mid = (dim + embed_dim) // 2
    layout: Layout = [
        ("textual.token_embedding.weight", (vocab, dim)),
        ("textual.type_embedding.weight", (1, dim)),
        ("textual.pos_embedding.weight", (max_text_len, dim)),
    ]
    for i in range(num_layers):
        b = f"textual.blocks.{i}."
        for proj in "qkvo":
            layout += [(b + f"attn.{proj}.weight", (dim, dim)), (b + f"attn.{proj}.bias", (dim,))]
        layout += [
            (b + "norm1.weight", (dim,)), (b + "norm1.bias", (dim,)),
            (b + "ffn.0.weight", (4 * dim, dim)), (b + "ffn.0.bias", (4 * dim,)),
            (b + "ffn.2.weight", (dim, 4 * dim)), (b + "ffn.2.bias", (dim,)),
            (b + "norm2.weight", (dim,)), (b + "norm2.bias", (dim,)),
        ]
    return layout + [
        ("textual.norm.weight", (dim,)),
        ("textual.norm.bias", (dim,)),
        ("textual.head.0.weight", (mid, dim)),
        ("textual.head.2.weight", (embed_dim, mid)),
    ]


def wan_clip_layout(image_size: int = 28, patch_size: int = 14, dim: int = 32, mlp_ratio: int = 4,
                    num_layers: int = 3, embed_dim: int = 16, text_vocab: int = 50,
                    max_text_len: int = 12, text_dim: int = 16, text_layers: int = 1) -> Layout:
    """Keys of `XLMRobertaCLIP`: `visual.*`, `textual.*`, `log_scale` (heads unused here)."""
    return (
        [("log_scale", ())]
        + _clip_visual_layout(image_size, patch_size, dim, mlp_ratio, num_layers, embed_dim)
        + _clip_textual_layout(text_vocab, max_text_len, text_dim, text_layers, embed_dim)
    )


def wan_clip_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, **layout_kw) -> dict:
    """Random official-layout CLIP weights; `layout_kw` as in `wan_clip_layout`."""
    return _fill(wan_clip_layout(**layout_kw), seed, dtype)


# -------------------------------------------------------------- VAE (`wan/modules/vae.py`)

def _residual(prefix: str, in_dim: int, out_dim: int) -> Layout:
    """`ResidualBlock`: RMS_norm, SiLU, CausalConv3d 3^3, RMS_norm, SiLU, Dropout, conv."""
    layout: Layout = [
        (prefix + "residual.0.gamma", (in_dim, 1, 1, 1)),
        (prefix + "residual.2.weight", (out_dim, in_dim, 3, 3, 3)),
        (prefix + "residual.2.bias", (out_dim,)),
        (prefix + "residual.3.gamma", (out_dim, 1, 1, 1)),
        (prefix + "residual.6.weight", (out_dim, out_dim, 3, 3, 3)),
        (prefix + "residual.6.bias", (out_dim,)),
    ]
    if in_dim != out_dim:
        layout += [(prefix + "shortcut.weight", (out_dim, in_dim, 1, 1, 1)),
                   (prefix + "shortcut.bias", (out_dim,))]
    return layout


def _attention(prefix: str, dim: int) -> Layout:
    """Single-head spatial `AttentionBlock` (RMS_norm over images, 1x1 convs)."""
    return [
        (prefix + "norm.gamma", (dim, 1, 1)),
        (prefix + "to_qkv.weight", (3 * dim, dim, 1, 1)), (prefix + "to_qkv.bias", (3 * dim,)),
        (prefix + "proj.weight", (dim, dim, 1, 1)), (prefix + "proj.bias", (dim,)),
    ]


def _resample(prefix: str, dim: int, mode: str) -> Layout:
    """`Resample` in mode down/upsample 2d/3d (3d adds a causal `time_conv`)."""
    out_dim = dim // 2 if mode.startswith("up") else dim
    layout: Layout = [(prefix + "resample.1.weight", (out_dim, dim, 3, 3)),
                      (prefix + "resample.1.bias", (out_dim,))]
    if mode == "upsample3d":
        layout += [(prefix + "time_conv.weight", (2 * dim, dim, 3, 1, 1)),
                   (prefix + "time_conv.bias", (2 * dim,))]
    elif mode == "downsample3d":
        layout += [(prefix + "time_conv.weight", (dim, dim, 3, 1, 1)),
                   (prefix + "time_conv.bias", (dim,))]
    return layout


def _middle(prefix: str, dim: int) -> Layout:
    """`middle`: ResidualBlock, AttentionBlock, ResidualBlock at one width."""
    return (_residual(prefix + "0.", dim, dim) + _attention(prefix + "1.", dim)
            + _residual(prefix + "2.", dim, dim))


def _head(prefix: str, dim: int, out_dim: int) -> Layout:
    """`head`: RMS_norm, SiLU, CausalConv3d 3^3 to `out_dim` channels."""
    return [(prefix + "0.gamma", (dim, 1, 1, 1)),
            (prefix + "2.weight", (out_dim, dim, 3, 3, 3)), (prefix + "2.bias", (out_dim,))]


def _stages(prefix: str, dims: Sequence[int], num_blocks: int, attn_scales: Sequence[float],
            temporal: Sequence[bool], up: bool) -> Iterator[tuple[str, tuple[int, ...]]]:
    """The encoder's `downsamples` / decoder's `upsamples` Sequential, numbered flat."""
    idx, scale = 0, 1.0 / 2 ** (len(dims) - 3) if up else 1.0
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        if up and i in (1, 2, 3):
            in_dim //= 2  # the previous upsample halved the channels (as Wan hard-codes it)
        for _ in range(num_blocks):
            yield from _residual(f"{prefix}{idx}.", in_dim, out_dim)
            idx += 1
            if scale in attn_scales:
                yield from _attention(f"{prefix}{idx}.", out_dim)
                idx += 1
            in_dim = out_dim
        if i != len(dims) - 2:
            kind = ("upsample" if up else "downsample") + ("3d" if temporal[i] else "2d")
            yield from _resample(f"{prefix}{idx}.", out_dim, kind)
            idx += 1
            scale = scale * 2.0 if up else scale / 2.0


def wan_vae_layout(dim: int = 8, z_dim: int = 16, dim_mult: Sequence[int] = (1, 2, 4, 4),
                   num_res_blocks: int = 2, attn_scales: Sequence[float] = (),
                   temperal_downsample: Sequence[bool] = (False, True, True)) -> Layout:
    """Keys of `WanVAE_(dim, z_dim, ...)`: `encoder.*`, `conv1.*`, `conv2.*`, `decoder.*`."""
    enc_dims = [dim * u for u in [1, *dim_mult]]
    dec_dims = [dim * u for u in [dim_mult[-1], *dim_mult[::-1]]]
    top = enc_dims[-1]
    return [
        ("encoder.conv1.weight", (enc_dims[0], 3, 3, 3, 3)), ("encoder.conv1.bias", (enc_dims[0],)),
        *_stages("encoder.downsamples.", enc_dims, num_res_blocks, attn_scales,
                 temperal_downsample, up=False),
        *_middle("encoder.middle.", top),
        *_head("encoder.head.", top, 2 * z_dim),
        ("conv1.weight", (2 * z_dim, 2 * z_dim, 1, 1, 1)), ("conv1.bias", (2 * z_dim,)),
        ("conv2.weight", (z_dim, z_dim, 1, 1, 1)), ("conv2.bias", (z_dim,)),
        ("decoder.conv1.weight", (dec_dims[0], z_dim, 3, 3, 3)), ("decoder.conv1.bias", (dec_dims[0],)),
        *_middle("decoder.middle.", dec_dims[0]),
        *_stages("decoder.upsamples.", dec_dims, num_res_blocks + 1, attn_scales,
                 temperal_downsample[::-1], up=True),
        *_head("decoder.head.", dec_dims[-1], 3),
    ]


def wan_vae_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, **layout_kw) -> dict:
    """Random official-layout VAE weights; `layout_kw` as in `wan_vae_layout`."""
    return _fill(wan_vae_layout(**layout_kw), seed, dtype)
