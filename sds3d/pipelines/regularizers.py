"""Regularizers of the text-to-3D loop on rendered opacity, normals and depth (DreamFusion,
threestudio, HiFA). They take what `sds3d.nerf.render` returns and never touch the field."""

from __future__ import annotations

import torch


def orientation_loss(backfacing: torch.Tensor) -> torch.Tensor:
    """DreamFusion's orientation penalty: the mean over rays of the renderer's per-ray "backfacing"
    sum_i stop_grad(w_i) max(0, n_i . d)^2 (see `sds3d.nerf.render.backfacing`)."""
    return backfacing.mean()


def z_variance_loss(z_variance: torch.Tensor, opacity: torch.Tensor, min_opacity: float = 0.5) -> torch.Tensor:
    """Mean z-variance over the pixels that the object covers (opacity > min_opacity), as threestudio."""
    mask = opacity > min_opacity
    return z_variance[mask].mean() if mask.any() else z_variance.sum() * 0.0


def opacity_sparsity_loss(opacity: torch.Tensor) -> torch.Tensor:
    """threestudio's sparsity loss: mean sqrt(opacity^2 + 0.01), a smooth L1 pulling opacity to 0."""
    return (opacity ** 2 + 0.01).sqrt().mean()


def opacity_entropy_loss(opacity: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """threestudio's opaque loss: mean binary entropy of the opacity, pushing it to 0 or 1."""
    o = opacity.clamp(eps, 1.0 - eps)
    return -(o * o.log() + (1.0 - o) * (1.0 - o).log()).mean()
