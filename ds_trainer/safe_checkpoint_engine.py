"""DeepSpeed's checkpoint engine, reading its state files with `torch.load(weights_only=True)`.

DeepSpeed's `TorchCheckpointEngine` loads `*_model_states.pt` / `*_optim_states.pt` with
`weights_only=False`, so a pickle planted in a checkpoint directory runs code on resume. This
engine is the same except that its `load` admits only tensors, containers, numbers and strings,
plus the few plain DeepSpeed types its states hold (an enum, a loss-scaler record, a fragment
address); anything else is refused with an error naming the file and the type.
"""
from __future__ import annotations

import re

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

DEEPSPEED_STATE_TYPES = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
"""Found in the states of ZeRO-2, ZeRO-3 and ZeRO-3-offload runs (fp32 and bf16): data records whose
unpickling sets attributes and calls no code of the file's choosing."""


class UnsafeCheckpointFile(RuntimeError):
    """A checkpoint file holds a pickled object of a type wanspeed does not load."""


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    def load(self, path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(DEEPSPEED_STATE_TYPES):
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:
            if "Weights only load failed" not in str(exc):
                raise
            found = re.findall(r"GLOBAL ([\w.]+)", str(exc))
            raise UnsafeCheckpointFile(
                f"{path}: refusing to load {found[0] if found else 'a pickled object'} from a checkpoint "
                "(only tensors and DeepSpeed's plain state types are loaded; loading other pickles can run code)"
            ) from None


def use_weights_only_loading(engine) -> None:
    """Swap `engine`'s checkpoint engine for WeightsOnlyCheckpointEngine (same saving)."""
    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise RuntimeError(f"DeepSpeed chose the checkpoint engine {type(current).__name__}, which wanspeed does "
                           "not support (it cannot check that resuming runs no code): remove the "
                           "checkpoint engine settings from the DeepSpeed config")
    safe = WeightsOnlyCheckpointEngine.__new__(WeightsOnlyCheckpointEngine)
    safe.__dict__.update(current.__dict__)  # same settings (serialization format, name) as DeepSpeed made it
    engine.checkpoint_engine = safe
