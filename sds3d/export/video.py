"""Turntable videos and image files from a renderer, written atomically.

`render_fn(camera) -> dict` with "rgb" (B, 3, H, W) in [0, 1] is all this needs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import imageio.v2 as imageio
import numpy as np
import torch

from ..nerf.cameras import orbit_cameras
from ..io import atomic_path


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    image = torch.as_tensor(image).detach().float().cpu().clamp(0.0, 1.0)
    return (image.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)


def image_grid(images: torch.Tensor, ncols: int | None = None) -> torch.Tensor:
    """(B, 3, H, W) -> (3, rows*H, ncols*W), row by row, unused cells black; ncols defaults to ceil(sqrt(B))."""
    b, c, h, w = images.shape
    ncols = ncols or math.ceil(math.sqrt(b))
    nrows = math.ceil(b / ncols)
    grid = images.new_zeros(nrows * ncols, c, h, w)
    grid[:b] = images
    return grid.reshape(nrows, ncols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, nrows * h, ncols * w)


def save_image(path: str | os.PathLike, image: torch.Tensor, ncols: int | None = None) -> Path:
    """Write a PNG of one image (3, H, W) or a grid of a batch (B, 3, H, W), values in [0, 1]."""
    image = torch.as_tensor(image).detach()
    if image.dim() == 4:
        image = image_grid(image, ncols)
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image (3, H, W) or a batch (B, 3, H, W), got shape {tuple(image.shape)}")
    path = Path(path)
    with atomic_path(path) as tmp:
        imageio.imwrite(tmp, to_uint8(image), format="png")
    return path


def _even(frame: np.ndarray) -> np.ndarray:
    """H.264 in yuv420p needs even sides: repeat the last row/column where one is odd."""
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def write_turntable(render_fn: Callable, path: str | os.PathLike, n_frames: int = 60, resolution: int = 128,
                    elevation_deg: float = 15.0, distance: float = 2.75, fovy_deg: float = 45.0,
                    fps: int = 20) -> Path:
    """Render `n_frames` views evenly spaced in azimuth (starting at the front) and write an MP4.

    One camera per render_fn call keeps memory flat at any resolution; ffmpeg comes from imageio-ffmpeg.
    """
    cameras = orbit_cameras(n_frames, resolution, elevation_deg, distance, fovy_deg)
    path = Path(path)
    with atomic_path(path) as tmp:
        # macro_block_size=1: never let imageio rescale frames; _even handles the only H.264 constraint.
        writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
                                    macro_block_size=1, ffmpeg_log_level="error")
        try:
            with torch.no_grad():
                for i in range(n_frames):
                    rgb = render_fn(cameras[i])["rgb"]
                    writer.append_data(_even(to_uint8(rgb[0])))
        finally:
            writer.close()
    return path
