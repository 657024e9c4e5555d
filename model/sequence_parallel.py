"""Sequence parallelism (DeepSpeed-Ulysses): one video's tokens split over the ranks of an SP group.

Every rank of an SP group holds the whole model and the same sample. After the patch embedding
the token sequence [B, L, dim] is cut into `size` equal contiguous shards; the blocks run on the
shard only, except self-attention, which goes through DeepSpeed's `DistributedAttention`: an
all-to-all turns sequence shards of all N heads into the full sequence of N/size heads, our
attention backend (kernels/attention.py) runs there, and a second all-to-all turns it back. So
each rank's local attention sees every token: the full mask, unsplit.

What that means part by part:
- RoPE: the (cos, sin) table of the full sequence is sharded like the tokens, so each shard's
  q and k are rotated with their own tokens' positions before the all-to-all.
- Cross-attention: queries are the shard's tokens, keys the full text / CLIP / VAE-reference
  context (every rank embeds the whole context). FFN, norms, modulation and the head are
  token-local.
- The block-causal mask (and the teacher-forcing [clean | noisy] layout) is applied by the local
  attention to the gathered full sequence, exactly as at SP = 1; shards need not fall on block
  boundaries.
- Shard boundaries. With per-frame timesteps (t [B, F], the causal model, teacher forcing) the
  modulation is per frame, so shards are whole frames: ceil(F / size) frames each. With one
  timestep per sample, shards are ceil(L / size) tokens, which falls on frame boundaries
  whenever the frames divide evenly over the ranks.
- Uneven lengths (L not a multiple of the shard length, any odd count per shard is fine): the
  sequence is zero-padded at its END to size * shard_len, so only the last shard(s) carry
  padding. After the all-to-all the padding is the tail of the full sequence; the local
  attention runs on the first L tokens only and returns zeros for the tail, and the gathered
  output drops it. Padded tokens never reach a real token.
- Uneven heads (N not a multiple of size, e.g. Wan's 12 or 40 heads over 8 ranks):
  DistributedAttention's own uneven-head all-to-all (ceil / floor heads per rank, chosen from the
  key's head count). It looks the SP rank up through `deepspeed.utils.groups`, so
  `init_sequence_parallel` registers DeepSpeed's SP state module there as the `mpu` (the engine
  does the same when given `mpu=`).
- Output and gradients: the head's output shards are all-gathered into the full [B, L, C] on
  every rank; the gather's backward keeps this rank's slice. Every rank of a group then computes
  the same loss, and its parameter gradients hold its own tokens' share: their SUM over the SP
  group is the SP = 1 gradient, which is what DeepSpeed's reduction does (sum over SP, mean
  over data parallel).
- The KV-cache rollout (`CausalWanModel.forward_block`, Self-Forcing's block-by-block denoising):
  the block's tokens are sharded as above (t [B]: token shards; t [B, f]: whole frames), and the
  all-to-all runs once per block and layer, so each rank's local attention holds the whole block
  for its share of heads and attends from there to its KV cache. A rank's cache therefore holds
  every cached token but only its own heads, [B, C, N_rank, D] (`local_heads`: the same ceil /
  floor split as the uneven all-to-all), which `CausalWanModel.new_kv_caches` allocates: cache
  memory is 1 / size per rank and no cached key or value ever crosses ranks. Lookahead mode, the
  ring, the sink and re-caching are the cache's own logic, unchanged, per rank. Cross-attention
  caches stay full-context on every rank (the queries are the shard's tokens).

SP = 1 is no SequenceParallel at all: `WanModel.sequence_parallel` stays None and the model runs
its usual code. DeepSpeed is imported only when an SP group is made.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass(frozen=True)
class SequenceParallelGroup:
    """This rank's SP group: ranks [i*size, (i+1)*size) share a sample (data-parallel rank i)."""

    group: object
    """The torch ProcessGroup of the SP ranks."""
    size: int
    rank: int
    """Rank inside the group, 0 .. size-1: which shard of the sequence this rank holds."""


