"""Wan2.1 DiT (T2V, I2V) with the subject-reference cross-attention paths.

Module and parameter names ARE the official checkpoint keys (upstream.md §1.1), so official,
Self-Forcing and LongLive weights load unchanged. Reference adapters add `clip_proj`,
`vae_proj` and per-block `k_vae/v_vae/norm_k_vae`, `k_fused/v_fused/norm_k_fused` (and
`k_img/v_img/norm_k_img` on a T2V base), each zero-initialised on the value side so an
untrained adapter leaves the base output unchanged.

Shapes follow the glossary in model/config.py; the conditioning inputs (text, I2V, references
and their layout) are one `model.conditioning.Conditioning`. The attention backend is resolved
once, when the model is built or `set_attn_backend` is called (`kernels.attention.get_backend`),
and kept on each attention module.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from kernels.attention import AttentionBackend, KVPath, get_backend
from kernels.qk_norm_rope import qk_norm_rope
from model.conditioning import Conditioning
from model.config import VAE_Z_DIM, WanConfig
from model.layers import (Head, MLPProj, WanLayerNorm, WanRMSNorm, gate, modulate, rope_apply,
                          rope_table, sinusoidal_embedding_1d, upcast)
from model.sequence_parallel import ShardedSelfAttention

# Parameters created by the reference adapters; the checkpoint loader lets these be missing.
ADAPTER_MODEL_PREFIXES = ("clip_proj.", "vae_proj.")
ADAPTER_BLOCK_MODULES = ("k_vae", "v_vae", "norm_k_vae", "k_fused", "v_fused", "norm_k_fused")
T2V_CLIP_PATH_MODULES = ("k_img", "v_img", "norm_k_img")  # new layers on a T2V base
ZERO_INIT_MODULES = ("v_img", "v_vae", "v_fused")          # value side of every new path


@dataclass
class CrossContext:
    """Embedded cross-attention inputs of one forward (all already projected to `dim`).

    text: [B, text_len, dim]. img: [B, K_img, dim] (I2V CLIP tokens or the CLIP reference) with
    optional img_lens [B]. vae: [B, K_vae, dim] with optional vae_lens [B]. fused: each sample's
    valid img tokens then its valid vae tokens, [B, K_fused, dim], with fused_lens [B]. Paths
    the model does not have are None.
    """

    text: torch.Tensor
    img: Optional[torch.Tensor] = None
    img_lens: Optional[torch.Tensor] = None
    vae: Optional[torch.Tensor] = None
    vae_lens: Optional[torch.Tensor] = None
    fused: Optional[torch.Tensor] = None
    fused_lens: Optional[torch.Tensor] = None


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    return x.unflatten(-1, (num_heads, -1))  # [B, L, N, D]


class WanSelfAttention(nn.Module):
    """Full self-attention with qk RMSNorm over the full dim and 3D RoPE."""

    def __init__(self, dim: int, num_heads: int, backend: AttentionBackend, qk_norm: bool = True,
                 eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        self.fused_norm_rope = False  # set by WanModel from its config
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()

    def qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """x: [B, L, dim] -> roped q, k and v, each [B, L, N, D]."""
        x = x.to(self.q.weight.dtype)
        if self.fused_norm_rope and isinstance(self.norm_q, WanRMSNorm):
            cos, sin = (t.to(torch.promote_types(x.dtype, torch.float32)) for t in rope)
            q = qk_norm_rope(self.q(x), self.norm_q.weight, cos, sin, self.num_heads, self.norm_q.eps)
            k = qk_norm_rope(self.k(x), self.norm_k.weight, cos, sin, self.num_heads, self.norm_k.eps)
        else:
            q = rope_apply(_heads(self.norm_q(self.q(x)), self.num_heads), *rope)
            k = rope_apply(_heads(self.norm_k(self.k(x)), self.num_heads), *rope)
        return q, k, _heads(self.v(x), self.num_heads)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                layout=None, kv_cache=None) -> torch.Tensor:
        """x: [B, L, dim]; rope: (cos, sin) [L, D/2] -> [B, L, dim].

        layout: a BlockCausalLayout (block-causal training), or under sequence parallelism a
        model.sequence_parallel.ShardedSelfAttention (x is then this rank's shard).
        kv_cache: a model.kv_cache.KVCache;
        the block's roped k, v are written to it and q attends to what it then holds, in place
        (in lookahead mode, to what it would hold, without writing).
        """
        q, k, v = self.qkv(x, rope)
        if kv_cache is not None:
            view = kv_cache.attend(k, v)
            out = self.backend.kv_cache_attention(q, view.k, view.v, view.sink_len, view.window_start,
                                                  view.window_len)
        elif isinstance(layout, ShardedSelfAttention):
            out = layout.attend(self.backend, q, k, v)
        elif layout is not None:
            out = self.backend.block_causal_attention(q, k, v, layout)
        else:
            out = self.backend.attention(q, k, v)  # [B, L, N, D]
        return self.o(out.flatten(2).to(self.o.weight.dtype))


class WanCrossAttention(nn.Module):
    """Ungated cross-attention over text plus the optional image / reference paths.

    out = o( sum over paths s of softmax(q k_s^T / sqrt(D)) v_s ), each path its own softmax.
    """

    def __init__(self, dim: int, num_heads: int, backend: AttentionBackend, qk_norm: bool, eps: float,
                 img: bool = False, vae: bool = False, fused: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        norm = (lambda: WanRMSNorm(dim, eps)) if qk_norm else nn.Identity
        self.norm_q, self.norm_k = norm(), norm()
        self.paths = [name for name, on in (("img", img), ("vae", vae), ("fused", fused)) if on]
        for name in self.paths:
            self.add_module(f"k_{name}", nn.Linear(dim, dim))
            self.add_module(f"v_{name}", nn.Linear(dim, dim))
            self.add_module(f"norm_k_{name}", norm())

    def path_kv(self, name: str, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one path: ctx [B, K, dim] -> k, v [B, K, N, D]. 'text' = k/v."""
        prefix = "" if name == "text" else f"_{name}"
        k = getattr(self, f"norm_k{prefix}")(getattr(self, f"k{prefix}")(ctx))
        return _heads(k, self.num_heads), _heads(getattr(self, f"v{prefix}")(ctx), self.num_heads)

    def kv_paths(self, context: CrossContext) -> list[KVPath]:
        """Every path's keys/values. A causal model caches this list across blocks of frames."""
        dtype = self.q.weight.dtype
        paths = [KVPath(*self.path_kv("text", context.text.to(dtype)))]
        for name in self.paths:
            ctx = getattr(context, name)
            if ctx is None:
                raise ValueError(f"cross-attention has a {name!r} path but no {name} context was given")
            paths.append(KVPath(*self.path_kv(name, ctx.to(dtype)), getattr(context, f"{name}_lens", None)))
        return paths

    def forward(self, x: torch.Tensor, context: CrossContext,
                kv: Optional[list[KVPath]] = None) -> torch.Tensor:
        """x: [B, L, dim] -> [B, L, dim]; `kv` reuses precomputed `kv_paths(context)`."""
        x = x.to(self.q.weight.dtype)
        q = _heads(self.norm_q(self.q(x)), self.num_heads)
        paths = kv if kv is not None else self.kv_paths(context)
        out = self.backend.multi_path_attention(q, paths)
        return self.o(out.flatten(2).to(self.o.weight.dtype))


class WanAttentionBlock(nn.Module):
    """Self-attention, cross-attention, FFN; adaLN modulation (shift, scale, gate) x 2 in fp32."""

    def __init__(self, cfg: WanConfig, backend: AttentionBackend):
        super().__init__()
        dim, refs = cfg.dim, cfg.reference_paths
        self.norm1 = WanLayerNorm(dim, cfg.eps)
        self.self_attn = WanSelfAttention(dim, cfg.num_heads, backend, cfg.qk_norm, cfg.eps)
        self.norm3 = WanLayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(dim, cfg.num_heads, backend, cfg.qk_norm, cfg.eps,
                                            img=cfg.has_img_path, vae=refs.vae, fused=refs.fused)
        self.norm2 = WanLayerNorm(dim, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, rope, context: CrossContext,
                cross_kv: Optional[list[KVPath]] = None, layout=None, kv_cache=None) -> torch.Tensor:
        """x: [B, L, dim]; e0: [B, Fe, 6, dim] projected time embedding -> [B, L, dim]."""
        m = upcast(self.modulation)[:, None] + upcast(e0)  # [B, Fe, 6, dim]
        shift1, scale1, gate1, shift2, scale2, gate2 = m.unbind(2)
        y = self.self_attn(modulate(self.norm1(x), shift1, scale1), rope, layout, kv_cache)
        x = upcast(x) + gate(y, gate1)
        x = x + self.cross_attn(self.norm3(x), context, cross_kv)
        x = x + gate(self.ffn(modulate(self.norm2(x), shift2, scale2).to(self.ffn[0].weight.dtype)), gate2)
        return x


class WanModel(nn.Module):
    """The Wan2.1 diffusion transformer.

    forward(x [B, C, F, H, W], t [B] or [B, F], cond: Conditioning) returns the flow prediction
    [B, out_dim, F, H, W].
    """

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        backend = get_backend(cfg.attn_backend)  # resolved once: name > $WANSPEED_ATTN_BACKEND > sdpa
        self.blocks = nn.ModuleList(WanAttentionBlock(cfg, backend) for _ in range(cfg.num_layers))
        self.head = Head(dim, cfg.out_dim, cfg.patch_size, cfg.eps)
        if cfg.model_type == "i2v":
            self.img_emb = MLPProj(cfg.clip_dim, dim)
        if cfg.reference_paths.clip:
            self.clip_proj = nn.Linear(cfg.clip_dim, dim)
        if cfg.reference_paths.vae:
            self.vae_proj = nn.Linear(VAE_Z_DIM, dim)
        self.gradient_checkpointing = False
        """Recompute each block in the backward pass while training (non-reentrant)."""
        self.sequence_parallel = None
        """A model.sequence_parallel.SequenceParallel (set by apply_sequence_parallel): blocks and
        head run on this rank's token shard. None = the whole sequence here (SP = 1)."""
        for blk in self.blocks:
            blk.self_attn.fused_norm_rope = cfg.fused_qk_norm_rope
        if not hasattr(self.patch_embedding.weight, "ds_id"):  # under ZeRO-3 Init: filled after partitioning
            self.init_weights()

    # ----------------------------------------------------------------------------------- setup
    def set_attn_backend(self, name: Optional[str]) -> None:
        """Route every attention of the model to the named backend (None = env var or sdpa),
        resolved and checked usable here, once."""
        backend = get_backend(name)
        for mod in self.modules():
            if isinstance(mod, (WanSelfAttention, WanCrossAttention)):
                mod.backend = backend

    def init_weights(self, only: Optional[set[str]] = None) -> None:
        """Official init (xavier Linear/Conv, normal(0.02) embeddings, zero head) plus zero
        value projections on new reference paths. `only`: names of modules to (re)initialise."""
        for name, mod in self.named_modules():
            if only is not None and name not in only:
                continue
            init_module(name, mod, self.config)

    # --------------------------------------------------------------------------------- forward
    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t: [B] or [B, F] timesteps in [0, 1000] -> e [B, Fe, dim], e0 [B, Fe, 6, dim], fp32."""
        tt = t[:, None] if t.dim() == 1 else t
        dtype = torch.promote_types(self.time_embedding[0].weight.dtype, torch.float32)
        sin = sinusoidal_embedding_1d(self.config.freq_dim, tt.flatten()).to(dtype)
        e = _run_upcast(self.time_embedding, sin)
        e0 = _run_upcast(self.time_projection, e).unflatten(1, (6, self.config.dim))
        return e.unflatten(0, tt.shape), e0.unflatten(0, tt.shape)

    def embed_context(self, cond: Conditioning) -> CrossContext:
        """Embed the cross-attention inputs once per forward.

        The text context is zeroed past `context_lens` if given, then zero-padded to text_len,
        as upstream. References (layout in model/conditioning.py) become one token per latent
        position of each reference image (VAE) and per CLIP token, in reference order.
        """
        cfg = self.config
        text = _pad_text(cond.context, cond.context_lens, cfg.text_len)
        out = CrossContext(text=self.text_embedding(text.to(self.text_embedding[0].weight.dtype)))
        if cfg.model_type == "i2v":
            out.img = self.img_emb(require(cond.clip_fea, "clip_fea", "an i2v model"))
        if cfg.reference_paths.clip:
            clip = require(cond.ref_clip, "ref_clip", "the CLIP reference path").flatten(1, 2)  # [B, R*K, C]
            out.img, out.img_lens = self.clip_proj(clip.to(self.clip_proj.weight.dtype)), cond.ref_clip_lens
        if cfg.reference_paths.vae:
            lat = require(cond.ref_vae, "ref_vae", "the VAE reference path")
            tokens = lat.permute(0, 1, 3, 4, 2).flatten(1, 3)  # [B, R*h*w, 16]
            out.vae, out.vae_lens = self.vae_proj(tokens.to(self.vae_proj.weight.dtype)), cond.ref_vae_lens
        if cfg.reference_paths.fused:
            out.fused, out.fused_lens = _pack(out.img, out.img_lens, out.vae, out.vae_lens)
        return out

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """x: [B, in_dim, F, H, W] -> tokens [B, L, dim] in (f, h, w) order, grid (F, H/2, W/2)."""
        x = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))  # [B, dim, F', H', W']
        return x.flatten(2).transpose(1, 2), tuple(x.shape[2:])

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """x: [B, L, prod(patch) * out_dim] -> [B, out_dim, F, H, W] (upstream's einsum order)."""
        (pt, ph, pw), c = self.config.patch_size, self.config.out_dim
        f, h, w = grid
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, c)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(x.shape[0], c, f * pt, h * ph, w * pw)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x: [B, C, F, H, W] noisy latents; t: [B] or [B, F]; cond: text (+ I2V, references).
        Returns [B, out_dim, F, H, W]."""
        if self.config.model_type == "i2v":
            x = torch.cat([x, require(cond.y, "y", "an i2v model").to(x.dtype)], dim=1)
        tokens, grid = self.patchify(x)
        if t.dim() == 2 and t.shape[1] != grid[0]:
            raise ValueError(f"per-frame timesteps t has {t.shape[1]} frames, latents have {grid[0]}")
        e, e0 = self.embed_time(t)
        ctx = self.embed_context(cond)
        rope = rope_table(self.config.head_dim, grid, device=tokens.device)
        return self.unpatchify(self.blocks_and_head(tokens, e, e0, rope, ctx), grid)

    def blocks_and_head(self, tokens: torch.Tensor, e: torch.Tensor, e0: torch.Tensor, rope, ctx: CrossContext,
                        layout=None) -> torch.Tensor:
        """tokens [B, L, dim] -> head output [B, L, prod(patch) * out_dim]; sequence-parallel
        (sharded, gathered back) when `sequence_parallel` is set."""
        if self.sequence_parallel is not None:
            return self.sequence_parallel.run(self, tokens, e, e0, rope, ctx, layout)
        return self.head(self.run_blocks(tokens, e0, rope, ctx, layout=layout), e)

    def run_blocks(self, tokens: torch.Tensor, e0: torch.Tensor, rope, ctx: CrossContext, layout=None) -> torch.Tensor:
        """All transformer blocks over the full sequence, recomputed in the backward pass when
        `gradient_checkpointing` is on while training. tokens: [B, L, dim] -> [B, L, dim]."""
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                tokens = checkpoint(block, tokens, e0, rope, ctx, layout=layout, use_reentrant=False)
            else:
                tokens = block(tokens, e0, rope, ctx, layout=layout)
        return tokens


# --------------------------------------------------------------------------------- helpers
def _run_upcast(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run a small MLP in fp32 (or float64) whatever its parameter dtype, as upstream's
    `amp.autocast(float32)` region around the time embedding does."""
    for layer in seq:
        if isinstance(layer, nn.Linear):
            x = nn.functional.linear(x, upcast(layer.weight).to(x.dtype), upcast(layer.bias).to(x.dtype))
        else:
            x = layer(x)
    return x


def _pack(a: torch.Tensor, a_lens: Optional[torch.Tensor], b: torch.Tensor, b_lens: Optional[torch.Tensor]):
    """Per sample, the valid tokens of a then of b, zero-padded: ([B, K, C], lens [B] or None)."""
    if a_lens is None and b_lens is None:
        return torch.cat([a, b], dim=1), None
    la = a_lens if a_lens is not None else torch.full((a.shape[0],), a.shape[1], device=a.device)
    lb = b_lens if b_lens is not None else torch.full((b.shape[0],), b.shape[1], device=b.device)
    lens = la + lb
    out = a.new_zeros(a.shape[0], int(lens.max()), a.shape[2])
    for i in range(a.shape[0]):
        na, nb = int(la[i]), int(lb[i])
        out[i, :na], out[i, na:na + nb] = a[i, :na], b[i, :nb]
    return out, lens


def require(value, name: str, what: str):
    """`value`, or a ValueError naming the missing input and what needs it."""
    if value is None:
        raise ValueError(f"`{name}` is required by {what}")
    return value


def _pad_text(context: torch.Tensor, lens: Optional[torch.Tensor], text_len: int) -> torch.Tensor:
    """[B, L, C] -> [B, text_len, C]: zero past `lens`, then zero-pad (upstream pads, no mask)."""
    b, length, _ = context.shape
    if length > text_len:
        raise ValueError(f"text context has {length} tokens, more than text_len={text_len}")
    if lens is not None:
        keep = torch.arange(length, device=context.device)[None, :] < lens.to(context.device)[:, None]
        context = context * keep[..., None].to(context.dtype)
    return nn.functional.pad(context, (0, 0, 0, text_len - length))


def init_module_seeded(name: str, mod: nn.Module, cfg: WanConfig, seed: int) -> None:
    """`init_module` with random draws that depend only on (seed, module name): a layer gets the
    same values whatever order modules are initialised in (ZeRO-3 gathers vs. a plain load)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63))
        init_module(name, mod, cfg)


def init_module(name: str, mod: nn.Module, cfg: WanConfig) -> None:
    """Initialise one module as the official `init_weights`, and zero new paths' values."""
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(mod, nn.Linear):
        zero = leaf in ZERO_INIT_MODULES and not (leaf == "v_img" and cfg.model_type == "i2v")
        if zero:
            nn.init.zeros_(mod.weight)
        elif name.startswith(("text_embedding", "time_embedding")):
            nn.init.normal_(mod.weight, std=0.02)
        elif name == "head.head":
            nn.init.zeros_(mod.weight)
        else:
            nn.init.xavier_uniform_(mod.weight)
        if mod.bias is not None:
            nn.init.zeros_(mod.bias)
    elif isinstance(mod, nn.Conv3d):
        nn.init.xavier_uniform_(mod.weight.flatten(1))
        if mod.bias is not None:
            nn.init.zeros_(mod.bias)
    elif isinstance(mod, (nn.LayerNorm, WanRMSNorm)) and getattr(mod, "weight", None) is not None:
        nn.init.ones_(mod.weight)
        if getattr(mod, "bias", None) is not None:
            nn.init.zeros_(mod.bias)
    elif isinstance(mod, (WanAttentionBlock, Head)):
        nn.init.normal_(mod.modulation, std=1.0 / math.sqrt(cfg.dim))
