"""The Teacher protocol and the discrete variance-preserving noise schedule it lives on.

Solvers, score distillation and students talk to teachers only through this file, so that a
pixel-space oracle, our embedded network and a Stable Diffusion checkpoint are interchangeable.

Noise convention (DDPM / diffusers): for integer timesteps t in [0, T),
    x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps,   sigma_t = sqrt((1 - abar_t) / abar_t),
and a network predicts eps, x_0 or v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x_0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

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


@dataclass
class Cond:
    """Encoded prompts for one batch: one row per image, conditional and unconditional.

    `cond` / `uncond` are whatever the teacher's network consumes (text embeddings, or for the
    oracle the index of an image bank); `prompts` keeps the text for logs and caching.
    `extra["background"]` (B, 3), when set, is the solid background the images were rendered
    over; teachers that model the background explicitly (the oracle) use it, networks ignore it.
    """

    prompts: list[str]
    cond: Any
    uncond: Any
    extra: dict = field(default_factory=dict)


@runtime_checkable
class Teacher(Protocol):
    """What every teacher offers. Images at the API boundary are (B, 3, H, W) in [0, 1]."""

    schedule: NoiseSchedule
    resolution: int
    channels: int
    dtype: torch.dtype
    device: torch.device
    network: torch.nn.Module | None

    def encode_prompt(self, prompts: list[str], negative: list[str] | None = None) -> Cond:
        """Text -> conditioning, cached by prompt."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] at any size -> the teacher's model space (differentiable)."""

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [0, 1]."""

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, guidance_scale: float = 1.0) -> torch.Tensor:
        """Guided noise prediction, diffusers convention: uncond + s * (cond - uncond)."""


def pixels_to_model(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Images in [0, 1] at any size -> a pixel teacher's space: resized (antialiased) to its resolution, in [-1, 1]."""
    if images.shape[-1] != resolution or images.shape[-2] != resolution:
        images = torch.nn.functional.interpolate(images, (resolution, resolution), mode="bilinear",
                                                 align_corners=False, antialias=True)
    return images * 2 - 1


def model_to_pixels(x: torch.Tensor) -> torch.Tensor:
    """A pixel teacher's space [-1, 1] -> images in [0, 1]."""
    return ((x + 1) / 2).clamp(0, 1)


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance as diffusers writes it."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)
