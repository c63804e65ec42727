"""Lambertian shading under a light tied to the camera: the one rule the world renders its data
with and the NeRF shades with, so that "lambertian" renders and the teacher's data agree."""

from __future__ import annotations

import torch

from .cameras import Camera


def light_direction(camera: Camera, elevation_offset_deg: float = 30.0, azimuth_offset_deg: float = 30.0) -> torch.Tensor:
    """A light above and to the side of each camera (B, 3), unit, pointing from the scene to the light.

    The world renders its training images under this light; the NeRF shades with the same rule,
    so that 'lambertian' renders and the teacher's data agree.
    """
    el = camera.elevation_deg + elevation_offset_deg
    az = camera.azimuth_deg + azimuth_offset_deg
    el_r, az_r = torch.deg2rad(el.clamp(-89.0, 89.0)), torch.deg2rad(az)
    return torch.stack([torch.cos(el_r) * torch.cos(az_r), torch.cos(el_r) * torch.sin(az_r), torch.sin(el_r)], -1)


def shade_lambertian(albedo: torch.Tensor, normals: torch.Tensor, light: torch.Tensor, ambient: float = 0.5) -> torch.Tensor:
    """albedo * (ambient + (1 - ambient) * max(0, n . l)); channels last, batch first, light (B, 3)."""
    light = light.reshape(light.shape[0], *([1] * (normals.dim() - 2)), 3)
    cos = (normals * light).sum(-1, keepdim=True).clamp_min(0.0)
    return albedo * (ambient + (1.0 - ambient) * cos)
