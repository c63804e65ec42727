"""Score a trained NeRF against the world's ground truth: silhouettes, colors, geometry.

The eight evaluation views are fixed (orbit at 15 degrees elevation, every 45 degrees of
azimuth starting at the object's front), so numbers from different runs compare.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..geometry.cameras import orbit_cameras
from ..geometry.views import view_names
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


def accent_strength(nerf_rgb: torch.Tensor, truth_albedo: torch.Tensor, truth_mask: torch.Tensor, main: torch.Tensor,
                    accents: torch.Tensor, tolerance: float = 0.05) -> dict[str, float] | None:
    """How far the NeRF paints the front-only parts (a snowman's nose, eyes, buttons) in front, and on its back.

    Takes the front (index 0, azimuth 0) and back (index EVAL_VIEWS // 2, azimuth 180) evaluation
    views. The accent pixels are those of the ground-truth front view within `tolerance` of an
    accent colour. At each, the NeRF colour c is projected on the way from the main colour m to
    that pixel's accent colour a: (c - m).(a - m) / |a - m|^2, 1 for the accent colour, 0 for the
    main colour. "front" is the mean over the accent pixels in the front view; "back" the same at
    the mirrored pixels of the back view, where a two-faced (Janus) NeRF paints a second face.
    Unlike `accent_fraction`, a part that is there but blurred toward the main colour counts in part.
    Returns None when the scene has no accent colours.
    """
    if accents.shape[0] == 0:
        return None
    back_index = EVAL_VIEWS // 2
    truth = truth_albedo[0].permute(1, 2, 0)  # (H, W, 3)
    distance = (truth[..., None, :] - accents.to(truth)).abs().amax(-1)  # (H, W, K)
    nearest = distance.argmin(-1)
    pixels = (distance.amin(-1) < tolerance) & (truth_mask[0, 0] > 0.5)
    if not pixels.any():
        return None
    direction = accents.to(truth)[nearest[pixels]] - main  # (P, 3)
    scale = (direction * direction).sum(-1)

    def strength(rgb):
        c = rgb.permute(1, 2, 0)[pixels]
        return float((((c - main) * direction).sum(-1) / scale).mean())

    return {"front": strength(nerf_rgb[0]), "back": strength(nerf_rgb[back_index].flip(-1)),
            "pixels": int(pixels.sum())}


@torch.no_grad()
def evaluate_run(field, occupancy, scene, mesh_path: str | Path | None = None, num_samples: int = 64,
                 background: float = 1.0, resolution: int = EVAL_RESOLUTION) -> dict:
    """Per-view silhouette IoU and albedo color error, their means, and the mesh's Chamfer distance."""
    from ..nerf.render import render_image
    from ..world.mesh import ground_truth_mesh
    from ..world.render import render_scene
    from ..world.scenes import COLORS

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
        "accent_strength": accent_strength(nerf["rgb"], truth["albedo"], truth["mask"], torch.tensor(COLORS[scene.color]),
                                           accents),
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
