"""Regularizers of the text-to-3D loop on rendered opacity, normals and depth (DreamFusion,
threestudio, HiFA): they take what `sds3d.nerf.render` returns. One more, `albedo_smoothness_loss`
(NeRFactor), queries the field itself at surface points."""

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


ALBEDO_SMOOTH_SCALE = 0.02  # std of the offset, world units: 5 cells of cpu-fast's finest hash level (2 / 512)
ALBEDO_SMOOTH_POINTS = 1024


def surface_points(origins: torch.Tensor, dirs: torch.Tensor, depth: torch.Tensor, opacity: torch.Tensor,
                   count: int, generator: torch.Generator | None = None, min_opacity: float = 0.5) -> torch.Tensor:
    """Up to `count` points (N, 3), detached, where covered rays (opacity > min_opacity) meet the
    surface: origin + (accumulated depth / opacity) * direction. Rays are drawn without replacement
    from `generator`. `origins`, `dirs` (..., 3); `depth`, `opacity` (...) or (..., 1) per ray, as
    `render_image` returns them (depth is the weight-summed distance, not yet divided by opacity)."""
    o = opacity.detach().reshape(-1)
    covered = torch.nonzero(o > min_opacity).squeeze(-1)
    if covered.numel() > count:
        covered = covered[torch.randperm(covered.numel(), generator=generator)[:count]]
    t = depth.detach().reshape(-1)[covered] / o[covered]
    return origins.reshape(-1, 3)[covered] + t[:, None] * dirs.reshape(-1, 3)[covered]


def albedo_smoothness_loss(field, points: torch.Tensor, generator: torch.Generator | None = None,
                           scale: float = ALBEDO_SMOOTH_SCALE) -> torch.Tensor:
    """NeRFactor's albedo smoothness (Zhang et al. 2021, the lambda_a term of eq. 9), L1 form:
    mean |a(x) - a(x + e)| over surface points x, e ~ N(0, scale^2 I). A hash grid's finest levels give
    each cell an albedo of its own where the teacher's images show one flat colour (the "sandpaper"
    grain, `eval.metrics.speckle`); the L1 penalty evens out such cell-to-cell noise but, unlike an L2
    one, lets real colour edges (a door, a nose) stay sharp. Zero (with a graph) when there are no points."""
    if points.shape[0] == 0:
        return sum(p.sum() for p in field.parameters()) * 0.0
    offset = torch.randn(points.shape, generator=generator, dtype=points.dtype) * scale
    albedo = field(torch.cat([points, points + offset]))["albedo"]
    a, b = albedo.chunk(2)
    return (a - b).abs().mean()
