"""`ds_trainer.train` for the world-size resume tests, with probes that leave the training code
untouched (patched in this process only):
- each rank appends the samples it trains on, with the sampler's (epoch, position) before the
  batch and the world size, to `samples_rank<r>.jsonl`;
- before every checkpoint and right after a resume (after DeepSpeed's load), rank 0 writes the
  trainable weights as the model holds them and each one's fp32 master, Adam exp_avg and
  exp_avg_sq (gathered from every rank) to `state_<checkpoint name>_<saved|resumed>_world<W>.safetensors`.
"""
import json
import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from safetensors.torch import save_file

from data.sampler import ResumableDistributedSampler
from ds_trainer import checkpointing
from ds_trainer.adapter_trainer import AdapterTrainer
from ds_trainer.train import main

_advance, _compute_loss, _save, _restore = (ResumableDistributedSampler.advance, AdapterTrainer.compute_loss,
                                            AdapterTrainer.save, AdapterTrainer.restore)


def advance(self, samples_per_rank):
    self.position_before = (self.epoch, self.consumed)
    _advance(self, samples_per_rank)


def compute_loss(self, batch, micro):
    epoch, position = self.sampler.position_before
    with open(self.logdir / f"samples_rank{self.rank}.jsonl", "a") as fh:
        fh.write(json.dumps({"step": self.step, "world": self.world, "rank": self.rank, "epoch": epoch,
                             "position": position, "keys": list(batch.keys)}) + "\n")
    return _compute_loss(self, batch, micro)


def dump_state(self, name: str) -> None:
    """Every rank calls this (the gathers are collectives); rank 0 writes."""
    out = {}
    weights = checkpointing.export_trainable(self.model, self.stage)
    for key, param in self.model.named_parameters():
        if param.requires_grad:
            out[f"fp32/{key}"] = safe_get_full_fp32_param(param)
            for state in ("exp_avg", "exp_avg_sq"):
                out[f"{state}/{key}"] = safe_get_full_optimizer_state(param, state)
    steps = {float(s["step"]) for s in self.engine.optimizer.optimizer.state.values() if "step" in s}
    if self.rank == 0:
        out.update({f"weights/{k}": v for k, v in weights.items()})
        out["adam_step"] = torch.tensor(sorted(steps))  # one value: every group stepped alike
        out["lr"] = torch.tensor(self.engine.get_lr())
        save_file({k: v.contiguous() for k, v in out.items()}, str(Path(self.logdir) / f"{name}_world{self.world}.safetensors"))


def save(self):
    dump_state(self, f"state_{checkpointing.checkpoint_dir(self.logdir, self.checkpoint_prefix, self.step).name}_saved")
    return _save(self)


def restore(self, checkpoint):
    _restore(self, checkpoint)
    dump_state(self, f"state_{checkpoint.name}_resumed")


ResumableDistributedSampler.advance = advance
AdapterTrainer.compute_loss, AdapterTrainer.save, AdapterTrainer.restore = compute_loss, save, restore

if __name__ == "__main__":
    sys.exit(main())
