"""Rectified-flow (flow matching) schedule of Wan2.1 / Self-Forcing (upstream.md §2.2, §5.8).

x_t = (1 - sigma) x0 + sigma eps, the model predicts the velocity eps - x0, and the timestep fed
to the model is t = 1000 sigma. Sigmas are warped by the shift k: sigma' = k s / (1 + (k - 1) s),
which spends more steps at high noise (k = 5 for Wan T2V, 3 for 480p I2V, 8 in Self-Forcing's
wrapper). The training grid is Self-Forcing's: s = linspace(1, 0, 1001)[:-1], warped.
"""
from __future__ import annotations

from typing import Optional

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(s: torch.Tensor, shift: float) -> torch.Tensor:
    """The shift warp s -> k s / (1 + (k - 1) s); identity for k = 1."""
    return shift * s / (1 + (shift - 1) * s)


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast sigma [B] or [B, F] over latents [B, C, F, H, W]."""
    if v.dim() == 1:
        return v.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)
    if v.dim() == 2:  # per frame
        return v[:, None, :, None, None].to(like.dtype)
    raise ValueError(f"sigma must be [B] or [B, F], got shape {tuple(v.shape)}")


class FlowMatchingScheduler:
    """Training-time noise schedule and a few-step Euler sampler for flow matching."""

    def __init__(self, shift: float = 5.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        s = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float64)[:-1]
        self.sigmas = shift_sigmas(s, shift)                      # [1000], decreasing from 1
        self.timesteps = self.sigmas * num_train_timesteps        # [1000]

    # ------------------------------------------------------------------------------ training
    def sample_sigmas(self, batch: int, generator: Optional[torch.Generator] = None,
                      frames: Optional[int] = None) -> torch.Tensor:
        """Uniform draw over the warped training grid: [B] (or [B, F] independent per frame)."""
        shape = (batch,) if frames is None else (batch, frames)
        idx = torch.randint(0, self.num_train_timesteps, shape, generator=generator)
        return self.sigmas[idx].float()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Model timestep t = 1000 sigma."""
        return sigma * self.num_train_timesteps

    def sigma_of(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of `timestep`."""
        return t / self.num_train_timesteps

    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - sigma) x0 + sigma eps; x0, noise [B, C, F, H, W]; sigma [B] or [B, F]."""
        s = _per_sample(sigma, x0)
        return (1 - s) * x0 + s * noise

    @staticmethod
    def training_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity the model learns: eps - x0."""
        return noise - x0

    @staticmethod
    def x0_from_flow(x_t: torch.Tensor, flow: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Clean latents implied by a velocity prediction: x0 = x_t - sigma * flow."""
        return x_t - _per_sample(sigma, x_t) * flow

    # ------------------------------------------------------------------------------ sampling
    def sampling_sigmas(self, num_steps: int) -> torch.Tensor:
        """num_steps + 1 warped sigmas from 1 to 0 for the Euler sampler."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        return shift_sigmas(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), self.shift).float()

    @staticmethod
    def euler_step(x_t: torch.Tensor, flow: torch.Tensor, sigma: torch.Tensor,
                   sigma_next: torch.Tensor) -> torch.Tensor:
        """One ODE step of dx/dsigma = flow from sigma to sigma_next."""
        return x_t + _per_sample(sigma_next - sigma, x_t) * flow
