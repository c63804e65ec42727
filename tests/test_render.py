"""Volume rendering: compositing against a hand-written loop, occupancy skipping, analytic cases."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sds3d.geometry.cameras import camera_rays, ray_box_intersect, spherical_cameras
from sds3d.nerf.field import CPU_FAST_ENCODING, NeRFField
from sds3d.nerf.occupancy import OccupancyGrid
from sds3d.pipelines.regularizers import opacity_entropy_loss, opacity_sparsity_loss, orientation_loss
from sds3d.nerf.render import backfacing, render_image, render_rays


class SmoothField(nn.Module):
    """A smooth, everywhere-positive density and a position-dependent albedo, with a parameter."""

    radius = 1.0

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x, with_normals=False):
        density = self.scale * (1.2 + torch.sin(3 * x[:, 0]) * torch.cos(2 * x[:, 1]) + 0.5 * x[:, 2])
        out = {"density": density, "albedo": torch.sigmoid(2 * x)}
        if with_normals:
            out["normal"] = F.normalize(x, dim=-1)
        return out


class BallField(nn.Module):
    """Uniform density `sigma` inside |x| < rho (or the cube |x|_inf < rho), zero outside."""

    radius = 1.0

    def __init__(self, sigma=2.0, rho=0.5, cube=False, inward=False):
        super().__init__()
        self.sigma, self.rho, self.cube, self.inward = sigma, rho, cube, inward
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x, with_normals=False):
        inside = (x.abs().amax(-1) if self.cube else x.norm(dim=-1)) < self.rho
        density = torch.where(inside, self.sigma * self.scale, torch.zeros_like(self.scale))
        out = {"density": density, "albedo": torch.sigmoid(3 * x) * self.scale}
        if with_normals:
            out["normal"] = F.normalize(x, dim=-1) * (-1.0 if self.inward else 1.0)
        return out

    def density(self, x):
        return self.forward(x)["density"]


def test_nerfacc_weights_equal_hand_alpha_composite():
    from nerfacc.volrend import render_weight_from_density

    torch.manual_seed(0)
    sigmas = torch.rand(7, 20) * 5
    t_starts = torch.cumsum(torch.rand(7, 20) * 0.1, 1)
    t_ends = t_starts + torch.rand(7, 20) * 0.1
    weights, trans, alphas = render_weight_from_density(t_starts, t_ends, sigmas)
    alpha = 1 - torch.exp(-sigmas * (t_ends - t_starts))
    expected = torch.zeros_like(alpha)
    for r in range(7):
        transmittance = 1.0
        for i in range(20):
            expected[r, i] = transmittance * alpha[r, i]
            transmittance = transmittance * (1 - alpha[r, i])
    torch.testing.assert_close(alphas, alpha)
    torch.testing.assert_close(weights, expected)


def test_render_rays_equals_hand_composite():
    torch.manual_seed(0)
    field = SmoothField()
    origins = F.normalize(torch.randn(10, 3), dim=-1) * 2.5
    dirs = F.normalize(torch.randn(10, 3) * 0.3 - origins, dim=-1)
    background = torch.rand(10, 3)
    s = 32
    out = render_rays(field, origins, dirs, num_samples=s, stratified=False, background=background)

    near, far, hit = ray_box_intersect(origins, dirs)
    assert hit.all()
    delta = (far - near) / s
    t = near[:, None] + delta[:, None] * (torch.arange(s) + 0.5)
    with torch.no_grad():
        f = field((origins[:, None] + dirs[:, None] * t[..., None]).reshape(-1, 3))
    sigma, color = f["density"].view(10, s), f["albedo"].view(10, s, 3)
    rgb, opacity, depth = torch.zeros(10, 3), torch.zeros(10), torch.zeros(10)
    transmittance = torch.ones(10)
    for i in range(s):
        alpha = 1 - torch.exp(-sigma[:, i] * delta)
        w = transmittance * alpha
        rgb += w[:, None] * color[:, i]
        opacity += w
        depth += w * t[:, i]
        transmittance = transmittance * (1 - alpha)
    rgb += (1 - opacity[:, None]) * background
    torch.testing.assert_close(out["rgb"], rgb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["opacity"][:, 0], opacity, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["depth"][:, 0], depth, atol=1e-4, rtol=1e-5)
    assert out["weights"].shape == (10, s)
    out["rgb"].sum().backward()
    assert field.scale.grad is not None and field.scale.grad != 0


def test_occupancy_skipping_leaves_the_image_unchanged():
    field = BallField(sigma=3.0, rho=0.5, cube=True)  # a cube whose faces lie on cell faces
    grid = OccupancyGrid(resolution=32)
    assert grid.occupied(torch.zeros(1, 3)).all()  # all occupied before any update
    grid.update(field, generator=torch.Generator().manual_seed(0))
    assert grid.occupied_fraction() == pytest.approx(1 / 8)
    assert not grid.occupied(torch.tensor([[0.8, 0.0, 0.0], [0.0, 0.0, 1.5]])).any()
    camera = spherical_cameras(20.0, [30.0, 200.0], 2.5, 45.0, 16)
    images = []
    for occupancy in (None, grid):
        images.append(render_image(field, camera, occupancy=occupancy, shading="lambertian", num_samples=48,
                                   generator=torch.Generator().manual_seed(1)))
    for key in ("rgb", "opacity", "depth", "normal", "albedo", "weights"):
        torch.testing.assert_close(images[0][key], images[1][key], atol=1e-6, rtol=1e-6)
    assert 0.1 < float(images[1]["opacity"].detach().mean()) < 0.9


class CountingField(BallField):
    """A BallField that counts the points it evaluates with normals (the full, differentiable pass)."""

    full_points = 0

    def forward(self, x, with_normals=False):
        if with_normals:
            self.full_points += x.shape[0]
        return super().forward(x, with_normals)


def test_early_ray_termination_bounds_the_change_and_skips_hidden_samples():
    """Dropping samples with transmittance T < eps moves each pixel by at most 2 eps (their colour
    weight and their share of the background are both below T), and the gradient hardly moves."""
    eps = 1e-3
    camera = spherical_cameras(20.0, [30.0, 200.0], 2.5, 45.0, 24)
    outs, grads, counts = [], [], []
    grid = OccupancyGrid(resolution=32)
    grid.update(CountingField(sigma=30.0, rho=0.5, cube=True), generator=torch.Generator().manual_seed(0))
    for early_stop_eps in (0.0, eps):
        field = CountingField(sigma=30.0, rho=0.5, cube=True)  # opaque: T ~ e^-30 per unit length
        out = render_image(field, camera, shading="lambertian", num_samples=64, early_stop_eps=early_stop_eps,
                           occupancy=grid, generator=torch.Generator().manual_seed(3))
        out["rgb"].sum().backward()
        outs.append(out)
        grads.append(field.scale.grad.clone())
        counts.append(field.full_points)
    assert (outs[0]["rgb"] - outs[1]["rgb"]).abs().max() <= 2 * eps
    assert (outs[0]["opacity"] - outs[1]["opacity"]).abs().max() <= eps
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-2, atol=0)
    assert counts[1] < 0.5 * counts[0], counts  # most samples inside the cube are hidden


def test_occupancy_grid_update_schedule_and_ema():
    field = BallField(sigma=3.0, rho=0.5, cube=True)
    grid = OccupancyGrid(resolution=8, decay=0.5, update_every=4)
    assert grid.update(field, step=0) and not grid.update(field, step=3)
    field.rho = 0.25  # the cube shrinks: the EMA forgets the outer cells geometrically
    grid.update(field)
    torch.testing.assert_close(grid.density_ema.amax(), torch.tensor(3.0))
    assert grid.density_ema[2, 2, 2] == 1.5 and grid.occupied_fraction() == pytest.approx(1 / 8)
    for _ in range(7):
        grid.update(field)
    assert grid.occupied_fraction() == pytest.approx(1 / 8)  # 3 / 2^8 > threshold 0.01 still
    grid.update(field)
    assert grid.occupied_fraction() == pytest.approx(1 / 64)


def test_uniform_ball_opacity_is_one_minus_exp_sigma_chord():
    sigma, rho = 2.0, 0.5
    field = BallField(sigma=sigma, rho=rho)
    camera = spherical_cameras(10.0, 40.0, 2.5, 40.0, 9)  # odd size: the centre pixel hits the origin
    out = render_image(field, camera, num_samples=1024, stratified=False, background=0.0)
    assert out["opacity"].shape == (1, 1, 9, 9) and out["rgb"].shape == (1, 3, 9, 9)
    centre = out["opacity"][0, 0, 4, 4].detach()
    torch.testing.assert_close(centre, torch.tensor(1 - math.exp(-sigma * 2 * rho)), atol=5e-3, rtol=0)
    # Every pixel: the chord through the ball from the ray's distance to the centre.
    origins, dirs = (v.reshape(-1, 3) for v in camera_rays(camera))
    b = torch.linalg.cross(origins, dirs).norm(dim=-1)
    chord = 2 * (rho ** 2 - b ** 2).clamp_min(0).sqrt()
    torch.testing.assert_close(out["opacity"].reshape(-1), 1 - torch.exp(-sigma * chord), atol=2e-2, rtol=0)
    # Depth at the centre: the weighted mean distance of the front of the ball.
    assert 2.0 < float(out["depth"][0, 0, 4, 4].detach() / centre) < 2.5


def test_textureless_and_orientation():
    field = BallField(sigma=50.0, rho=0.5)
    origins = torch.tensor([[2.5, 0.0, 0.0]])
    dirs = torch.tensor([[-1.0, 0.0, 0.0]])
    out = render_rays(field, origins, dirs, num_samples=256, shading="textureless", stratified=False,
                      background=0.0)
    # Headlight on the front of the ball: n . l = 1, white albedo -> rgb = opacity ~ 1.
    torch.testing.assert_close(out["rgb"], out["opacity"].expand(1, 3))
    assert out["opacity"] > 0.99
    torch.testing.assert_close(out["normal"], torch.tensor([[1.0, 0.0, 0.0]]), atol=2e-2, rtol=0)
    assert float(out["backfacing"]) < 1e-6  # the front faces the camera (the back has w ~ 0)
    inward = render_rays(BallField(sigma=50.0, rho=0.5, inward=True), origins, dirs, num_samples=256,
                         shading="lambertian", stratified=False)
    assert float(inward["backfacing"]) > 0.9
    # The light from behind leaves only the ambient half of the albedo.
    back = render_rays(field, origins, dirs, num_samples=256, shading="lambertian", stratified=False,
                       light=torch.tensor([[-1.0, 0.0, 0.0]]), background=0.0)
    torch.testing.assert_close(back["rgb"], 0.5 * back["albedo"], atol=1e-5, rtol=1e-5)


def test_blob_renders_a_centred_disk_and_backpropagates():
    torch.manual_seed(0)
    field = NeRFField(**CPU_FAST_ENCODING)
    grid = OccupancyGrid()
    grid.update(field)
    assert 0.05 < grid.occupied_fraction() < 0.4  # the blob, not the whole box
    camera = spherical_cameras([15.0, 60.0], [30.0, -120.0], 2.75, 45.0, 32)
    out = render_image(field, camera, occupancy=grid, shading="lambertian", generator=torch.Generator().manual_seed(0))
    for key, channels in (("rgb", 3), ("opacity", 1), ("depth", 1), ("normal", 3), ("albedo", 3),
                          ("backfacing", 1), ("weights", 64)):
        assert out[key].shape == (2, channels, 32, 32), key
    opacity = out["opacity"][:, 0]
    assert (opacity[:, 15:17, 15:17] > 0.9).all()
    assert (opacity[:, [0, 0, -1, -1], [0, -1, 0, -1]] < 0.05).all()
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    for o in opacity:
        centroid = torch.stack([(o * ys).sum(), (o * xs).sum()]) / o.sum()
        assert (centroid - 15.5).abs().max() < 1.0
    loss = out["rgb"].mean() + out["backfacing"].mean() + opacity_sparsity_loss(out["opacity"])
    loss.backward()
    assert field.encoding.table.grad.abs().sum() > 0 and field.head.weight.grad.abs().sum() > 0


def test_chunking_and_missed_rays():
    field = SmoothField()
    camera = spherical_cameras(0.0, 0.0, 2.0, 60.0, 8)
    full = render_image(field, camera, stratified=False, num_samples=16, background=torch.tensor([0.1, 0.2, 0.3]))
    chunked = render_image(field, camera, stratified=False, num_samples=16, chunk=10,
                           background=torch.tensor([0.1, 0.2, 0.3]))
    for key in full:
        torch.testing.assert_close(full[key], chunked[key])
    missed = render_rays(NeRFField(n_levels=2, log2_hashmap_size=8), torch.tensor([[3.0, 3.0, 3.0]]),
                         torch.tensor([[1.0, 0.0, 0.0]]), background=0.25)
    assert float(missed["opacity"].detach()) == 0.0 and torch.equal(missed["rgb"], torch.full((1, 3), 0.25))
    missed["rgb"].sum().backward()  # nothing was evaluated, but the graph is intact


def test_regularizers():
    torch.testing.assert_close(opacity_sparsity_loss(torch.zeros(4, 1)), torch.tensor(0.1))
    torch.testing.assert_close(opacity_entropy_loss(torch.full((4, 1), 0.5)), torch.tensor(math.log(2.0)))
    assert opacity_entropy_loss(torch.tensor([0.0, 1.0])) < 0.01
    weights = torch.tensor([[0.5, 0.5]], requires_grad=True)
    normals = torch.tensor([[[0.0, 0.0, 1.0], [0.0, 0.6, 0.8]]], requires_grad=True)
    per_ray = backfacing(weights, normals, torch.tensor([[0.0, 0.0, 1.0]]))
    torch.testing.assert_close(per_ray, torch.tensor([0.5 * 1.0 + 0.5 * 0.64]))
    torch.testing.assert_close(orientation_loss(torch.tensor([0.2, 0.4])), torch.tensor(0.3))
    per_ray.sum().backward()
    assert weights.grad is None and normals.grad.abs().sum() > 0  # weights are detached


def test_jittered_rays_stay_inside_their_pixels_and_average_to_the_centres():
    camera = spherical_cameras(20.0, [30.0, 200.0], 2.5, 45.0, 8)
    focal = 0.5 * 8 / math.tan(math.radians(45.0) / 2)

    def pixel_coordinates(dirs):
        local = torch.einsum("bji,bhwj->bhwi", camera.c2w[:, :3, :3], dirs)  # world -> camera axes
        col = local[..., 0] / -local[..., 2] * focal + 4.0
        row = -local[..., 1] / -local[..., 2] * focal + 4.0
        return row, col

    rows = torch.arange(8.0)[None, :, None]
    cols = torch.arange(8.0)[None, None, :]
    row, col = pixel_coordinates(camera_rays(camera)[1])
    torch.testing.assert_close(row, (rows + 0.5).expand_as(row), atol=1e-4, rtol=0)
    generator = torch.Generator().manual_seed(0)
    draws = [pixel_coordinates(camera_rays(camera, jitter=True, generator=generator)[1]) for _ in range(400)]
    for row, col in draws[:20]:
        assert ((row - rows) > -1e-4).all() and ((row - rows) < 1 + 1e-4).all()
        assert ((col - cols) > -1e-4).all() and ((col - cols) < 1 + 1e-4).all()
    mean_row = torch.stack([r for r, _ in draws]).mean(0)
    mean_col = torch.stack([c for _, c in draws]).mean(0)
    assert (mean_row - rows - 0.5).abs().max() < 0.06 and (mean_col - cols - 0.5).abs().max() < 0.06


def test_z_variance_of_a_uniform_slab_is_one_over_sigma_squared():
    """Inside a deep block of density sigma, the stopping distance of a ray is exponential with rate
    sigma, whose variance is 1/sigma^2: the renderer's z_variance (HiFA) must give that, and the
    loss must count only covered pixels."""
    from sds3d.pipelines.regularizers import z_variance_loss

    camera = spherical_cameras(0.0, 0.0, 2.5, 10.0, 5)
    for sigma in (10.0, 40.0):
        field = BallField(sigma=sigma, rho=0.9, cube=True)
        out = render_image(field, camera, num_samples=4096, stratified=False, background=0.0)
        centre = out["z_variance"][0, 0, 2, 2].detach()
        torch.testing.assert_close(centre, torch.tensor(1 / sigma ** 2), rtol=0.03, atol=0)
    opacity = torch.tensor([[0.9], [0.2], [1.0]])
    z_var = torch.tensor([[0.5], [100.0], [1.5]])
    assert z_variance_loss(z_var, opacity).item() == pytest.approx(1.0)
    assert z_variance_loss(z_var, torch.zeros(3, 1)).item() == 0.0
