"""The Janus figure (`accent_strength`) and `speckle` against the world's own renders and closed forms.

Janus: three synthetic "NeRF" renders built from the ground truth itself, at the evaluation cameras:
the truth (face only in front: 1 / 0), the truth with its face painted over in the main colour
(no face: 0 / 0) and the truth with its front view's face mirrored onto the back (two faces: 1 / 1).
The house is the case of issue 17: with its red roof (seen from both sides) counted as an accent, a
doorless house read 0.74 / 0.75.
"""

import math

import pytest
import torch

from sds3d.eval.ground_truth import (EVAL_VIEWS, accent_colors, accent_strength, evaluation_cameras,
                                     front_only_pixels)
from sds3d.eval.metrics import speckle, uniform_interior
from sds3d.world.render import render_scene
from sds3d.world.scenes import COLORS, make_scene

BACK = EVAL_VIEWS // 2


def truth_of(category: str):
    scene = make_scene(category)
    truth = render_scene(scene, evaluation_cameras(), background=1.0)
    return scene, truth["albedo"], truth["mask"], torch.tensor(COLORS[scene.color]), accent_colors(scene)


def near(image: torch.Tensor, color, tolerance: float = 1e-4) -> torch.Tensor:
    """(B, 1, H, W) bool: pixels of `image` (B, 3, H, W) within `tolerance` of `color`."""
    return ((image - torch.as_tensor(color)[None, :, None, None]).abs().amax(1, keepdim=True) < tolerance)