def init_sequence_parallel(size: int) -> Optional[SequenceParallelGroup]:
    """Form the SP groups of the running world (consecutive ranks, DeepSpeed's layout); None for
    size 1. Collective: every rank calls it, after the process group exists."""
    if size == 1:
        return None
    if not dist.is_initialized():
        raise RuntimeError(f"sequence_parallel_size {size} needs torch.distributed to be initialised first")
    world = dist.get_world_size()
    if size < 1 or world % size:
        raise ValueError(f"sequence_parallel_size {size} must divide the world size {world}")
    import deepspeed.comm  # noqa: PLC0415  (slow import; only an SP run pays it)
    from deepspeed.runtime.sequence_parallel import parallel_state_sp  # noqa: PLC0415
    from deepspeed.utils import groups  # noqa: PLC0415
    if not deepspeed.comm.is_initialized():
        deepspeed.comm.init_distributed(dist_backend=dist.get_backend())
    if parallel_state_sp._SEQUENCE_PARALLEL_GROUP is None:
        parallel_state_sp.initialize_sequence_parallel(size)
    elif parallel_state_sp.get_sequence_parallel_world_size() != size:
        raise RuntimeError(f"sequence parallel groups of size {parallel_state_sp.get_sequence_parallel_world_size()} "
                           f"already exist; cannot form groups of {size}")
    groups.mpu = parallel_state_sp  # DistributedAttention's uneven heads read the SP rank from here
    return SequenceParallelGroup(parallel_state_sp.get_sequence_parallel_group(), size,
                                 parallel_state_sp.get_sequence_parallel_rank())


def sequence_parallel_mpu():
    """The `mpu` to give `deepspeed.initialize` in an SP run (DeepSpeed's SP state module): ZeRO
    then partitions and reduces over every rank, dividing gradients by world / size."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp  # noqa: PLC0415
    return parallel_state_sp


@dataclass(frozen=True)
class ShardPlan:
    """How one forward's sequence of `length` tokens is cut: shards of `shard_len` tokens, in
    `units` of `unit` tokens (a modulation frame, or 1), padded at the end to size * shard_len."""

    length: int
    unit: int
    shard_len: int
    size: int
    rank: int

    @classmethod
    def make(cls, length: int, frames: int, sp: SequenceParallelGroup) -> "ShardPlan":
        """length tokens carrying `frames` modulation frames (1 = one timestep per sample)."""
        if length % frames:
            raise ValueError(f"{length} tokens do not split into {frames} modulation frames")
        unit = length // frames if frames > 1 else 1
        units = length // unit
        shard_len = -(-units // sp.size) * unit
        return cls(length, unit, shard_len, sp.size, sp.rank)

    @property
    def padded(self) -> int:
        return self.size * self.shard_len

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's shard of a per-token tensor (tokens [B, L, C] on dim 1, RoPE [L, D/2] on 0)."""
        pad = self.padded - x.shape[dim]
        if pad:
            x = F.pad(x, (0, 0) * (x.dim() - 1 - dim) + (0, pad))
        return x.narrow(dim, self.rank * self.shard_len, self.shard_len)

    def shard_frames(self, e: torch.Tensor) -> torch.Tensor:
        """This rank's modulation frames of e [B, Fe, ...] (unchanged when Fe = 1)."""
        if e.shape[1] == 1:
            return e
        per = self.shard_len // self.unit
        pad = self.size * per - e.shape[1]
        if pad:
            e = torch.cat([e, e[:, -1:].expand(-1, pad, *e.shape[2:])], dim=1)  # any finite value
        return e[:, self.rank * per:(self.rank + 1) * per]


class _GatherSequence(torch.autograd.Function):
    """All-gather of token shards [B, S, C] -> [B, size*S, C]; backward keeps this rank's slice
    (every rank's loss is the same function of the full output, see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, size: int, rank: int) -> torch.Tensor:
        ctx.rank, ctx.shard_len = rank, x.shape[1]
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.narrow(1, ctx.rank * ctx.shard_len, ctx.shard_len), None, None, None


def local_heads(num_heads: int, sp: SequenceParallelGroup) -> int:
    """Heads this rank attends over after the all-to-all: num_heads / size, or with uneven heads
    DistributedAttention's split (the first num_heads % size ranks take one more)."""
    return num_heads // sp.size + int(sp.rank < num_heads % sp.size)


