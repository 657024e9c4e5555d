"""`ds_trainer.train` for the DMD sequence-parallel test, recording per rank what the run's logged
means would hide: each step's own losses and DMD gradient (`rows_rank<r>.jsonl`: every rank of an
SP group must draw the same noise, timesteps and exit steps, so these agree across the group), the
exit steps of each rollout, and the KV-cache heads this rank's rollout allocated."""
import json
import sys

import torch

from ds_trainer.dmd_trainer import DMDTrainer
from ds_trainer.train import main

_train_step, _rollout = DMDTrainer.train_step, DMDTrainer.rollout
DRAWN = ("generator_loss", "dmd_grad", "critic_loss")
"""What a step's random draws decide (times and memory differ between ranks)."""


def train_step(self, batch, micro):
    row = _train_step(self, batch, micro)
    keep = {k: v for k, v in (row or {}).items() if k in DRAWN}
    with open(self.logdir / f"rows_rank{self.rank}.jsonl", "a") as fh:
        fh.write(json.dumps({"step": self.step, "dp_rank": self.dp_rank, **keep}) + "\n")
    return row


def rollout(self, cond, first, rng, grad):
    out = _rollout(self, cond, first, rng, grad)
    heads = self.generator.new_kv_caches(1, 1, 1)[0].k.shape[2]
    with open(self.logdir / f"exits_rank{self.rank}.jsonl", "a") as fh:
        fh.write(json.dumps({"step": self.step, "grad": grad, "exits": self.last_exits, "cache_heads": heads,
                             "video_sum": float(out.detach().double().sum())}) + "\n")
    return out


DMDTrainer.train_step, DMDTrainer.rollout = train_step, rollout

if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
