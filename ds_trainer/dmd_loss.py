"""The two losses of DMD distillation (Self-Forcing's model/dmd.py), on flow-predicting Wans.

- `distribution_matching_loss`: noise the generator's video at one t (uniform in [min, max)
  after the shift, the same for every frame), take the real score's CFG x0 and the fake score's
  x0, and regress the video onto `x - grad` with grad = (fake - real) / mean|x - real| (the
  normalised KL gradient), `0.5 * MSE` in float64. Gradients reach the generator through `x` only.
- `critic_loss`: the fake score's flow-matching loss on a (no-grad) generator video noised at a
  fresh t.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from model.conditioning import Conditioning
from model.flow_matching import FlowMatchingScheduler, shift_sigmas


@dataclass(frozen=True)
class DMDTimesteps:
    """Where DMD and the critic sample t: uniform integer in [min_step, max_step), shifted, clamped."""

    min_step: int
    max_step: int
    shift: float

    def draw(self, batch: int, rng: torch.Generator) -> torch.Tensor:
        """sigma [B] in (0, 1)."""
        t = torch.randint(self.min_step, self.max_step, (batch,), generator=rng).double() / 1000
        t = shift_sigmas(t, self.shift).clamp(self.min_step / 1000, self.max_step / 1000)
        return t.float()


def _x0(model, x_t: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    flow = model(x_t, sigma * 1000, cond)
    return FlowMatchingScheduler.x0_from_flow(x_t, flow.float(), sigma)


def distribution_matching_loss(x: torch.Tensor, real_score, fake_score, cond: Conditioning, uncond: Conditioning,
                               guidance_scale: float, steps: DMDTimesteps, rng: torch.Generator,
                               frame_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, float]:
    """(loss, mean |grad|) for the generator's video x [B, 16, F, h, w] (carrying gradients).
    frame_mask [F] bool: the frames the loss covers (LongLive's streaming window: the new frames);
    the scores still see the whole video."""
    with torch.no_grad():
        sigma = steps.draw(x.shape[0], rng).to(x.device)
        noise = torch.randn(x.shape, generator=rng).to(x.device, x.dtype)
        x_t = FlowMatchingScheduler.add_noise(x.detach(), noise, sigma)
        fake = _x0(fake_score, x_t, sigma, cond)
        real_cond = _x0(real_score, x_t, sigma, cond)
        real_uncond = _x0(real_score, x_t, sigma, uncond)
        real = real_cond + (real_cond - real_uncond) * guidance_scale
        normaliser = (x.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        grad = torch.nan_to_num((fake - real) / normaliser)
    if frame_mask is not None:
        keep = frame_mask.to(x.device)
        x, grad, target_x = x[:, :, keep], grad[:, :, keep], x.detach()[:, :, keep]
    else:
        target_x = x.detach()
    loss = 0.5 * F.mse_loss(x.double(), (target_x - grad).double())
    return loss, float(grad.abs().mean())


def critic_loss(x: torch.Tensor, fake_score, cond: Conditioning, steps: DMDTimesteps,
                rng: torch.Generator) -> torch.Tensor:
    """Flow-matching loss of the fake score on the generator's video x (no gradient to the generator)."""
    x = x.detach()
    sigma = steps.draw(x.shape[0], rng).to(x.device)
    noise = torch.randn(x.shape, generator=rng).to(x.device, x.dtype)
    x_t = FlowMatchingScheduler.add_noise(x, noise, sigma)
    flow = fake_score(x_t, sigma * 1000, cond)
    return F.mse_loss(flow.float(), FlowMatchingScheduler.training_target(x, noise).float())
