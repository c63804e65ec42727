"""Score a trained NeRF against the world's ground truth: silhouettes, colors, geometry.

The eight evaluation views are fixed (orbit at 15 degrees elevation, every 45 degrees of
azimuth starting at the object's front), so numbers from different runs compare.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..geometry.cameras import orbit_cameras
from ..geometry.views import view_names
from .metrics import chamfer_distance, color_error, silhouette_iou, speckle

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


def front_only_pixels(truth_albedo: torch.Tensor, truth_mask: torch.Tensor, main: torch.Tensor, accents: torch.Tensor,
                      tolerance: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the truth's front view shows a front-only part: pixels (H, W) bool, and each pixel's accent index (H, W).

    A pixel counts when the ground truth's front view (index 0, azimuth 0) has an accent colour there
    (within `tolerance`, max abs per channel) and its back view (index EVAL_VIEWS // 2, azimuth 180),
    mirrored left-right, has the main colour there. The front and back cameras are each other's
    reflection in the plane x = 0 (objects face +x), so the mirrored back pixel sees the reflection
    of the front point: the spot where a two-faced (Janus) NeRF paints its second face, and where
    the truth shows plain main colour. Parts seen from both sides (the house's red roof and
    chimney, the rocket's fins, the lollipop's stick) fail the test and drop out; the snowman's
    nose, eyes and buttons, the house's door, the rocket's window stay. Decided from the renders,
    not from the scene's part list, because that list does not say which parts face front.
    """
    back = EVAL_VIEWS // 2
    front_truth = truth_albedo[0].permute(1, 2, 0)  # (H, W, 3)
    back_truth = truth_albedo[back].flip(-1).permute(1, 2, 0)
    main = main.to(front_truth)
    distance = (front_truth[..., None, :] - accents.to(front_truth)).abs().amax(-1)  # (H, W, K)
    accent_front = (distance.amin(-1) < tolerance) & (truth_mask[0, 0] > 0.5)
    main_back = ((back_truth - main).abs().amax(-1) < tolerance) & (truth_mask[back, 0].flip(-1) > 0.5)
    return accent_front & main_back, distance.argmin(-1)


def accent_strength(nerf_rgb: torch.Tensor, truth_albedo: torch.Tensor, truth_mask: torch.Tensor, main: torch.Tensor,
                    accents: torch.Tensor, tolerance: float = 0.05) -> dict[str, float] | None:
    """How far the NeRF paints the front-only parts (a snowman's face, a house's door) in front, and on its back.

    The Janus problem (named so by Armandpour et al., Perp-Neg, arXiv:2304.04968): a score-distilled
    NeRF paints the front's face on every side. Measured at
    the pixels P of `front_only_pixels`, with the front (index 0) and the mirrored back (index
    EVAL_VIEWS // 2) NeRF views (albedo). At each pixel the NeRF colour c is projected on the way
    from the main colour to that pixel's true accent colour a:
        s = (c - m_nerf).(a - m) / |a - m|^2,
    0 for the NeRF's own main colour m_nerf (the per-channel median of that NeRF view over the
    pixels where the truth shows the main colour), 1 for the accent colour when m_nerf is the true
    main colour m.
    "front" is the mean of s over P in the front view, "back" the same in the mirrored back view.
    So the truth itself scores 1 / 0, a NeRF with no face 0 / 0, a two-faced one 1 / 1, and a part
    blurred halfway toward the main colour 1/2.

    Two choices keep a missing face from reading high (a doorless house used to score 0.74 / 0.75):
    only front-only parts count (the house's roof, red on both sides, was 85 % of its accent
    pixels), and the reference is the NeRF's own main colour, not the true one (a snowman drifted
    from white to grey would otherwise read as a face: grey lies on the way from white to black).
    Returns None when the scene has no front-only part (no accent colour, or only parts seen from
    both sides: a plain cube, a pine tree).
    """
    if accents.shape[0] == 0:
        return None
    back_index = EVAL_VIEWS // 2
    pixels, nearest = front_only_pixels(truth_albedo, truth_mask, main, accents, tolerance)
    if not pixels.any():
        return None
    main = main.to(truth_albedo)
    direction = accents.to(truth_albedo)[nearest[pixels]] - main  # (P, 3)
    scale = (direction * direction).sum(-1)

    def strength(index):
        rgb, albedo, mask = nerf_rgb[index], truth_albedo[index], truth_mask[index, 0]
        if index == back_index:
            rgb, albedo, mask = rgb.flip(-1), albedo.flip(-1), mask.flip(-1)
        image = rgb.permute(1, 2, 0)
        # the NeRF's main colour: its median where this view's truth is main-coloured (robust to a painted face)
        main_pixels = ((albedo.permute(1, 2, 0) - main).abs().amax(-1) < tolerance) & (mask > 0.5)
        own_main = image[main_pixels].median(0).values if main_pixels.any() else main
        return float((((image[pixels] - own_main) * direction).sum(-1) / scale).mean())

    return {"front": strength(0), "back": strength(back_index),
            "pixels": int(pixels.sum())}


