"""The Teacher protocol: what solvers, score distillation and students may ask of a teacher.

They talk to teachers only through this file (and the schedule in `schedule.py`), so that a
pixel-space oracle, our embedded network and a Stable Diffusion checkpoint are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .schedule import NoiseSchedule


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
