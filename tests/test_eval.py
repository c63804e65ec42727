"""Metrics against closed-form answers: disc overlaps, constructed color errors, concentric spheres."""

import math

import numpy as np
import pytest
import torch
import trimesh

from sds3d.eval import chamfer_distance, color_error, silhouette_iou

SIZE = 400  # pixels over [-1, 1]^2


def pixel_centres():
    c = (torch.arange(SIZE, dtype=torch.float64) + 0.5) / SIZE * 2.0 - 1.0
    return torch.meshgrid(c, c, indexing="ij")


def disc(cx, cy, r, value=1.0):
    y, x = pixel_centres()
    return (((x - cx) ** 2 + (y - cy) ** 2 <= r * r).float() * value)[None]  # (1, H, W)


def lens_area(r1, r2, d):
    """Area of the intersection of two discs with radii r1, r2 whose centres are d apart."""
    if d >= r1 + r2:
        return 0.0
    if d <= abs(r1 - r2):
        return math.pi * min(r1, r2) ** 2
    a1 = r1 * r1 * math.acos((d * d + r1 * r1 - r2 * r2) / (2 * d * r1))
    a2 = r2 * r2 * math.acos((d * d + r2 * r2 - r1 * r1) / (2 * d * r2))
    kite = 0.5 * math.sqrt((-d + r1 + r2) * (d + r1 - r2) * (d - r1 + r2) * (d + r1 + r2))
    return a1 + a2 - kite


def disc_iou(r1, r2, d):
    inter = lens_area(r1, r2, d)
    return inter / (math.pi * r1 * r1 + math.pi * r2 * r2 - inter)


def test_silhouette_iou_of_discs():
    cases = [  # (centre 1, r1, centre 2, r2)
        ((-0.2, 0.0), 0.5, (0.3, 0.1), 0.4),  # partial overlap
        ((0.0, 0.0), 0.6, (0.1, -0.1), 0.3),  # one inside the other
        ((-0.5, 0.0), 0.3, (0.5, 0.0), 0.3),  # disjoint
        ((0.1, 0.2), 0.45, (0.1, 0.2), 0.45),  # identical
    ]
    pred = torch.stack([disc(*c1, r1) for c1, r1, _, _ in cases])  # (B, 1, H, W)
    gt = torch.stack([disc(*c2, r2) for _, _, c2, r2 in cases])
    iou = silhouette_iou(pred, gt)
    expected = [disc_iou(r1, r2, math.dist(c1, c2)) for c1, r1, c2, r2 in cases]
    assert iou.shape == (4,)
    assert 0.1 < expected[0] < 0.6  # the partial case is a real test of the lens formula
    # Pixel discs differ from true discs by about a pixel along the rim: well under 1% here.
    np.testing.assert_allclose(iou.numpy(), expected, atol=0.01)
    assert iou[2] == 0.0 and iou[3] == 1.0


def test_silhouette_iou_threshold_and_shapes():
    pred = disc(0.0, 0.0, 0.5, value=0.6)  # a soft mask
    gt = disc(0.0, 0.0, 0.5)
    assert silhouette_iou(pred[None], gt[None]).item() == 1.0
    assert silhouette_iou(pred[None], gt[None], threshold=0.7).item() == 0.0
    assert silhouette_iou(pred, gt).item() == 1.0  # (B, H, W) masks work too
    empty = torch.zeros(1, 1, 8, 8)
    assert silhouette_iou(empty, empty).item() == 1.0  # both empty: they agree


