"""NeRFactor's albedo smoothness term and the surface points it is taken at, against closed forms."""

import math

import pytest
import torch

from sds3d.config import make_config
from sds3d.pipelines.regularizers import albedo_smoothness_loss, surface_points


class LinearAlbedo(torch.nn.Module):
    """A stand-in field whose albedo is k * x: |a(x) - a(x + e)| = k |e| per channel."""

    def __init__(self, k: float):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(k))

    def forward(self, x):
        return {"albedo": self.k * x, "density": x.new_ones(x.shape[0])}


def test_albedo_smoothness_is_k_sigma_sqrt_2_over_pi_for_a_linear_albedo():
    # E|N(0, s^2)| = s sqrt(2 / pi), so the mean L1 difference of a k x albedo is k s sqrt(2 / pi).
    points = torch.rand(200_000, 3)
    g = torch.Generator().manual_seed(0)
    for k, scale in ((1.0, 0.02), (3.0, 0.05)):
        loss = albedo_smoothness_loss(LinearAlbedo(k), points, g, scale=scale)
        expected = k * scale * math.sqrt(2 / math.pi)
        assert loss.item() == pytest.approx(expected, rel=0.01), (k, scale, loss.item(), expected)


def test_albedo_smoothness_is_zero_for_a_flat_albedo_and_keeps_a_graph_without_points():
    flat = LinearAlbedo(0.0)
    assert albedo_smoothness_loss(flat, torch.rand(1000, 3)).item() == 0.0
    empty = albedo_smoothness_loss(LinearAlbedo(2.0), torch.zeros(0, 3))
    assert empty.item() == 0.0 and empty.requires_grad
    # the gradient flows to the field: d/dk of k E|e| is E|e| > 0
    field = LinearAlbedo(1.0)
    albedo_smoothness_loss(field, torch.rand(10_000, 3), torch.Generator().manual_seed(1), scale=0.1).backward()
    assert field.k.grad.item() == pytest.approx(0.1 * math.sqrt(2 / math.pi), rel=0.05)


def test_surface_points_lie_at_the_normalised_depth_of_covered_rays_only():
    # Rays from z = 3 straight down; depth accumulated as opacity * 2 (a surface at distance 2): z = 1.
    h = w = 8
    origins = torch.zeros(1, h, w, 3)
    origins[..., 0] = torch.linspace(-0.5, 0.5, w)[None, None, :]
    origins[..., 1] = torch.linspace(-0.5, 0.5, h)[None, :, None]
    origins[..., 2] = 3.0
    dirs = torch.zeros(1, h, w, 3)
    dirs[..., 2] = -1.0
    opacity = torch.zeros(1, h, w, 1)
    opacity[:, :4] = 0.8  # the top half covered
    opacity[:, 4:6] = 0.3  # below the 0.5 cut
    depth = opacity * 2.0
    pts = surface_points(origins, dirs, depth, opacity, count=1000)
    assert pts.shape == (32, 3)
    assert torch.allclose(pts[:, 2], torch.ones(32))
    few = surface_points(origins, dirs, depth, opacity, count=5, generator=torch.Generator().manual_seed(0))
    assert few.shape == (5, 3) and len({tuple(p.tolist()) for p in few}) == 5
    assert not pts.requires_grad


def test_lambda_albedo_smooth_is_checked():
    with pytest.raises(ValueError, match="lambda_albedo_smooth"):
        make_config("smoke", prompt="a red cube", lambda_albedo_smooth=-1.0)
