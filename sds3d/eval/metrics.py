"""Metrics against a known object: silhouettes, colors and geometry.

Masks are (B, 1, H, W) or (B, H, W) in [0, 1]; images (B, 3, H, W) in [0, 1]. Per-image metrics
return (B,) float tensors so callers can report a mean, a worst view or a per-view table.
"""

from __future__ import annotations

from typing import NamedTuple

import scipy.spatial
import torch
import trimesh


def _binary(mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, 1, H, W) or (B, H, W) soft mask -> (B, H*W) bool."""
    mask = torch.as_tensor(mask).detach().float()
    return (mask > threshold).reshape(mask.shape[0], -1)


def silhouette_iou(pred_mask: torch.Tensor, gt_mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Intersection over union of the masks binarised at `threshold`, per image (B,).

    Two empty silhouettes agree perfectly: their IoU is 1.0 rather than 0/0.
    """
    pred, gt = _binary(pred_mask, threshold), _binary(gt_mask, threshold)
    intersection = (pred & gt).sum(-1).float()
    union = (pred | gt).sum(-1).float()
    return torch.where(union > 0, intersection / union.clamp_min(1.0), torch.ones_like(union))


def color_error(pred_rgb: torch.Tensor, gt_rgb: torch.Tensor, pred_mask: torch.Tensor, gt_mask: torch.Tensor,
                threshold: float = 0.5) -> torch.Tensor:
    """Mean absolute error over the pixels inside both masks (and over channels), per image (B,).

    Colors are only comparable where both images show the object. Where the masks do not overlap
    at all the error is 1.0, the worst possible for [0, 1] colors, instead of NaN: a view that misses
    the object entirely should score as badly as possible, not drop out of an average.
    """
    both = (_binary(pred_mask, threshold) & _binary(gt_mask, threshold)).float()  # (B, H*W)
    pred = torch.as_tensor(pred_rgb).detach().float()
    gt = torch.as_tensor(gt_rgb).detach().float()
    b, c = pred.shape[:2]
    abs_err = (pred - gt).abs().reshape(b, c, -1).mean(1)  # (B, H*W), mean over channels
    count = both.sum(-1)
    mean = (abs_err * both).sum(-1) / count.clamp_min(1.0)
    return torch.where(count > 0, mean, torch.ones_like(mean))


