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
