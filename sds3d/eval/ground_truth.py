"""Score a trained NeRF against the world's ground truth: silhouettes, colors, geometry.

The eight evaluation views are fixed (orbit at 15 degrees elevation, every 45 degrees of
azimuth starting at the object's front), so numbers from different runs compare.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..nerf.cameras import orbit_cameras, view_names
from .metrics import chamfer_distance, color_error, silhouette_iou

EVAL_VIEWS = 8
EVAL_RESOLUTION = 128


def evaluation_cameras(resolution: int = EVAL_RESOLUTION):
    return orbit_cameras(EVAL_VIEWS, resolution, elevation_deg=15.0, distance=2.75, fovy_deg=45.0)


@torch.no_grad()
def evaluate_run(field, occupancy, scene, mesh_path: str | Path | None = None, num_samples: int = 64,
                 background: float = 1.0, resolution: int = EVAL_RESOLUTION) -> dict:
    """Per-view silhouette IoU and albedo color error, their means, and the mesh's Chamfer distance."""
    from ..nerf.render import render_image
    from ..world.mesh import ground_truth_mesh
    from ..world.render import render_scene

    cameras = evaluation_cameras(resolution)
    nerf = render_image(field, cameras, occupancy=occupancy, num_samples=num_samples, shading="albedo",
                        background=background)
    truth = render_scene(scene, cameras, background=background)
    iou = silhouette_iou(nerf["opacity"], truth["mask"])
    color = color_error(nerf["rgb"], truth["albedo"], nerf["opacity"], truth["mask"])
    metrics = {
        "prompt_scene": scene.caption,
        "iou_mean": float(iou.mean()),
        "color_error_mean": float(color.mean()),
        "views": [{"azimuth_deg": float(az), "view": name, "iou": float(i), "color_error": float(c)}
                  for az, name, i, c in zip(cameras.azimuth_deg, view_names(cameras), iou, color)],
    }
    if mesh_path is not None and Path(mesh_path).exists():
        import trimesh

        mesh = trimesh.load(mesh_path, force="mesh")
        chamfer = chamfer_distance(mesh, ground_truth_mesh(scene))
        metrics.update(chamfer=chamfer.mean, chamfer_mesh_to_truth=chamfer.a_to_b, chamfer_truth_to_mesh=chamfer.b_to_a)
    return metrics