def _erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, 1, H, W) bool -> bool: True where the whole (2 radius + 1)^2 square around the pixel is True
    (pixels beyond the image's edge count as False)."""
    if radius == 0:
        return mask
    padded = torch.nn.functional.pad((~mask).float(), (radius,) * 4, value=1.0)
    return torch.nn.functional.max_pool2d(padded, 2 * radius + 1, stride=1) == 0


def uniform_interior(gt_rgb: torch.Tensor, gt_mask: torch.Tensor, erosion: int = 2, threshold: float = 0.5,
                     tolerance: float = 1e-4) -> torch.Tensor:
    """(B, H, W) bool: pixels of the ground truth whose (2 erosion + 1)^2 square lies inside the mask and
    has one colour (every channel's max - min over the square below `tolerance`).

    That is the object's uniformly coloured regions eroded by `erosion` pixels: edges between parts
    and silhouette borders are left out."""
    gt = torch.as_tensor(gt_rgb).detach().float()
    inside = torch.as_tensor(gt_mask).detach().float().reshape(gt.shape[0], 1, *gt.shape[-2:]) > threshold
    k = 2 * erosion + 1
    spread = (torch.nn.functional.max_pool2d(gt, k, stride=1, padding=erosion)
              + torch.nn.functional.max_pool2d(-gt, k, stride=1, padding=erosion))  # max - min per channel
    return ((spread.amax(1, keepdim=True) < tolerance) & _erode(inside, erosion))[:, 0]


def speckle(pred_rgb: torch.Tensor, pred_mask: torch.Tensor, gt_rgb: torch.Tensor, gt_mask: torch.Tensor,
            erosion: int = 2, window: int = 3, threshold: float = 0.5) -> torch.Tensor:
    """Grain of the predicted colours where the ground truth is one flat colour, per image (B,).

    At every pixel p of `uniform_interior(gt_rgb, gt_mask, erosion)` where the prediction is opaque
    (pred_mask > threshold over p's whole `window` square, so that no background leaks into the
    mean), the deviation d(p) = c(p) - mean of c over p's `window` x `window` square is taken per
    channel; the score is the RMS sqrt(mean over those pixels and the 3 channels of d^2). Local on
    purpose: a flat colour offset is colour error (`color_error`), and a smooth shading-like ramp
    scores 0 too (the box mean of a linear function is its centre value); what remains is
    pixel-to-pixel noise, which bakes into a texture as a sandpaper grain. For i.i.d. noise of std s
    per channel on a flat colour, E[d^2] = s^2 (1 - 1/window^2).
    `erosion` must be at least window // 2, so that every square lies inside one flat region. NaN
    for an image with no such pixel (callers average with nanmean).
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"speckle window must be an odd number of pixels >= 1, got {window}")
    if erosion < window // 2:
        raise ValueError(f"speckle erosion ({erosion} px) must be at least window // 2 ({window // 2} px), so that "
                         f"each {window}x{window} square stays inside one flat region")
    pred = torch.as_tensor(pred_rgb).detach().float()
    b = pred.shape[0]
    opaque = torch.as_tensor(pred_mask).detach().float().reshape(b, 1, *pred.shape[-2:]) > threshold
    pixels = uniform_interior(gt_rgb, gt_mask, erosion, threshold) & _erode(opaque, window // 2)[:, 0]  # (B, H, W)
    # d(p) = mean over the square of (c(p) - c(q)): exactly 0 on a flat colour, unlike c(p) - avg_pool(c)(p).
    # torch.roll wraps at the image's edges, which only pixels of no selected square reach.
    r = window // 2
    deviation = sum(pred - pred.roll((dy, dx), dims=(-2, -1)) for dy in range(-r, r + 1) for dx in range(-r, r + 1))
    squared = ((deviation / window ** 2) ** 2).sum(1)  # (B, H, W), summed over channels
    count = pixels.flatten(1).sum(1)
    mean = (squared * pixels).flatten(1).sum(1) / (pred.shape[1] * count).clamp_min(1)
    return torch.where(count > 0, mean.sqrt(), torch.full_like(mean, float("nan")))


class Chamfer(NamedTuple):
    """Symmetric chamfer distance and its two directions (mean nearest-neighbour distances, not squared)."""

    mean: float
    a_to_b: float  # how far A's surface is from B's: high when A has parts B lacks
    b_to_a: float  # how far B's surface is from A's: high when B has parts A lacks


def chamfer_distance(mesh_a: trimesh.Trimesh, mesh_b: trimesh.Trimesh, n_points: int = 20000,
                     seed: int = 0) -> Chamfer:
    """Chamfer distance between two surfaces from `n_points` area-uniform samples on each.

    mean = (a_to_b + b_to_a) / 2, each the mean Euclidean distance from a sample on one surface to the
    nearest sample on the other; in world units, so comparable to the [-1, 1]^3 scene box. Seeded, so
    the same meshes always give the same number (and a mesh against itself gives 0).
    """
    points_a, _ = trimesh.sample.sample_surface(mesh_a, n_points, seed=seed)
    points_b, _ = trimesh.sample.sample_surface(mesh_b, n_points, seed=seed)
    a_to_b = scipy.spatial.cKDTree(points_b).query(points_a)[0].mean()
    b_to_a = scipy.spatial.cKDTree(points_a).query(points_b)[0].mean()
    return Chamfer(float(0.5 * (a_to_b + b_to_a)), float(a_to_b), float(b_to_a))
