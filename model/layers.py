"""Wan2.1 building blocks that carry no attention: norms, embeddings, RoPE, projections, head.

Numerics follow the official `wan/modules/model.py` (upstream.md §1.1): the parts it runs in
fp32 (timestep embedding, modulation, norms, RoPE) run here in `upcast(x)` precision, which is
fp32 for fp32/bf16/fp16 inputs and stays float64 when the whole module is evaluated in float64
(the tests' reference).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ROPE_THETA = 10000.0
ROPE_MAX_POSITIONS = 1024  # the official freqs table length per axis


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def sinusoidal_embedding_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Timestep embedding, cos first then sin (as Wan). positions: [N] -> [N, dim] float64."""
    if dim % 2:
        raise ValueError(f"sinusoidal embedding dim must be even, got {dim}")
    half = dim // 2
    pos = positions.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=pos.device).div(half))
    sinusoid = torch.outer(pos, freqs)
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


class WanRMSNorm(nn.Module):
    """RMSNorm with a weight only; normalises in upcast precision, returns x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., dim] -> [..., dim]."""
        y = upcast(x)
        y = y * torch.rsqrt(y.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in upcast precision (affine only where Wan has it: norm3)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = upcast(x)
        w = self.weight.to(y.dtype) if self.weight is not None else None
        b = self.bias.to(y.dtype) if self.bias is not None else None
        return F.layer_norm(y, self.normalized_shape, w, b, self.eps).type_as(x)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis (t, h, w): 22/21/21 for head dim 128, as the official split."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _axis_angles(num_pairs: int, positions: torch.Tensor) -> torch.Tensor:
    """positions [P] -> angles [P, num_pairs] (float64), theta^(-2i/d) with d = 2 * num_pairs."""
    d = 2 * num_pairs
    inv = torch.pow(ROPE_THETA, -torch.arange(0, d, 2, dtype=torch.float64, device=positions.device) / d)
    return torch.outer(positions.to(torch.float64), inv)


ROPE_CACHE_SIZE = 16  # grids x start frames x devices: a causal rollout uses one per block start


def rope_table(head_dim: int, grid: tuple[int, int, int], start_frame: int = 0,
               device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the 3D RoPE angles for an (F, H, W) token grid in f, h, w order.

    Positions start at 0 on every axis (at `start_frame` on the time axis, for causal blocks).
    Returns (cos, sin), each [F*H*W, head_dim/2] float64. Built once per (head_dim, grid,
    start_frame, device) and shared: the tensors are cached (an LRU of ROPE_CACHE_SIZE), so
    treat them as read-only. An entry a caller modified in place anyway (its version counter
    moved) is rebuilt, never handed out again.
    """
    key = (head_dim, tuple(grid), start_frame, torch.device(device if device is not None else "cpu"))
    hit = _ROPE_CACHE.pop(key, None)
    if hit is None or any(t._version != v for t, v in zip(hit[:2], hit[2])):
        cos, sin = _build_rope_table(*key)
        hit = (cos, sin, (cos._version, sin._version))
    _ROPE_CACHE[key] = hit  # most recently used last
    while len(_ROPE_CACHE) > ROPE_CACHE_SIZE:
        _ROPE_CACHE.pop(next(iter(_ROPE_CACHE)))
    return hit[0], hit[1]


_ROPE_CACHE: dict = {}  # key -> (cos, sin, their versions when built); insertion order = LRU order


def _build_rope_table(head_dim: int, grid: tuple[int, int, int], start_frame: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    f, h, w = grid
    if max(start_frame + f, h, w) > ROPE_MAX_POSITIONS:
        raise ValueError(f"grid {grid} (start frame {start_frame}) exceeds the "
                         f"{ROPE_MAX_POSITIONS} RoPE positions of the official table")
    pt, ph, pw = rope_axis_dims(head_dim)
    ar = lambda n, s=0: torch.arange(s, s + n, device=device)  # noqa: E731
    at = _axis_angles(pt, ar(f, start_frame))[:, None, None, :].expand(f, h, w, pt)
    ah = _axis_angles(ph, ar(h))[None, :, None, :].expand(f, h, w, ph)
    aw = _axis_angles(pw, ar(w))[None, None, :, :].expand(f, h, w, pw)
    angles = torch.cat([at, ah, aw], dim=-1).reshape(f * h * w, pt + ph + pw)
    return torch.cos(angles), torch.sin(angles)


def rope_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent (interleaved) pairs of x: [B, L, N, D] with cos/sin [L', D/2], L' <= L.

    Tokens past L' pass through unrotated (as upstream does for padding). Computed and returned
    in upcast precision, as the official float64-then-float32 rope returns fp32.
    """
    y = upcast(x)
    n_rot = cos.shape[0]
    c, s = cos.to(y.dtype)[None, :, None, :], sin.to(y.dtype)[None, :, None, :]
    pairs = y[:, :n_rot].unflatten(-1, (-1, 2))  # [B, L', N, D/2, 2]
    re, im = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([re * c - im * s, re * s + im * c], dim=-1).flatten(-2)
    if n_rot == y.shape[1]:
        return rotated
    return torch.cat([rotated, y[:, n_rot:]], dim=1)


class MLPProj(nn.Module):
    """Wan's `img_emb`: LayerNorm -> Linear -> GELU -> Linear -> LayerNorm on CLIP tokens
    [B, K, clip_dim]. The norms are plain affine `nn.LayerNorm`s, as upstream's MLPProj (keys
    proj.0 / proj.4), not `WanLayerNorm`."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(),
            nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[B, K, clip_dim] -> [B, K, dim]."""
        return self.proj(image_embeds)


class Head(nn.Module):
    """Output head: `head(norm(x) * (1 + scale) + shift)` modulated by the un-projected time
    embedding e; projects to prod(patch) * out_dim channels per token."""

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float):
        super().__init__()
        self.norm = WanLayerNorm(dim, eps)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x: [B, L, dim]; e: [B, Fe, dim] (Fe = 1, or F for per-frame timesteps).

        Returns [B, L, prod(patch) * out_dim].
        """
        mod = upcast(self.modulation)[:, None] + upcast(e)[:, :, None]  # [B, Fe, 2, dim]
        shift, scale = mod[:, :, 0], mod[:, :, 1]
        y = modulate(self.norm(x), shift, scale)
        return self.head(y.to(self.head.weight.dtype))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift in upcast precision, per frame.

    x: [B, L, C]; shift, scale: [B, Fe, C] with L divisible by Fe (Fe = 1 or the latent frames).
    """
    fe = shift.shape[1]
    y = upcast(x).unflatten(1, (fe, -1))  # [B, Fe, L/Fe, C]
    return (y * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2)


def gate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x * g per frame: x [B, L, C], g [B, Fe, C] -> [B, L, C] in upcast precision."""
    fe = g.shape[1]
    return (upcast(x).unflatten(1, (fe, -1)) * g[:, :, None]).flatten(1, 2)
