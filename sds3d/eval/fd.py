"""FD_world: Frechet distance between two image sets in the world classifier's penultimate features.

FD = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}), as FID computes it (scipy.linalg.sqrtm,
with the same small-diagonal fallback when the product is near singular). Lower is closer; report
it beside the FD of two disjoint sets of real renders (`real_vs_real_fd`), its noise floor.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    x = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need features (N, D) with N >= 2, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: means {mu1.shape} vs {mu2.shape}, covariances {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # Fewer samples than feature dimensions give singular covariances; sqrtm still returns the
        # right root of the singular product, and the fallback below handles what it cannot.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
        covmean = covmean[0] if isinstance(covmean, tuple) else covmean  # older scipy returned (sqrtm, error)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
            covmean = covmean[0] if isinstance(covmean, tuple) else covmean
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fd_features(features_a, features_b) -> float:
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


def fd_world(images_a: torch.Tensor, images_b: torch.Tensor, classifier=None) -> float:
    """FD_world between two image sets (N, 3, H, W) in [0, 1] (any sizes; the classifier resizes)."""
    from .classifier import load_classifier

    classifier = classifier or load_classifier()
    return fd_features(classifier.embed(images_a), classifier.embed(images_b))


def real_vs_real_fd(n: int = 1000, classifier=None, seeds: tuple[int, int] = (2, 3)) -> float:
    """FD_world between two disjoint sets of n real renders (every scene, generate's camera
    ranges, different camera seeds): the floor that FD of generated images is compared to."""
    from ..world.dataset import RenderSpec, world_renders
    from ..world.scenes import all_scenes

    per_scene = -(-n // len(all_scenes()))
    sets = []
    for seed in seeds:
        renders = world_renders(RenderSpec(resolution=32, views_per_scene=per_scene, seed=seed))
        pick = torch.randperm(len(renders), generator=torch.Generator().manual_seed(seed))[:n]
        sets.append(renders.float_images(pick))
    return fd_world(sets[0], sets[1], classifier)
