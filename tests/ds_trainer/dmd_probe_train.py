"""`ds_trainer.train` for the DMD tests, with probes that leave the training code untouched:
- every generator, critic and teacher call asserts its I2V conditioning (clip_fea [B, K, C] with
  the batch axis, y with the frames of x: a block's slice for the generator);
- each rank records the exit steps it rolled out with (`exits_rank<r>.jsonl`);
- at the end, the teacher's weights are gathered and written (`teacher_after.safetensors`) and
  the calls counted (`probe_calls.json`, with `encoder_loads`: calls of load_frozen_encoders)."""
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

import model.encoders.bundle as encoder_bundle
from ds_trainer.checkpointing import export_full
from ds_trainer.dmd_trainer import DMDTrainer
from ds_trainer.train import main

CALLS: Counter = Counter()
_build_engines, _rollout, _finish = DMDTrainer.build_engines, DMDTrainer.rollout, DMDTrainer.finish
_load_frozen_encoders = encoder_bundle.load_frozen_encoders


def load_frozen_encoders(*args, **kwargs):
    CALLS["encoder_loads"] += 1
    return _load_frozen_encoders(*args, **kwargs)


def _check_generator(module, args, kwargs):
    x, block = args[0], kwargs["block"]
    assert block.y is not None and block.y.shape[2] == x.shape[2] and block.y.shape[1] == 20, "y slice"
    assert block.cross_cache[0].img is not None, "clip_fea reaches the generator's cross-attention"
    CALLS["generator"] += 1


def _checker(role):
    def check(module, args, kwargs):
        x, _, cond = args
        assert cond.clip_fea is not None and cond.clip_fea.dim() == 3 and cond.clip_fea.shape[0] == x.shape[0]
        assert cond.y is not None and cond.y.shape[2] == x.shape[2]
        CALLS[role] += 1
    return check


def build_engines(self):
    engines = _build_engines(self)
    self.generator.register_forward_pre_hook(_check_generator, with_kwargs=True)
    self.critic.register_forward_pre_hook(_checker("critic"), with_kwargs=True)
    self.real_score_module.register_forward_pre_hook(_checker("teacher"), with_kwargs=True)
    return engines


def rollout(self, cond, first, rng, grad):
    out = _rollout(self, cond, first, rng, grad)
    with open(self.logdir / f"exits_rank{self.rank}.jsonl", "a") as fh:
        fh.write(json.dumps({"step": self.step, "grad": grad, "exits": self.last_exits}) + "\n")
    return out


def finish(self):
    _finish(self)
    path = Path(self.logdir) / "teacher_after.safetensors"
    export_full(self.real_score_module, self.stage, path)
    if self.rank == 0:
        (Path(self.logdir) / "probe_calls.json").write_text(json.dumps(CALLS))


DMDTrainer.build_engines, DMDTrainer.rollout, DMDTrainer.finish = build_engines, rollout, finish
encoder_bundle.load_frozen_encoders = load_frozen_encoders  # the trainer imports it when it builds

if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