def test_color_error_known_answer():
    gen = torch.Generator().manual_seed(0)
    gt = torch.rand(3, 3, 32, 32, generator=gen)
    pred_mask = torch.zeros(3, 1, 32, 32)
    gt_mask = torch.zeros(3, 1, 32, 32)
    pred_mask[:, :, :20] = 1.0  # rows 0..19
    gt_mask[:, :, 10:] = 1.0  # rows 10..31: both masks on rows 10..19
    pred = torch.rand(3, 3, 32, 32, generator=gen)  # garbage outside the intersection
    # Image 0: off by 0.2 in every channel inside the intersection.
    pred[0, :, 10:20] = gt[0, :, 10:20] + 0.2
    # Image 1: off by 0.3 in red only, left half of the intersection; exact elsewhere.
    pred[1, :, 10:20] = gt[1, :, 10:20]
    pred[1, 0, 10:20, :16] -= 0.3
    # Image 2: masks do not overlap at all.
    gt_mask[2] = 0.0
    gt_mask[2, :, 25:] = 1.0
    err = color_error(pred, gt, pred_mask, gt_mask)
    assert err.shape == (3,)
    np.testing.assert_allclose(err.numpy(), [0.2, 0.3 / 3 / 2, 1.0], atol=1e-6)


def test_chamfer_concentric_spheres():
    r1, r2 = 0.5, 0.7
    a = trimesh.creation.icosphere(subdivisions=4, radius=r1)
    b = trimesh.creation.icosphere(subdivisions=4, radius=r2)
    result = chamfer_distance(a, b)
    assert result.a_to_b == pytest.approx(r2 - r1, rel=0.02)
    assert result.b_to_a == pytest.approx(r2 - r1, rel=0.02)
    assert result.mean == pytest.approx(0.5 * (result.a_to_b + result.b_to_a))
    assert chamfer_distance(a, a).mean == pytest.approx(0.0, abs=1e-9)
    assert chamfer_distance(a, b) == result  # seeded


def test_chamfer_directions():
    # B = A's sphere plus a far-away ball: only B -> A sees the extra part.
    a = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    extra = trimesh.creation.icosphere(subdivisions=3, radius=0.1)
    extra.apply_translation([3.0, 0.0, 0.0])
    b = trimesh.util.concatenate([a.copy(), extra])
    result = chamfer_distance(a, b, n_points=20000)
    assert result.a_to_b < 0.01
    # Independent estimate: distance of B's surface to the analytic sphere |x| = 0.5.
    points, _ = trimesh.sample.sample_surface(b, 200000, seed=123)
    reference = np.abs(np.linalg.norm(points, axis=1) - 0.5).mean()
    assert reference > 0.03
    assert result.b_to_a == pytest.approx(reference, rel=0.15)


def test_accent_strength_of_truth_janus_and_blank_snowmen():
    """The world's own renders as a 'NeRF' paint the face fully in front (1) and not on the back (0);
    a two-faced snowman (its front view mirrored onto its back) scores 1 on the back; a plain white
    one 0 in front; a face blended halfway toward white 0.5."""
    from sds3d.eval.ground_truth import EVAL_VIEWS, accent_colors, accent_strength, evaluation_cameras
    from sds3d.world.render import render_scene
    from sds3d.world.scenes import COLORS
    from sds3d.world.prompts import resolve_prompt

    scene = resolve_prompt("a snowman")
    truth = render_scene(scene, evaluation_cameras(64), background=1.0)
    albedo, mask = truth["albedo"], truth["mask"]
    main, accents = torch.tensor(COLORS[scene.color]), accent_colors(scene)
    assert len(accents) == 2  # orange nose, black eyes and buttons
    image = albedo * mask + (1 - mask)

    exact = accent_strength(image, albedo, mask, main, accents)
    assert exact["front"] == pytest.approx(1.0, abs=0.05) and abs(exact["back"]) < 0.05 and exact["pixels"] > 5
    janus = image.clone()
    janus[EVAL_VIEWS // 2] = image[0].flip(-1)
    assert accent_strength(janus, albedo, mask, main, accents)["back"] == pytest.approx(exact["front"], abs=1e-6)
    blank = torch.where(mask > 0.5, main[None, :, None, None], torch.ones_like(image))
    assert abs(accent_strength(blank, albedo, mask, main, accents)["front"]) < 1e-6
    half = 0.5 * image + 0.5 * blank
    assert accent_strength(half, albedo, mask, main, accents)["front"] == pytest.approx(0.5 * exact["front"], abs=1e-5)
    assert accent_strength(image, albedo, mask, main, accents[:0]) is None  # a plain cube has no accents
