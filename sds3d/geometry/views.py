"""DreamFusion / threestudio view buckets of cameras.

"overhead" above 60 degrees elevation, else "front" within 45 degrees of azimuth 0, "back" within
45 degrees of azimuth 180, "side" between. Teachers append the bucket to the prompt ("a red cube,
front view"); the world's captions and the oracle's image banks are split by the same rule.
"""

from __future__ import annotations

import torch

from .cameras import Camera

VIEW_NAMES = ("front", "side", "back", "overhead")
OVERHEAD_ELEVATION_DEG = 60.0
FRONT_HALF_ANGLE_DEG = 45.0


def wrap_azimuth(azimuth_deg: torch.Tensor) -> torch.Tensor:
    """Azimuth in (-180, 180]."""
    return -((-torch.as_tensor(azimuth_deg, dtype=torch.float32) + 180.0) % 360.0 - 180.0)


def view_name(elevation_deg: float, azimuth_deg: float) -> str:
    """DreamFusion view bucket of one camera: 'front', 'side', 'back' or 'overhead'."""
    if float(elevation_deg) > OVERHEAD_ELEVATION_DEG:
        return "overhead"
    az = abs(float(wrap_azimuth(torch.tensor(azimuth_deg))))
    if az <= FRONT_HALF_ANGLE_DEG:
        return "front"
    if az >= 180.0 - FRONT_HALF_ANGLE_DEG:
        return "back"
    return "side"


def view_names(camera: Camera) -> list[str]:
    return [view_name(e, a) for e, a in zip(camera.elevation_deg.tolist(), camera.azimuth_deg.tolist())]