def nearest_color(rgb: torch.Tensor) -> str:
    """The world's colour name nearest an RGB triple (3,) (Euclidean)."""
    from ..world.scenes import COLORS

    names = list(COLORS)
    return names[int((torch.tensor([COLORS[n] for n in names]) - rgb.float().cpu()).norm(dim=-1).argmin())]


@torch.no_grad()
def object_id_map(scene, cameras, truth: dict[str, torch.Tensor]) -> torch.Tensor:
    """Which object of a composition each pixel of its truth render shows (B, H, W): 0 or 1, -1 off the
    object. The hit point (camera ray at the truth's depth) belongs to the object nearest it."""
    from ..geometry.cameras import camera_rays

    origins, dirs = camera_rays(cameras)
    points = (origins + truth["depth"][:, 0, ..., None] * dirs).reshape(-1, 3).float()
    hit = truth["mask"][:, 0].reshape(-1) > 0.5
    ids = torch.full((points.shape[0],), -1, dtype=torch.long)
    ids[hit] = scene.object_ids(points[hit])
    return ids.reshape(truth["mask"][:, 0].shape)


def drawn_mask(images: torch.Tensor, background: float = 1.0, tolerance: float = 0.1) -> torch.Tensor:
    """The pixels of generated images (..., 3, H, W) in [0, 1] that are off the plain background: any
    channel below background - tolerance. (..., H, W) bool. A diffusion sample has no opacity, so this
    is its silhouette; the world's shading keeps a white object's pixels below 0.9 off its lit side."""
    return (images < background - tolerance).any(-3)


def binding_scores(image: torch.Tensor, truth_rgb: torch.Tensor, object_ids: torch.Tensor,
                   background: float = 1.0, tolerance: float = 0.1) -> dict:
    """Does a generated image of a two-object scene give each object its own colour? For an image and the
    truth render from the same camera (both (3, H, W), shaded alike), with `object_ids` (H, W) from
    `object_id_map`: per object i the per-channel median of the image over the truth region R_i, and
    of the truth over R_i. Object i is bound right when the image's median is nearer the truth median
    of R_i than that of the other object's region (Euclidean); `bound` is both right, `None` when the
    two truth medians are within `tolerance` (the same colour: nothing to bind) or one object is hidden. `silhouette_iou` is
    the IoU of the image's pixels off the background (any channel below background - tolerance) and
    the truth's object pixels: a coarse check of the layout, since an image model is conditioned on
    the camera's direction but not its distance."""
    img = image.float().reshape(3, -1)
    ref = truth_rgb.float().reshape(3, -1)
    ids = object_ids.reshape(-1)
    drawn = drawn_mask(image.float(), background, tolerance).reshape(-1)
    solid = ids >= 0
    iou = float((drawn & solid).sum() / (drawn | solid).sum().clamp(min=1))
    regions = [ids == i for i in (0, 1)]
    if not all(r.any() for r in regions):  # one object hides the other from this camera
        return {"bound": None, "objects_right": [None, None], "silhouette_iou": iou}
    truth_med = [ref[:, r].median(1).values for r in regions]
    image_med = [img[:, r].median(1).values for r in regions]
    if float((truth_med[0] - truth_med[1]).norm()) < tolerance:
        return {"bound": None, "objects_right": [None, None], "silhouette_iou": iou}
    right = [bool((image_med[i] - truth_med[i]).norm() < (image_med[i] - truth_med[1 - i]).norm()) for i in (0, 1)]
    return {"bound": all(right), "objects_right": right, "silhouette_iou": iou}


