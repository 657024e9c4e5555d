"""One rank of the SP = 2 parity run (tests/model/test_sequence_parallel.py starts two).

For each case every rank builds the same tiny model and inputs (float64), runs forward + backward
at SP = 1 (the plain path), then at SP = 2 over the group, sums the parameter gradients over the
group (what DeepSpeed's reduction does) and records the largest differences. Rank 0 writes them
as JSON to argv[1].
"""
import json
import sys

import torch
import torch.distributed as dist
from deepspeed.sequence import layer as ulysses

from ds_trainer.distributed import init_distributed
from model.causal import BlockStep, CausalConfig, CausalWanModel
from model.conditioning import Conditioning
from model.config import ReferencePathsConfig, WAN_TINY, WAN_TINY_I2V
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
    own_share_differs = max((grads[n] - ref_grads[n]).abs().max().item() for n in grads)
    for g in grads.values():
        dist.all_reduce(g, group=sp.group)
    tokens = f * (h // 2) * (w // 2) * (2 if teacher_forcing else 1)
    frames = 2 * f if teacher_forcing else f
    plan = ShardPlan.make(tokens, frames if per_frame_t else 1, sp)
    apply_sequence_parallel(model, None)
    return {
        "out_max_abs_diff": (out - ref_out).abs().max().item(),
        "out_max_abs": ref_out.abs().max().item(),
        "grad_max_abs_diff": max((grads[n] - ref_grads[n]).abs().max().item() for n in grads),
        "grad_max_abs": max(g.abs().max().item() for g in ref_grads.values()),
        "grads_compared": len(grads),
        "params": sum(1 for _ in model.parameters()),
        "zero_grads": sorted(n for n, g in ref_grads.items() if not g.abs().max() > 0),
        "own_share_max_abs_diff": own_share_differs,
        "uneven_head_all2all_calls": uneven.calls,
        "tokens": tokens, "shard_len": plan.shard_len, "padding": plan.padded - tokens,
    }


def main(out_path):
    rank, world = init_distributed()
    torch.set_num_threads(1)
    sp = init_sequence_parallel(world)
    results = {"world": world, "sp_rank": sp.rank}
    for name, case in CASES.items():
        results[name] = run_case(sp, **case)
    # the KV-cache rollout does not run under SP: a clear error, not wrong numbers
    model = build(WAN_TINY, CausalConfig(2))
    apply_sequence_parallel(model, sp)
    try:
        model(torch.zeros(1, 16, 2, 2, 6, dtype=torch.float64), torch.zeros(1),
              block=BlockStep(0, [], (None, [])))
        results["forward_block_error"] = None
    except NotImplementedError as exc:
        results["forward_block_error"] = str(exc)
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(gathered, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
