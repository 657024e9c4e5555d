"""Block-causal (autoregressive) Wan for Self-Forcing / LongLive: same parameters and state-dict
keys as `WanModel`, so Wan, Self-Forcing and LongLive checkpoints load into it unchanged.

Frames are grouped into blocks of `num_frame_per_block` (frame 0 alone first with
`independent_first_frame`, the I2V recipe). A query frame attends to every key frame up to the
end of its own block; with a local window of `local_attn_size` frames it sees only the last
`local_attn_size - sink_size` frames up to its block end, plus the first `sink_size` frames
(LongLive's sink). Training runs all frames at once under that mask (or the teacher-forcing
`[clean | noisy]` mask); inference runs block by block with a ring-buffer KV cache
(model/kv_cache.py) and a cross-attention cache for text and every reference / I2V path. Both run
sequence-parallel too (model/sequence_parallel.py; a rank's KV cache holds its share of heads).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from kernels.block_causal_layout import BlockCausalLayout
from model.conditioning import Conditioning
from model.config import WanConfig
from model.kv_cache import KVCache, make_caches
from model.layers import rope_table
from model.sequence_parallel import local_heads
from model.wan import CrossContext, WanModel, require


@dataclass(frozen=True)
class CausalConfig:
    num_frame_per_block: int = 3
    """Latent frames per autoregressive block (4 for the I2V recipe with 21 frames)."""
    independent_first_frame: bool = False
    """Frame 0 is a block of its own (I2V: the conditioning frame)."""
    local_attn_size: int = -1
    """Frames a query may see, sink included; -1 = everything before (LongLive: 12)."""
    sink_size: int = 0
    """First frames that stay visible whatever the window (LongLive: 3)."""


def frame_blocks(num_frames: int, cfg: CausalConfig) -> list[tuple[int, int]]:
    """[start, end) frame ranges of the blocks; a frame count that does not split is an error
    saying which block sizes would work."""
    n, first = cfg.num_frame_per_block, int(cfg.independent_first_frame)
    rest = num_frames - first
    if n < 1 or rest < 0 or rest % n:
        ok = [b for b in range(1, rest + 1) if rest % b == 0] if rest > 0 else []
        what = f"num_frames - 1 = {rest}" if first else f"num_frames = {num_frames}"
        raise ValueError(f"{what} is not a multiple of num_frame_per_block = {n}"
                         f"{' with independent_first_frame' if first else ''}; block sizes that work: {ok}")
    blocks = [(0, 1)] if first else []
    return blocks + [(first + i * n, first + (i + 1) * n) for i in range(rest // n)]


@dataclass
class BlockStep:
    """What `CausalWanModel.forward(x, t, block=...)` needs to run one block through the caches
    (so a DeepSpeed engine's forward, with its ZeRO-3 hooks, serves the rollout too)."""

    start_frame: int
    kv_caches: list
    cross_cache: tuple
    y: Optional[torch.Tensor] = None


class CausalWanModel(WanModel):
    """WanModel with block-causal attention; see the module docstring."""

    def __init__(self, cfg: WanConfig, causal: CausalConfig = CausalConfig()):
        super().__init__(cfg)
        if causal.local_attn_size > 0 and causal.sink_size >= causal.local_attn_size:
            raise ValueError(f"sink_size ({causal.sink_size}) must be below local_attn_size ({causal.local_attn_size})")
        self.causal = causal

    def layout(self, num_frames: int, frame_tokens: int, teacher_forcing: bool = False) -> BlockCausalLayout:
        """The attention layout of `num_frames` frames. LongLive's window counts its sink, so the
        kernel's window (keys >= block end - local_frames frames) is local_attn_size - sink_size."""
        c = self.causal
        frame_blocks(num_frames, c)  # the frame count must split into blocks (clear error if not)
        local = c.local_attn_size - c.sink_size if c.local_attn_size > 0 else -1
        return BlockCausalLayout(frame_tokens, num_frames, c.num_frame_per_block, c.independent_first_frame,
                                 local, c.sink_size, teacher_forcing)

    # ---------------------------------------------------------------------------- training
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[Conditioning] = None,
                clean_x: Optional[torch.Tensor] = None, clean_t: Optional[torch.Tensor] = None, *,
                block: Optional[BlockStep] = None) -> torch.Tensor:
        """All frames at once under the block-causal mask. x: [B, C, F, H, W]; t: [B, F] (or [B]).
        With `clean_x` (teacher forcing) the sequence is [clean | noisy] with the same RoPE on both
        halves and clean timesteps `clean_t` (default 0); only the noisy half is returned.
        With `block`, one block through the KV cache instead (`forward_block`)."""
        if block is not None:
            return self.forward_block(x, t, block.start_frame, block.kv_caches, block.cross_cache, block.y)
        cond = require(cond, "cond", "a full-sequence forward")
        if self.config.model_type == "i2v":
            y = require(cond.y, "y", "an i2v model")
            x = torch.cat([x, y.to(x.dtype)], dim=1)
            if clean_x is not None:
                clean_x = torch.cat([clean_x, y.to(clean_x.dtype)], dim=1)
        tokens, grid = self.patchify(x)
        f, frame_tokens = grid[0], grid[1] * grid[2]
        t = t[:, None].expand(-1, f) if t.dim() == 1 else t
        cos, sin = rope_table(self.config.head_dim, grid, device=tokens.device)
        layout = self.layout(f, frame_tokens, teacher_forcing=clean_x is not None)
        if clean_x is not None:
            clean_tokens, _ = self.patchify(clean_x)
            tokens = torch.cat([clean_tokens, tokens], dim=1)
            t = torch.cat([clean_t if clean_t is not None else torch.zeros_like(t), t], dim=1)
            cos, sin = torch.cat([cos, cos]), torch.cat([sin, sin])
        e, e0 = self.embed_time(t)
        ctx = self.embed_context(cond)
        out = self.blocks_and_head(tokens, e, e0, (cos, sin), ctx, layout=layout)
        if clean_x is not None:
            out = out[:, f * frame_tokens:]
        return self.unpatchify(out, grid)

    # --------------------------------------------------------------------------- inference
    def new_kv_caches(self, batch: int, frame_tokens: int, max_frames: int, device="cpu",
                      dtype=torch.float32) -> list[KVCache]:
        """One self-attention cache per block, [B, C, N, D]; under sequence parallelism only this
        rank's N_rank heads (model/sequence_parallel.py: the all-to-all hands it those heads of the
        whole block)."""
        c = self.causal
        return make_caches(len(self.blocks), batch, frame_tokens, self.cache_heads(), self.config.head_dim,
                           max_frames, c.local_attn_size, c.sink_size, device, dtype, c.num_frame_per_block)

    def kv_caches_for(self, latents: torch.Tensor, max_frames: int) -> list[KVCache]:
        """new_kv_caches for latents shaped [B, C, *, h, w] (their batch, frame tokens and device),
        in the parameters' dtype, holding up to `max_frames` frames."""
        b, _, _, h, w = latents.shape
        p = self.config.patch_size
        dtype = next(self.parameters()).dtype
        return self.new_kv_caches(b, (h // p[1]) * (w // p[2]), max_frames, device=latents.device, dtype=dtype)

    def cache_heads(self) -> int:
        """Heads a KV cache of this rank holds: all of them, or its share under SP."""
        if self.sequence_parallel is None:
            return self.config.num_heads
        return local_heads(self.config.num_heads, self.sequence_parallel.sp)

    def cross_attention_cache(self, cond: Conditioning) -> tuple[CrossContext, list]:
        """Embed the prompt / CLIP / reference inputs once and precompute every block's K, V for
        every path (text, img, vae, fused): reused by all blocks of frames until the prompt changes.
        `cond.y` is not used here: each block gets its own slice (forward_block's `y`)."""
        ctx = self.embed_context(cond)
        return ctx, [blk.cross_attn.kv_paths(ctx) for blk in self.blocks]

    def forward_block(self, x: torch.Tensor, t: torch.Tensor, start_frame: int, kv_caches: list[KVCache],
                      cross_cache: tuple[CrossContext, list], y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One block of frames [start_frame, start_frame + f) through the caches.

        x: [B, C, f, H, W]; t: [B, f] or [B] (one modulation for the whole block); y: this block's
        slice [B, 20, f, H, W] (i2v). The block's roped K, V are written to `kv_caches` (so call it
        once per block with the latents the cache should hold, e.g. the clean ones after
        denoising). Under sequence parallelism the block's tokens are sharded and each cache holds
        this rank's heads (model/sequence_parallel.py); the output is full on every rank.
        """
        if kv_caches and kv_caches[0].k.shape[2] != self.cache_heads():
            raise ValueError(f"the KV caches hold {kv_caches[0].k.shape[2]} heads but this rank attends over "
                             f"{self.cache_heads()} (sequence parallelism keeps a rank's share): make them with "
                             f"new_kv_caches after apply_sequence_parallel")
        if self.config.model_type == "i2v":
            y = require(y, "y", "an i2v model (this block's slice of mask + first-frame latent)")
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        tokens, grid = self.patchify(x)
        e, e0 = self.embed_time(t)  # [B, 1 or f, ...]
        rope = rope_table(self.config.head_dim, grid, start_frame=start_frame, device=tokens.device)
        ctx, cross_kv = cross_cache
        if self.sequence_parallel is not None:
            out = self.sequence_parallel.run(self, tokens, e, e0, rope, ctx, kv_caches=kv_caches, cross_kv=cross_kv)
            return self.unpatchify(out, grid)
        for block, cache, kv in zip(self.blocks, kv_caches, cross_kv):
            tokens = block(tokens, e0, rope, ctx, cross_kv=kv, kv_cache=cache)
        return self.unpatchify(self.head(tokens, e), grid)


def recache_range(done_frames: int, causal: CausalConfig, keep_sink: bool) -> tuple[int, bool]:
    """(first frame to re-cache, whether the cache keeps its sink) after `done_frames` frames: every
    frame with global attention; with a window, the last `local_attn_size` frames, or with
    `keep_sink` (and a sink already written) the last `local_attn_size - sink_size` after the sink."""
    window, sink = causal.local_attn_size, causal.sink_size
    if window <= 0:
        return 0, False
    if keep_sink and sink > 0 and done_frames > sink:
        return max(sink, done_frames - (window - sink)), True
    return max(0, done_frames - window), False


def recache(generator: Callable, caches: list, cross: tuple, latents: torch.Tensor, y: Optional[torch.Tensor],
            blocks_done: Sequence[tuple[int, int]], causal: CausalConfig, context_t: float, keep_sink: bool) -> None:
    """LongLive's re-cache after a prompt switch (its `_recache_after_switch`): empty `caches` (keeping
    the sink if asked and written) and re-run the clean `latents` [B, 16, cur, h, w] the next block
    can still see (`recache_range`) along the rollout's own block boundaries `blocks_done`, at
    timestep `context_t`, under the new `cross` cache. generator: what the rollout calls,
    `(x, t, block=BlockStep)`: a CausalWanModel or the DeepSpeed engine around one (its ZeRO-3
    hooks then gather the weights as for any other forward)."""
    lo, kept = recache_range(blocks_done[-1][1], causal, keep_sink)
    for cache in caches:
        cache.reset(keep_sink=kept)
    t = torch.full((latents.shape[0],), float(context_t), device=latents.device)
    with torch.no_grad():
        for start, end in blocks_done:
            a = max(start, lo)
            if a >= end:
                continue
            ys = y[:, :, a:end] if y is not None else None
            generator(latents[:, :, a:end], t, block=BlockStep(a, caches, cross, ys))