def composition_scores(nerf_rgb: torch.Tensor, nerf_opacity: torch.Tensor, truth_albedo: torch.Tensor,
                       object_ids: torch.Tensor, scene, threshold: float = 0.5) -> list[dict]:
    """Per-object scores of a two-object scene, over all views: is each object there, where, and in its colour.

    The union silhouette cannot tell 'a red cube on top of a blue sphere' from a blue cube on a red
    sphere; T3Bench (He et al., arXiv:2310.02977) scores multi-object prompts per object for that reason.
    For object i with truth region R_i (`object_id_map`: the pixels that show it) and the NeRF's opaque
    pixels O (opacity > threshold):
      color_error: mean absolute albedo error (over channels) on R_i & O, as `metrics.color_error`
                   (1.0 when the NeRF shows nothing there);
      color_right: the world colour nearest the NeRF's per-channel median on the pixels of R_i & O where
                   the truth shows the object's own colour (not its accents: a snowman's buttons) is that colour;
      iou:         IoU of R_i and the NeRF pixels painted like object i: opaque pixels whose colour is nearer
                   object i's palette than the other object's (max abs per channel); a tie (both palettes
                   share the colour) goes to the object whose truth region holds the pixel, and off both
                   regions to neither. A NeRF that swaps the colours scores ~0, one that moves an object
                   loses its overlap.
    `nerf_rgb` and `truth_albedo` (B, 3, H, W), `nerf_opacity` (B, 1, H, W), `object_ids` (B, H, W)."""
    from ..world.scenes import COLORS

    rgb = nerf_rgb.float().permute(0, 2, 3, 1)  # (B, H, W, 3)
    truth = truth_albedo.float().permute(0, 2, 3, 1)
    opaque = nerf_opacity[:, 0].float() > threshold
    palettes = [obj.palette.float() for obj in scene.objects]
    nearness = torch.stack([(rgb[..., None, :] - p).abs().amax(-1).amin(-1) for p in palettes])  # (2, B, H, W)
    tie = (nearness[0] - nearness[1]).abs() < 1e-6
    painted = [opaque & ((nearness[i] < nearness[1 - i]) | (tie & (object_ids == i))) for i in (0, 1)]
    out = []
    for i, obj in enumerate(scene.objects):
        region = object_ids == i
        both = region & opaque
        main = torch.tensor(COLORS[obj.color])
        own = both & ((truth - main).abs().amax(-1) < 1e-3)
        pick = own if own.any() else both
        error = float((rgb[both] - truth[both]).abs().mean()) if both.any() else 1.0
        union = (region | painted[i]).sum()
        out.append({"caption": obj.caption, "color_error": error,
                    "color_right": bool(pick.any()) and nearest_color(rgb[pick].median(0).values) == obj.color,
                    "iou": float((region & painted[i]).sum() / union) if union > 0 else 0.0,
                    "pixels": int(region.sum())})
    return out


@torch.no_grad()
def evaluate_run(field, occupancy, scene, mesh_path: str | Path | None = None, num_samples: int = 64,
                 background: float = 1.0, resolution: int = EVAL_RESOLUTION) -> dict:
    """Per-view silhouette IoU, albedo color error and speckle (`metrics.speckle`), their means (views
    without a flat region leave speckle's), the Janus figure (`accent_strength`; None for a two-object
    Composition), for a Composition each object's scores (`objects`: `composition_scores`) and the
    mesh's Chamfer distance."""
    from ..nerf.render import render_image
    from ..world.mesh import ground_truth_mesh
    from ..world.compositions import Composition
    from ..world.render import render_scene
    from ..world.scenes import COLORS

    cameras = evaluation_cameras(resolution)
    nerf = render_image(field, cameras, occupancy=occupancy, num_samples=num_samples, shading="albedo",
                        background=background)
    nerf = {key: value.cpu() for key, value in nerf.items()}  # a field on a GPU renders there
    truth = render_scene(scene, cameras, background=background)
    iou = silhouette_iou(nerf["opacity"], truth["mask"])
    color = color_error(nerf["rgb"], truth["albedo"], nerf["opacity"], truth["mask"])
    composition = isinstance(scene, Composition)  # two objects: no single main colour to set accents off
    accents = torch.zeros(0, 3) if composition else accent_colors(scene)
    accent_nerf = accent_fraction(nerf["rgb"], nerf["opacity"], accents)
    accent_truth = accent_fraction(truth["albedo"], truth["mask"], accents)
    # Speckle of the field itself, as the mesh's texture bakes it: rendered at the ray midpoints, so that
    # the random sample offsets of the render above (up to a third of its grain) do not count.
    still = render_image(field, cameras, occupancy=occupancy, num_samples=num_samples, shading="albedo",
                         background=background, stratified=False)
    grain = speckle(still["rgb"].cpu(), still["opacity"].cpu(), truth["albedo"], truth["mask"])
    grain_mean = float(grain.nanmean()) if not grain.isnan().all() else None
    metrics = {
        "prompt_scene": scene.caption,
        "iou_mean": float(iou.mean()),
        "color_error_mean": float(color.mean()),
        "speckle": grain_mean,
        "accent_strength": accent_strength(nerf["rgb"], truth["albedo"], truth["mask"], torch.tensor(COLORS[scene.color]),
                                           accents),
        "views": [{"azimuth_deg": float(az), "view": name, "iou": float(i), "color_error": float(c),
                   "speckle": None if g.isnan() else float(g),
                   "accent_fraction": float(an), "accent_fraction_truth": float(at)}
                  for az, name, i, c, g, an, at in zip(cameras.azimuth_deg, view_names(cameras), iou, color, grain,
                                                       accent_nerf, accent_truth)],
    }
    if composition:
        metrics["objects"] = composition_scores(nerf["rgb"], nerf["opacity"], truth["albedo"],
                                                object_id_map(scene, cameras, truth), scene)
    if mesh_path is not None and Path(mesh_path).exists():
        import trimesh

        mesh = trimesh.load(mesh_path, force="mesh")
        chamfer = chamfer_distance(mesh, ground_truth_mesh(scene))
        metrics.update(chamfer=chamfer.mean, chamfer_mesh_to_truth=chamfer.a_to_b, chamfer_truth_to_mesh=chamfer.b_to_a)
    return metrics