def paint(image: torch.Tensor, where: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
    return torch.where(where, color[None, :, None, None], image)


def janus(image: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """The front view's front-only pixels copied, mirrored, onto the back view: a second face."""
    out = image.clone()
    out[BACK] = torch.where(pixels.flip(-1), image[0].flip(-1), image[BACK])
    return out


@pytest.mark.parametrize("category", ["snowman", "house"])
def test_face_in_front_no_face_and_two_faces(category):
    scene, albedo, mask, main, accents = truth_of(category)
    pixels, _ = front_only_pixels(albedo, mask, main, accents)
    any_accent = torch.zeros_like(mask, dtype=torch.bool)
    for accent in accents:
        any_accent |= near(albedo, accent) & (mask > 0.5)

    exact = accent_strength(albedo, albedo, mask, main, accents)
    assert exact["front"] == pytest.approx(1.0, abs=1e-5) and exact["back"] == pytest.approx(0.0, abs=1e-5)
    assert exact["pixels"] == int(pixels.sum()) > 20

    no_face = paint(albedo, any_accent, main)  # every accent pixel of every view in the main colour
    blank = accent_strength(no_face, albedo, mask, main, accents)
    assert abs(blank["front"]) < 1e-5 and abs(blank["back"]) < 1e-5

    two_faces = accent_strength(janus(albedo, pixels), albedo, mask, main, accents)
    assert two_faces["front"] == pytest.approx(1.0, abs=1e-5) and two_faces["back"] == pytest.approx(1.0, abs=1e-5)


def test_doorless_house_with_its_roof_scores_no_door():
    """Issue 17's case: the roof and chimney are there (red on both sides), the door is not. The door
    (black, its only black part) is the house's one front-only part, so the front-only pixels are
    the door's, and painting it over in the walls' yellow scores 0 in front and behind."""
    scene, albedo, mask, main, accents = truth_of("house")
    door = near(albedo, COLORS["black"]) & (mask > 0.5)
    roof = near(albedo, COLORS["red"]) & (mask > 0.5)
    pixels, _ = front_only_pixels(albedo, mask, main, accents)
    assert not (pixels & ~door[0, 0]).any()  # nothing but the door
    assert pixels.sum() >= 0.9 * door[0, 0].sum()  # and nearly all of it
    assert roof[0].sum() > 4 * door[0].sum()  # the roof, seen from both sides, used to outweigh it

    doorless = paint(albedo, door, main)
    score = accent_strength(doorless, albedo, mask, main, accents)
    assert abs(score["front"]) < 1e-5 and abs(score["back"]) < 1e-5
    # a Janus house: the door copied onto the back wall
    assert accent_strength(janus(albedo, pixels), albedo, mask, main, accents)["back"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("category", ["snowman", "house"])
def test_colour_drift_without_a_face_is_not_a_face(category):
    """A faceless NeRF whose main colour drifted (a grey snowman, a darker house) reads 0: the
    reference is the NeRF's own main colour. Measured from the true white, grey would sit ~40 % of
    the way to the snowman's black eyes."""
    scene, albedo, mask, main, accents = truth_of(category)
    drifted = paint(albedo, mask > 0.5, 0.7 * main)
    score = accent_strength(drifted, albedo, mask, main, accents)
    assert abs(score["front"]) < 1e-5 and abs(score["back"]) < 1e-5
    # the true face on the drifted body: measured from the NeRF's main colour 0.7 m to the accent a,
    # in units of the true contrast a - m
    pixels, _ = front_only_pixels(albedo, mask, main, accents)
    drifted[0] = torch.where(pixels, albedo[0], drifted[0])
    a = albedo[0].permute(1, 2, 0)[pixels].double()
    m = main.double()
    expected = (((a - 0.7 * m) * (a - m)).sum(-1) / ((a - m) ** 2).sum(-1)).mean()
    assert accent_strength(drifted, albedo, mask, main, accents)["front"] == pytest.approx(float(expected), abs=1e-5)


def test_no_front_only_part_is_none():
    # the pine tree's brown trunk shows from the front and the back alike; a cube has no accent
    scene, albedo, mask, main, accents = truth_of("pine tree")
    assert len(accents) == 1
    assert accent_strength(albedo, albedo, mask, main, accents) is None
    scene, albedo, mask, main, accents = truth_of("cube")
    assert len(accents) == 0 and accent_strength(albedo, albedo, mask, main, accents) is None


# --- speckle -------------------------------------------------------------------------------

def flat(color=(0.5, 0.4, 0.3), size=64, batch=2):
    image = torch.tensor(color).reshape(1, 3, 1, 1).expand(batch, 3, size, size).clone()
    return image, torch.ones(batch, 1, size, size)


def test_constant_image_has_no_speckle():
    image, mask = flat()
    assert torch.equal(speckle(image, mask, image, mask), torch.zeros(2))
    assert torch.equal(speckle(image + 0.2, mask, image, mask), torch.zeros(2))  # an offset is colour error


def test_gaussian_noise_closed_form():
    """d = n_0 - (1/9) sum_{k in 3x3} n_k = (8/9) n_0 - (1/9) sum_{k != 0} n_k for i.i.d. n of std s, so
    E[d^2] = s^2 (64/81 + 8/81) = s^2 (1 - 1/9); speckle is sqrt(mean over pixels and channels of d^2)."""
    truth, mask = flat(size=128, batch=8)
    s = 0.03
    noisy = truth + s * torch.randn(truth.shape, generator=torch.Generator().manual_seed(0))
    value = speckle(noisy, mask, truth, mask)
    assert value.mean() == pytest.approx(s * math.sqrt(1 - 1 / 9), rel=0.01)
    # a 5x5 window: E[d^2] = s^2 (1 - 1/25)
    assert speckle(noisy, mask, truth, mask, window=5).mean() == pytest.approx(s * math.sqrt(1 - 1 / 25), rel=0.01)


def test_linear_ramp_has_no_speckle():
    truth, mask = flat(size=48)
    y, x = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    ramp = truth + (0.004 * x - 0.003 * y)[None, None]  # the 3x3 mean of a linear function is its centre
    assert speckle(ramp, mask, truth, mask).abs().max() < 1e-6


def test_region_borders_and_holes_do_not_count():
    """Two flat regions side by side: the prediction equal to the truth scores 0 although a 3x3 mean
    across their border differs from the centre by a third of the step; noise within 1 px of the
    border or of the silhouette, or where the prediction is transparent, does not count either."""
    size = 40
    truth, mask = flat(size=size, batch=1)
    truth[..., size // 2:] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    mask[..., :3, :] = 0.0  # a silhouette border along the top
    assert speckle(truth, mask, truth, mask).item() == 0.0
    step = (truth[..., size // 2] - truth[..., size // 2 - 1]).abs()
    naive = (truth[..., size // 2] - torch.nn.functional.avg_pool2d(truth, 3, 1, 1)[..., size // 2]).abs()
    assert torch.allclose(naive[..., 5:-5], step[..., 5:-5] / 3)  # what an uneroded mean would count

    interior = uniform_interior(truth, mask)[0]
    near_border = torch.zeros(size, size, dtype=torch.bool)
    near_border[:, size // 2 - 1: size // 2 + 1] = True  # one column each side of the colour border
    near_border[3, :] = True  # the first row under the silhouette border
    assert not (interior & near_border).any()
    noisy = truth + 0.05 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(1)) * near_border
    assert speckle(noisy, mask, truth, mask).item() == 0.0

    hole = torch.zeros(size, size, dtype=torch.bool)
    hole[10:20, 5:15] = True  # the prediction is transparent there, and noisy
    opacity = mask * ~hole
    noisy = truth + 0.05 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(2)) * hole
    assert speckle(noisy, opacity, truth, mask).item() == 0.0
    assert speckle(noisy, mask, truth, mask).item() > 0.01  # counted where it is opaque


def test_speckle_on_the_world_truth():
    """The snowman's truth at the evaluation cameras: the truth itself scores 0 (its part borders
    drop out), and noise of std s on it sqrt(8/9) s."""
    scene, albedo, mask, main, accents = truth_of("snowman")
    assert torch.equal(speckle(albedo, mask, albedo, mask), torch.zeros(EVAL_VIEWS))
    s = 0.01
    noisy = albedo + s * torch.randn(albedo.shape, generator=torch.Generator().manual_seed(3))
    assert speckle(noisy, mask, albedo, mask).mean() == pytest.approx(s * math.sqrt(8 / 9), rel=0.03)


def test_speckle_rejects_bad_windows():
    image, mask = flat()
    with pytest.raises(ValueError, match="odd"):
        speckle(image, mask, image, mask, window=4)
    with pytest.raises(ValueError, match="at least window // 2"):
        speckle(image, mask, image, mask, erosion=1, window=5)
