"""One rank of the SP = 2 parity run (tests/model/test_sequence_parallel.py starts two).

For each case every rank builds the same tiny model and inputs (float64), runs forward + backward
at SP = 1 (the plain path), then at SP = 2 over the group, sums the parameter gradients over the
group (what DeepSpeed's reduction does) and records the largest differences. CASES are
full-sequence forwards; ROLLOUT_CASES Self-Forcing's KV-cache rollout (self_forcing_rollout, every
block's exit step carrying gradients); `recache` LongLive's re-cache (model/causal.py: recache),
comparing this rank's KV-cache heads too. Rank 0 writes them as JSON to argv[1].
"""
import json
import sys

import torch
import torch.distributed as dist
from deepspeed.sequence import layer as ulysses

from ds_trainer.distributed import init_distributed
from ds_trainer.self_forcing import self_forcing_rollout
from model.causal import CausalConfig, CausalWanModel, recache
from model.conditioning import Conditioning
from model.config import ReferencePathsConfig, WAN_TINY, WAN_TINY_I2V
from model.flow_matching import FlowMatchingScheduler
from model.sequence_parallel import ShardPlan, apply_sequence_parallel, init_sequence_parallel
from model.wan import WanModel

REFS_ALL = ReferencePathsConfig(clip=True, vae=True, fused=True)


def inputs(cfg, f, h, w, per_frame_t, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = rnd(b, 16, f, h, w)
    t = torch.rand(b, f, generator=g, dtype=torch.float64) * 1000 if per_frame_t else torch.tensor([37.0, 911.0])
    cond = Conditioning(rnd(b, 7, cfg.text_dim), context_lens=torch.tensor([7, 4]))
    if cfg.model_type == "i2v":
        cond = cond.replace(clip_fea=rnd(b, 257, cfg.clip_dim), y=rnd(b, 20, f, h, w))
    if cfg.reference_paths.vae:  # two references, the second sample has only one
        cond = cond.replace(ref_vae=rnd(b, 2, 16, h, w), ref_vae_lens=torch.tensor([2 * h * w, h * w]))
    if cfg.reference_paths.clip:
        cond = cond.replace(ref_clip=rnd(b, 2, 5, cfg.clip_dim), ref_clip_lens=torch.tensor([10, 5]))
    return x, t, cond


def build(cfg, causal):
    torch.manual_seed(0)
    model = CausalWanModel(cfg, causal) if causal is not None else WanModel(cfg)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)  # the official init zeroes the head and new values, hiding bugs
    return model


def forward_backward(model, args, kwargs, weight):
    model.zero_grad(set_to_none=True)
    out = model(*args, **kwargs)
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


CASES = {
    # name: model config, causal config, (F, H, W) latent grid and options
    "t2v_odd_shard": dict(cfg=WAN_TINY, grid=(3, 4, 6)),                             # 18 tokens: 9 per shard
    "t2v_odd_shard_fp32": dict(cfg=WAN_TINY, grid=(3, 4, 6), dtype=torch.float32),
    "t2v_frames_padded": dict(cfg=WAN_TINY, grid=(3, 4, 6), per_frame_t=True),       # 2 frames + 1 padded
    "t2v_references": dict(cfg=WAN_TINY.replace(reference_paths=REFS_ALL), grid=(2, 2, 6)),
    "i2v_vae_reference": dict(cfg=WAN_TINY_I2V.replace(reference_paths=ReferencePathsConfig(vae=True)),
                              grid=(3, 2, 6)),
    "causal_block_mask": dict(cfg=WAN_TINY, causal=CausalConfig(2), grid=(4, 2, 6), per_frame_t=True,
                              checkpointing=True),
    "causal_teacher_forcing": dict(cfg=WAN_TINY, causal=CausalConfig(2, local_attn_size=3, sink_size=1),
                                   grid=(4, 2, 6), per_frame_t=True, teacher_forcing=True),
    "causal_i2v_first_frame": dict(cfg=WAN_TINY_I2V, causal=CausalConfig(2, independent_first_frame=True),
                                   grid=(5, 2, 6), per_frame_t=True),
    "uneven_heads_3_over_2": dict(cfg=WAN_TINY.replace(dim=48, num_heads=3), grid=(3, 2, 6)),
}


