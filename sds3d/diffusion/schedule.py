"""The discrete variance-preserving noise schedule and its conversions (DDPM / diffusers convention).

For integer timesteps t in [0, T),
    x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps,   sigma_t = sqrt((1 - abar_t) / abar_t),
and a network predicts eps, x_0 or v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x_0
(Salimans & Ho 2022, eq. 11-12 for v). Teachers, solvers, score losses and trainers all use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars (B,) broadcast against a batch of images (B, C, H, W)."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


@dataclass
class NoiseSchedule:
    """Discrete VP schedule given by `alphas_cumprod` (T,), plus the conversions between parameterizations."""

    alphas_cumprod: torch.Tensor

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """DDPM's linear betas (pixel-space models: DDPM, DeepFloyd IF use this family)."""
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        return cls(torch.cumprod(1.0 - betas, 0).float())

    @classmethod
    def scaled_linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> "NoiseSchedule":
        """Stable Diffusion's betas: linear in sqrt(beta)."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1.0 - betas, 0).float())

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        """Nichol & Dhariwal's cosine schedule ("squaredcos_cap_v2" in diffusers)."""
        steps = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        f = torch.cos((steps + s) / (1 + s) * torch.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
        return cls(torch.cumprod(1.0 - betas, 0).float())

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(t.device)[t.long()]

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma_t = sqrt((1 - abar) / abar): the noise level of the equivalent variance-exploding process."""
        a = self.abar(t)
        return ((1 - a) / a).sqrt()

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        a = self.abar(t)
        return torch.log(a) - torch.log1p(-a)

    def t_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The nearest discrete timestep to a continuous sigma."""
        all_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt().to(sigma.device)
        return (all_sigmas.log()[None, :] - sigma.log().reshape(-1, 1)).abs().argmin(-1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = _expand(self.abar(t), x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def eps_to_x0(self, x_t, eps, t):
        a = _expand(self.abar(t), x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def x0_to_eps(self, x_t, x0, t):
        a = _expand(self.abar(t), x_t)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    def v_to_eps(self, x_t, v, t):
        a = _expand(self.abar(t), x_t)
        return a.sqrt() * v + (1 - a).sqrt() * x_t

    def v_to_x0(self, x_t, v, t):
        a = _expand(self.abar(t), x_t)
        return a.sqrt() * x_t - (1 - a).sqrt() * v

    def velocity(self, x0, noise, t):
        """The v-prediction target for x0 and its noise."""
        a = _expand(self.abar(t), x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def to_eps(self, x_t, prediction, t, prediction_type: str) -> torch.Tensor:
        """Any network output ('epsilon', 'sample' = x0, or 'v_prediction') as an eps prediction."""
        if prediction_type == "epsilon":
            return prediction
        if prediction_type == "sample":
            return self.x0_to_eps(x_t, prediction, t)
        if prediction_type == "v_prediction":
            return self.v_to_eps(x_t, prediction, t)
        raise ValueError(f"unknown prediction_type {prediction_type!r}: allowed are 'epsilon', 'sample', 'v_prediction'")


def make_schedule(name: str, num_train_timesteps: int = 1000) -> NoiseSchedule:
    if name == "cosine":
        return NoiseSchedule.cosine(num_train_timesteps)
    if name == "linear":
        return NoiseSchedule.linear(num_train_timesteps)
    if name == "scaled_linear":
        return NoiseSchedule.scaled_linear(num_train_timesteps)
    raise ValueError(f"unknown schedule {name!r}: allowed are 'cosine', 'linear', 'scaled_linear'")


def min_snr_weights(schedule: NoiseSchedule, t: torch.Tensor, prediction_type: str, gamma: float | None) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al., 2023, eq. 9-10) for the plain MSE of each parameterization:
    min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v, min(SNR, gamma) for x0."""
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unknown prediction_type {prediction_type!r}: allowed are 'epsilon', 'sample', 'v_prediction'")
    if gamma is None:
        return torch.ones(t.shape[0], device=t.device)
    snr = schedule.abar(t) / (1 - schedule.abar(t))
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped  # x0


def sample_timesteps(batch: int, num_train_timesteps: int, t_min: float, t_max: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer timesteps uniform in [t_min * T, t_max * T] (inclusive), one per image."""
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise ValueError(f"timestep range must satisfy 0 <= t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
    lo = int(t_min * num_train_timesteps)
    hi = max(lo, min(int(t_max * num_train_timesteps), num_train_timesteps - 1))
    return torch.randint(lo, hi + 1, (batch,), generator=generator)


def stratified_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """One uniform timestep per stratum of [0, T): lower-variance than i.i.d. uniform draws."""
    u = (torch.arange(batch) + torch.rand(batch, generator=generator)) / batch
    perm = torch.randperm(batch, generator=generator)
    return (u[perm] * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
