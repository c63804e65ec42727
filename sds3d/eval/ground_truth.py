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


def accent_colors(scene) -> torch.Tensor:
    """Colours (K, 3) of the parts not painted in the scene's main colour: a snowman's nose, a door."""
    from ..world.scenes import COLORS

    main = torch.tensor(COLORS[scene.color])
    palette = scene.palette
    return palette[(palette - main).abs().amax(-1) > 1e-6].unique(dim=0)


def accent_fraction(images: torch.Tensor, masks: torch.Tensor, accents: torch.Tensor, tolerance: float = 0.2) -> torch.Tensor:
    """Share of object pixels (mask > 0.5) within `tolerance` (max abs per channel) of an accent colour, per image.

    Front-only parts (the snowman's nose) must show from the front and not from the back: a NeRF
    with the Janus problem paints them on both sides.
    """
    if accents.shape[0] == 0:
        return torch.zeros(images.shape[0])
    pixels = images.permute(0, 2, 3, 1)[..., None, :]  # (B, H, W, 1, 3)
    near = ((pixels - accents.to(images)).abs().amax(-1) < tolerance).any(-1)
    inside = masks[:, 0] > 0.5
    return (near & inside).flatten(1).sum(1) / inside.flatten(1).sum(1).clamp_min(1)


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
    nerf = {key: value.cpu() for key, value in nerf.items()}  # a field on a GPU renders there
    truth = render_scene(scene, cameras, background=background)
    iou = silhouette_iou(nerf["opacity"], truth["mask"])
    color = color_error(nerf["rgb"], truth["albedo"], nerf["opacity"], truth["mask"])
    accents = accent_colors(scene)
    accent_nerf = accent_fraction(nerf["rgb"], nerf["opacity"], accents)
    accent_truth = accent_fraction(truth["albedo"], truth["mask"], accents)
    metrics = {
        "prompt_scene": scene.caption,
        "iou_mean": float(iou.mean()),
        "color_error_mean": float(color.mean()),
        "views": [{"azimuth_deg": float(az), "view": name, "iou": float(i), "color_error": float(c),
                   "accent_fraction": float(an), "accent_fraction_truth": float(at)}
                  for az, name, i, c, an, at in zip(cameras.azimuth_deg, view_names(cameras), iou, color,
                                                    accent_nerf, accent_truth)],
    }
    if mesh_path is not None and Path(mesh_path).exists():
        import trimesh

        mesh = trimesh.load(mesh_path, force="mesh")
        chamfer = chamfer_distance(mesh, ground_truth_mesh(scene))
        metrics.update(chamfer=chamfer.mean, chamfer_mesh_to_truth=chamfer.a_to_b, chamfer_truth_to_mesh=chamfer.b_to_a)
    return metrics
