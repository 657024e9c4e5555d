"""The samplers of `wanspeed sample`: diffusers' flow-matching schedulers on Wan's official sigma grid.

Wan2.1's own sampler (`wan/text2video.py`, solver 'unipc') builds its grid as
`FlowUniPCMultistepScheduler(shift=1).set_timesteps(steps, shift=k)`: s = linspace(sigma_max,
0, steps + 1)[:-1] with sigma_max = 1 - 1/1000 (the first sigma of its 1000-step training
table), shifted s' = k s / (1 + (k - 1) s), then a final 0; the model is fed the integer
timesteps int(1000 s'). Its 'dpm++' solver uses `get_sampling_sigmas`: the same with s =
linspace(1, 0, steps + 1)[:-1]. diffusers (0.42) does not reproduce either by default:
`UniPCMultistepScheduler(use_flow_sigmas=True)` spaces s from 1 to 1/1000, and
`FlowMatchEulerDiscreteScheduler(shift=k).set_timesteps(n)` shifts twice. Both take an explicit
unshifted grid (`set_timesteps(sigmas=...)`) and apply `flow_shift` / `shift` to it, which is what
this module passes, so the diffusers steppers run on Wan's exact grid:

- 'unipc': diffusers' UniPCMultistepScheduler (prediction_type='flow_prediction',
  use_flow_sigmas=True, flow_shift=k; as diffusers' Wan pipeline configures it), on Wan's UniPC grid;
- 'euler': diffusers' FlowMatchEulerDiscreteScheduler(shift=k) on `get_sampling_sigmas`' grid
  (the same as model/flow_matching.py's `sampling_sigmas`).
"""
from __future__ import annotations

import numpy as np
import torch

from model.flow_matching import NUM_TRAIN_TIMESTEPS

SAMPLERS = ("unipc", "euler")
WAN_UNIPC_SIGMA_MAX = 1.0 - 1.0 / NUM_TRAIN_TIMESTEPS
"""Where Wan's UniPC grid starts (before the shift): its training table's first sigma."""


def unshifted_grid(sampler: str, steps: int) -> np.ndarray:
    """The `steps` unshifted sigmas Wan's official sampler starts from (module docstring)."""
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    start = WAN_UNIPC_SIGMA_MAX if sampler == "unipc" else 1.0
    return np.linspace(start, 0.0, steps + 1)[:-1].copy()


class FlowSampler:
    """One sampling run of a diffusers scheduler (they are stateful: build one per video).

    timesteps [steps]: what the model is fed at each step; sigmas [steps + 1]: the grid, ending
    at 0. `step(flow, x)` advances x [B, C, F, H, W] by one step given the model's velocity."""

    def __init__(self, sampler: str, steps: int, shift: float):
        from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler  # noqa: PLC0415

        if sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not shift > 0:
            raise ValueError(f"the flow shift must be > 0, got {shift}")
        if sampler == "unipc":
            self.scheduler = UniPCMultistepScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, solver_order=2,
                                                     prediction_type="flow_prediction", use_flow_sigmas=True,
                                                     flow_shift=shift)
        else:
            self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
        self.scheduler.set_timesteps(sigmas=unshifted_grid(sampler, steps))
        self.scheduler.set_begin_index(0)
        self.name, self.shift = sampler, shift
        self.timesteps: torch.Tensor = self.scheduler.timesteps
        self.sigmas: torch.Tensor = self.scheduler.sigmas

    def __len__(self) -> int:
        return len(self.timesteps)

    def step(self, flow: torch.Tensor, index: int, x: torch.Tensor) -> torch.Tensor:
        """x at step `index` (fed timesteps[index]) and its predicted velocity -> x at index + 1."""
        return self.scheduler.step(flow, self.timesteps[index], x, return_dict=False)[0]
