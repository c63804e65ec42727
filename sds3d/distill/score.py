"""Score distillation losses on images: the core shared by NeRFs and image students.

Every loss takes images in [0, 1] from any differentiable generator, asks a frozen teacher for a
noise prediction and returns a scalar whose gradient w.r.t. the images is the distillation
gradient. They use the Teacher protocol only (teachers/base.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..teachers.base import Cond
from .schedules import sample_timesteps


class NonFiniteGradientError(FloatingPointError):
    """Raised when the distillation gradient holds NaN or Inf, so training stops before parameters are ruined."""


@dataclass
class ScoreOutput:
    loss: torch.Tensor
    grad_norm: float
    timesteps: torch.Tensor


def dreamfusion_weight(abar: torch.Tensor) -> torch.Tensor:
    """w(t) = 1 - abar_t, DreamFusion's weighting (sigma_t^2 of the VP process)."""
    return 1.0 - abar


def sds_loss(teacher, images: torch.Tensor, cond: Cond, guidance_scale: float = 100.0, t_min: float = 0.02,
             t_max: float = 0.98, generator: torch.Generator | None = None,
             timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> ScoreOutput:
    """Score Distillation Sampling (Poole et al., 2022).

    grad = w(t) (eps_hat(x_t; y, t) - eps), applied through the surrogate
    0.5 * |x - stopgrad(x - grad)|^2 summed per image and averaged over the batch (threestudio's form),
    so the gradient w.r.t. the teacher's input x is exactly `grad` and nothing flows through the teacher.
    """
    x = teacher.encode(images)
    batch = x.shape[0]
    schedule = teacher.schedule
    if timesteps is None:
        timesteps = sample_timesteps(batch, schedule.num_train_timesteps, t_min, t_max, generator)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    with torch.no_grad():
        x_t = schedule.add_noise(x.detach(), noise, timesteps)
        eps_hat = teacher.predict_eps(x_t, timesteps, cond, guidance_scale)
        w = dreamfusion_weight(schedule.abar(timesteps)).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        grad = w * (eps_hat - noise)
    if not torch.isfinite(grad).all():
        raise NonFiniteGradientError(
            f"SDS gradient is not finite at timesteps {timesteps.tolist()}: the renders or the teacher produced NaN/Inf")
    target = (x - grad).detach()
    loss = 0.5 * ((x - target) ** 2).sum() / batch
    return ScoreOutput(loss=loss, grad_norm=float(grad.flatten(1).norm(dim=1).mean()), timesteps=timesteps)
