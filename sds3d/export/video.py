"""Turntable videos and image files from a renderer, written atomically.

`render_fn(camera) -> dict` with "rgb" (B, 3, H, W) in [0, 1] is all this needs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import imageio.v2 as imageio
import numpy as np
import torch

from ..geometry.cameras import orbit_cameras
from ..io import atomic_path, to_uint8


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
