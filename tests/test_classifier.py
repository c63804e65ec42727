"""The world classifier (shipped weights) and FD_world."""

import numpy as np
import pytest
import torch

from sds3d.world.dataset import RenderSpec, world_renders
from sds3d.eval.classifier import (CONFIG_PATH, WEIGHTS_PATH, ClassifierWeightsError, WorldClassifier, load_classifier,
                                   load_classifier_from, prompt_accuracy)
from sds3d.eval.fd import fd_features, feature_statistics, frechet_distance
from sds3d.world.scenes import CATEGORIES, COLORS, Scene, held_out_combinations


def _spd(d, seed):
    g = np.random.default_rng(seed)
    a = g.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_closed_forms():
    # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx((1 - 3) ** 2 + (2 - 1) ** 2)
    # Commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 2.0, 0.5]), np.array([0.3, 2.0, 4.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # General covariances: Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), computed by eigendecomposition.
    s1, s2 = _spd(6, 0), _spd(6, 1)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    w2 = np.linalg.eigvalsh(root1 @ s2 @ root1)
    expected = np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(w2, 0, None)).sum()
    assert frechet_distance(np.zeros(6), s1, np.zeros(6), s2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(np.ones(6), s1, np.ones(6), s1) == pytest.approx(0.0, abs=1e-6)


def test_fd_of_samples_approaches_the_gaussian_distance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 4, generator=g)
    y = torch.randn(20000, 4, generator=g) * 2 + 1
    # N(0, I) vs N(1, 4I) in 4-D: 4 * 1 + 4 * (2 - 1)^2 = 8.
    assert fd_features(x, y) == pytest.approx(8.0, rel=0.05)
    mu, sigma = feature_statistics(x)
    assert mu.shape == (4,) and sigma.shape == (4, 4)


def fresh_scenes():
    """Every (color, primitive) pair held out of teacher training, and every category once in a
    colour that cycles so that every colour appears: 23 scenes."""
    colors = list(COLORS)
    held = [Scene(category, color) for color, category in held_out_combinations()]
    cycle = [Scene(category, colors[(4 * k + 1) % len(colors)]) for k, category in enumerate(CATEGORIES)]
    return list(dict.fromkeys(held + cycle))


@pytest.fixture(scope="module")
def fresh_renders():
    # Cameras no training set used (seed 11), rendered now (no cache), 3 views per scene.
    return world_renders(RenderSpec(resolution=32, views_per_scene=3, seed=11), scenes=fresh_scenes(), use_cache=False)


def test_shipped_classifier_is_accurate_on_fresh_renders(fresh_renders):
    model = load_classifier()
    assert WEIGHTS_PATH.stat().st_size < 2 * 2 ** 20 and CONFIG_PATH.exists()
    pred = model.predict(fresh_renders.float_images())
    category = (pred["category"] == fresh_renders.category).float().mean()
    color = (pred["color"] == fresh_renders.color).float().mean()
    assert category >= 0.98 and color >= 0.98, (float(category), float(color))
    held = fresh_renders.indices("held_out")
    assert held.numel() == 3 * 8
    assert (pred["color"][held] == fresh_renders.color[held]).float().mean() >= 0.9


def test_prompt_accuracy_and_features(fresh_renders):
    images = fresh_renders.float_images()
    prompts = [fresh_renders.scene(i).caption + ", side view" for i in range(len(fresh_renders))]
    acc = prompt_accuracy(images, prompts)
    assert acc["n"] == len(prompts) and acc["category"] >= 0.98 and acc["color"] >= 0.98
    wrong = [("a red cube" if s.category != "cube" else "a blue sphere") for s in map(fresh_renders.scene, range(len(prompts)))]
    assert prompt_accuracy(images, wrong)["category"] < 0.1
    model = load_classifier()
    feats = model.embed(images)
    assert feats.shape == (len(images), model.config.feature_dim)
    # Images at another size are resized: 64x64 upsampled copies read the same.
    big = torch.nn.functional.interpolate(images[:20], scale_factor=2, mode="nearest")
    assert (model.predict(big)["category"] == model.predict(images[:20])["category"]).float().mean() >= 0.9


def test_damaged_classifier_weights_give_a_clear_error(tmp_path):
    bad = tmp_path / "classifier.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(ClassifierWeightsError, match="classifier.safetensors"):
        load_classifier_from(bad)
    with pytest.raises(ClassifierWeightsError, match="not found"):
        load_classifier_from(tmp_path / "none.safetensors")


def test_classifier_shapes():
    model = WorldClassifier().eval()
    out = model(torch.rand(3, 3, 32, 32))
    assert out["category"].shape == (3, len(CATEGORIES)) and out["color"].shape == (3, len(COLORS))
    assert out["view"].shape == (3, 4)