def _local_attention(q, k, v, backend, layout, length: int, kv_cache=None) -> torch.Tensor:
    """The backend's attention on the full sequence of this rank's heads, [B, size*S, n, D]: the
    first `length` tokens are real, the rest end padding (zeros out). With `kv_cache` (this
    rank's heads of one layer's model.kv_cache.KVCache) the real tokens' k, v are appended to it
    (or peeked at, in lookahead mode) and q attends to what it holds."""
    pad = q.shape[1] - length
    if pad:
        q, k, v = q[:, :length], k[:, :length], v[:, :length]
    if kv_cache is not None:
        view = kv_cache.attend(k, v)
        out = backend.kv_cache_attention(q, view.k, view.v, view.sink_len, view.window_start, view.window_len)
    elif layout is None:
        out = backend.attention(q, k, v)
    else:
        out = backend.block_causal_attention(q, k, v, layout)
    return F.pad(out, (0, 0, 0, 0, 0, pad)) if pad else out


@dataclass(frozen=True)
class ShardedSelfAttention:
    """What a WanSelfAttention gets as its `layout` under SP: the plan, DeepSpeed's
    DistributedAttention and the full-sequence mask layout (None = full attention)."""

    plan: ShardPlan
    dist_attn: object
    layout: object = None
    kv_cache: object = None
    """One layer's KVCache of this rank's heads (the KV-cache rollout), or None."""

    def attend(self, backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: this shard's [B, S, N, D] (roped) -> attention output [B, S, N, D]."""
        return self.dist_attn(q, k, v, 0, None, backend, self.layout, self.plan.length, self.kv_cache)


class SequenceParallel:
    """Runs a WanModel's blocks and head on this rank's shard (module docstring). A plain object,
    not a submodule: the model's parameters and state dict are unchanged."""

    def __init__(self, sp: SequenceParallelGroup):
        from deepspeed.sequence.layer import DistributedAttention  # noqa: PLC0415
        self.sp = sp
        # our tensors are [B, L, N, D]: scatter heads (dim 2), gather the sequence (dim 1)
        self.dist_attn = DistributedAttention(_local_attention, sp.group, scatter_idx=2, gather_idx=1)

    def run(self, model, tokens: torch.Tensor, e: torch.Tensor, e0: torch.Tensor, rope, ctx,
            layout=None, kv_caches=None, cross_kv=None) -> torch.Tensor:
        """tokens [B, L, dim] (full), e [B, Fe, dim], e0 [B, Fe, 6, dim], rope (cos, sin) [L, D/2]
        -> the head's output [B, L, prod(patch) * out_dim], full, on every rank of the group.
        With `kv_caches` (one per layer, this rank's heads) and `cross_kv` (every layer's
        cross-attention keys / values) one block of the KV-cache rollout instead."""
        plan = ShardPlan.make(tokens.shape[1], e0.shape[1], self.sp)
        cos, sin = (plan.shard(t, dim=0) for t in rope)
        x, e0 = plan.shard(tokens), plan.shard_frames(e0)
        if kv_caches is None:
            x = model.run_blocks(x, e0, (cos, sin), ctx, layout=ShardedSelfAttention(plan, self.dist_attn, layout))
        else:
            for block, cache, kv in zip(model.blocks, kv_caches, cross_kv):
                attn = ShardedSelfAttention(plan, self.dist_attn, kv_cache=cache)
                x = block(x, e0, (cos, sin), ctx, cross_kv=kv, layout=attn)
        out = model.head(x, plan.shard_frames(e))  # [B, S, C]
        full = _GatherSequence.apply(out, self.sp.group, self.sp.size, self.sp.rank)
        return full[:, :plan.length]


def apply_sequence_parallel(model: torch.nn.Module, sp: Optional[SequenceParallelGroup]) -> None:
    """Run every WanModel inside `model` (a bare model, or one wrapped by peft) sequence-parallel
    over `sp`; None puts them back on the plain path."""
    from model.wan import WanModel  # noqa: PLC0415  (model.wan imports this module)
    runner = SequenceParallel(sp) if sp is not None else None
    found = False
    for mod in model.modules():
        if isinstance(mod, WanModel):
            mod.sequence_parallel = runner
            found = True
    if not found:
        raise TypeError(f"no WanModel inside {type(model).__name__} to make sequence-parallel")