WINDOWED_I2V = CausalConfig(2, independent_first_frame=True, local_attn_size=3, sink_size=1)  # ring wraps at F=7
ROLLOUT_CASES = {
    # 7 frames: the image + 3 blocks of 2 frames through a sink + window cache that wraps; 6 tokens a
    # frame: token shards of 3 (the first frame) and 6
    "rollout_sink_window": dict(cfg=WAN_TINY_I2V, causal=WINDOWED_I2V, grid=(7, 4, 6), exits=[0, 0, 2, 1]),
    # 3 tokens a frame: the first frame's shards of 2 carry a padded token; 3 heads over 2 ranks
    # (caches of 2 and 1 heads)
    "rollout_uneven_heads_padded": dict(cfg=WAN_TINY_I2V.replace(dim=48, num_heads=3),
                                        causal=CausalConfig(2, independent_first_frame=True),
                                        grid=(5, 2, 6), exits=[0, 3, 1]),
}
ROLLOUT_STEPS = [1000.0, 937.5, 833.3, 625.0]


def rollout_inputs(cfg, f, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    cond = Conditioning(rnd(1, 7, cfg.text_dim), clip_fea=rnd(1, 9, cfg.clip_dim), y=rnd(1, 20, f, h, w))
    return cond, rnd(1, 16, 1, h, w), rnd(1, 16, f, h, w)  # conditioning, first-frame latent, noise


def rollout_backward(model, causal, exits, cond, first, noise, weight):
    """self_forcing_rollout with gradients at every block's exit step, then backward of a weighted sum."""
    model.zero_grad(set_to_none=True)
    video = self_forcing_rollout(model, model, noise, cond, first, causal, ROLLOUT_STEPS, exits,
                                 FlowMatchingScheduler(5.0), 0.0, grad=True, rng=torch.Generator().manual_seed(7))
    (video * weight).sum().backward()
    return video.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run_rollout_case(sp, cfg, causal, grid, exits):
    f, h, w = grid
    model = build(cfg, causal)
    cond, first, noise = rollout_inputs(cfg, f, h, w)
    weight = torch.randn(noise.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ref_out, ref_grads = rollout_backward(model, causal, exits, cond, first, noise, weight)
    apply_sequence_parallel(model, sp)
    cache_heads = model.new_kv_caches(1, (h // 2) * (w // 2), f, dtype=torch.float64)[0].k.shape[2]
    uneven = ulysses.uneven_heads_all2all = CountCalls("uneven_heads_all2all")
    out, grads = rollout_backward(model, causal, exits, cond, first, noise, weight)
    ulysses.uneven_heads_all2all = uneven.original
    apply_sequence_parallel(model, None)
    return {**compare(sp, ref_out, ref_grads, out, grads, model), "uneven_head_all2all_calls": uneven.calls,
            "cache_heads": cache_heads}


def compare(sp, ref_out, ref_grads, out, grads, model):
    """Largest differences of the SP output and the SP group's summed gradients from SP = 1's."""
    own_share_differs = max((grads[n] - ref_grads[n]).abs().max().item() for n in grads)
    for g in grads.values():
        dist.all_reduce(g, group=sp.group)
    return {
        "out_max_abs_diff": (out - ref_out).abs().max().item(),
        "out_max_abs": ref_out.abs().max().item(),
        "grad_max_abs_diff": max((grads[n] - ref_grads[n]).abs().max().item() for n in grads),
        "grad_max_abs": max(g.abs().max().item() for g in ref_grads.values()),
        "grads_compared": len(grads),
        "params": sum(1 for _ in model.parameters()),
        "zero_grads": sorted(n for n, g in ref_grads.items() if not g.abs().max() > 0),
        "own_share_max_abs_diff": own_share_differs,
    }


def run_recache(sp):
    """Cache 5 frames, switch prompt with LongLive's re-cache (sink kept), then one block with
    gradients: SP = 2's output, summed gradients and this rank's heads of every cache equal SP = 1's."""
    cfg, causal, (f, h, w) = WAN_TINY_I2V, WINDOWED_I2V, (7, 4, 6)
    model = build(cfg, causal)
    cond, first, frames = rollout_inputs(cfg, f, h, w)
    new_prompt = cond.replace(context=rollout_inputs(cfg, f, h, w, seed=1)[0].context)
    weight = torch.randn(1, 16, 2, h, w, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def run():
        model.zero_grad(set_to_none=True)
        caches = model.new_kv_caches(1, (h // 2) * (w // 2), f, dtype=torch.float64)
        with torch.no_grad():
            cross = model.cross_attention_cache(cond)
            for a, b in ((0, 1), (1, 3), (3, 5)):
                model.forward_block(frames[:, :, a:b], torch.zeros(1, dtype=torch.float64), a, caches, cross,
                                    cond.y[:, :, a:b])
        cross = model.cross_attention_cache(new_prompt)
        recache(model, caches, cross, frames[:, :, :5], cond.y, [(0, 1), (1, 3), (3, 5)], causal, 0.0, keep_sink=True)
        out = model.forward_block(frames[:, :, 5:7], torch.full((1,), 500.0, dtype=torch.float64), 5, caches,
                                  cross, cond.y[:, :, 5:7])
        (out * weight).sum().backward()
        return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                              if p.grad is not None}, caches

    ref_out, ref_grads, ref_caches = run()
    apply_sequence_parallel(model, sp)
    out, grads, caches = run()
    apply_sequence_parallel(model, None)
    n = caches[0].k.shape[2]
    counts = [None] * sp.size
    dist.all_gather_object(counts, n, group=sp.group)
    lo = sum(counts[:sp.rank])  # this rank's heads are [lo, lo + n) of the full cache's
    cache_diff = max(max((c.k - r.k[:, :, lo:lo + n]).abs().max().item(),
                         (c.v - r.v[:, :, lo:lo + n]).abs().max().item()) for c, r in zip(caches, ref_caches))
    return {**compare(sp, ref_out, ref_grads, out, grads, model), "cache_max_abs_diff": cache_diff,
            "cache_totals": [c.total for c in caches], "ref_cache_totals": [c.total for c in ref_caches],
            "cache_max_abs": max(r.k.abs().max().item() for r in ref_caches)}


class CountCalls:
    """Counts calls of a function of deepspeed.sequence.layer (which path the all-to-all took)."""

    def __init__(self, name):
        self.name, self.calls = name, 0
        self.original = getattr(ulysses, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.original(*args, **kwargs)


def run_case(sp, cfg, grid, causal=None, per_frame_t=False, teacher_forcing=False, checkpointing=False,
             dtype=torch.float64):
    f, h, w = grid
    model = build(cfg, causal).to(dtype)
    model.gradient_checkpointing = checkpointing
    model.train()
    x, t, cond = inputs(cfg, f, h, w, per_frame_t)
    kwargs = {}
    if teacher_forcing:
        kwargs = dict(clean_x=inputs(cfg, f, h, w, per_frame_t, seed=1)[0])
    weight = torch.randn(x.shape[0], cfg.out_dim, f, h, w, generator=torch.Generator().manual_seed(9),
                         dtype=torch.float64)
    x, t, cond, weight = x.to(dtype), t.to(dtype), cond.to(dtype=dtype), weight.to(dtype)
    kwargs = {k: v.to(dtype) for k, v in kwargs.items()}
    ref_out, ref_grads = forward_backward(model, (x, t, cond), kwargs, weight)
    apply_sequence_parallel(model, sp)
    uneven = ulysses.uneven_heads_all2all = CountCalls("uneven_heads_all2all")
    out, grads = forward_backward(model, (x, t, cond), kwargs, weight)
    ulysses.uneven_heads_all2all = uneven.original
    apply_sequence_parallel(model, None)
    tokens = f * (h // 2) * (w // 2) * (2 if teacher_forcing else 1)
    frames = 2 * f if teacher_forcing else f
    plan = ShardPlan.make(tokens, frames if per_frame_t else 1, sp)
    return {**compare(sp, ref_out, ref_grads, out, grads, model), "uneven_head_all2all_calls": uneven.calls,
            "tokens": tokens, "shard_len": plan.shard_len, "padding": plan.padded - tokens}


def full_head_caches_error(sp):
    """Caches made before apply_sequence_parallel (every head) are refused, not mis-read."""
    model = build(WAN_TINY_I2V, CausalConfig(2))
    caches = model.new_kv_caches(1, 3, 2, dtype=torch.float64)
    apply_sequence_parallel(model, sp)
    try:
        model.forward_block(torch.zeros(1, 16, 2, 2, 6, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                            0, caches, (None, []))
    except ValueError as exc:
        return str(exc)
    return None


def main(out_path):
    rank, world = init_distributed()
    torch.set_num_threads(1)
    sp = init_sequence_parallel(world)
    results = {"world": world, "sp_rank": sp.rank}
    for name, case in CASES.items():
        results[name] = run_case(sp, **case)
    for name, case in ROLLOUT_CASES.items():
        results[name] = run_rollout_case(sp, **case)
    results["recache"] = run_recache(sp)
    results["full_head_caches_error"] = full_head_caches_error(sp)
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(gathered, fh, indent=1)
    # an orderly shutdown: a rank leaving with the group's threads alive can abort in their
    # destructor ("terminate called without an active exception", SIGABRT) and fail the run
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
