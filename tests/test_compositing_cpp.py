"""The fused C++ compositor (csrc/compositing_kernels.cpp) against the torch path it replaces:
nerfacc's `render_weight_from_density` and `accumulate_along_rays` on the compact layout, torch's
shading and per-ray sums, and autograd through all of them (render_rays(fused_compositing=False)).
"""

import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sds3d.nerf import hashgrid_cpp, render
from sds3d.nerf.occupancy import OccupancyGrid

HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++").split()[0]) is not None
OUTPUTS = ("rgb", "opacity", "depth", "z_variance", "albedo", "weights", "normal", "backfacing")


@pytest.fixture(scope="module")
def cpp_ready():
    if not HAS_COMPILER:
        pytest.skip(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on this machine: the cpp backend cannot build")
    hashgrid_cpp.load()


class TableField(nn.Module):
    """The k-th point it is asked about gets row k of a parameter table: density, albedo and normal
    free of any structure, the density scaled by `scale` (N,) (set by `with_ray_levels`). It claims
    the "cpp" backend, which is what lets render_rays composite it with the C++ op."""

    radius = 1.0

    def __init__(self, rows: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.encoding = SimpleNamespace(backend="cpp")
        self.table = nn.Parameter(torch.randn(rows, 7, generator=g))
        self.register_buffer("scale", torch.ones(rows))

    def forward(self, x, with_normals=False):
        rows = self.table[: x.shape[0]]
        out = {"density": self.scale[: x.shape[0]] * F.softplus(rows[:, 0]), "albedo": torch.sigmoid(rows[:, 1:4])}
        if with_normals:
            out["normal"] = F.normalize(rows[:, 4:7], dim=-1)
        return out


SAMPLES = 24


def with_ray_levels(field, origins, dirs, grid):
    """Scale the densities per ray: empty (0), faint (1e-6: opacity under depth_variance's 1e-6
    clamp), soft (0.3, 3) and opaque (200: T underflows along the ray), in turn; every fourth sample
    empty. The samples are render_rays' (same sampler, same seed as `render_and_backward`)."""
    index = render.occupied_samples(origins, dirs, SAMPLES, 1.0, grid, True, torch.Generator().manual_seed(1))[0]
    levels = torch.tensor([0.0, 1e-6, 0.3, 3.0, 200.0])
    ray = index // SAMPLES
    scale = levels[ray % len(levels)] * (torch.arange(len(index)) % 4 != 3)
    field.scale[: len(index)] = scale
    return field


def rays(n=300, seed=0):
    """Rays from round the box, some from inside it, some missing it."""
    g = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(n, 3, generator=g), dim=-1)
    origins = -2.8 * dirs + 0.4 * (torch.rand(n, 3, generator=g) - 0.5)
    origins[: n // 6] = torch.rand(n // 6, 3, generator=g) * 1.6 - 0.8
    origins[n // 6: n // 4] += 3.0
    return origins, dirs


def render_and_backward(field, origins, dirs, fused, grid=None, **kwargs):
    """render_rays' outputs and the table's gradient of a loss that weighs every output."""
    field.zero_grad(set_to_none=True)
    out = render.render_rays(field, origins, dirs, SAMPLES, occupancy=grid, generator=torch.Generator().manual_seed(1),
                             fused_compositing=fused, **kwargs)
    g = torch.Generator().manual_seed(2)
    loss = sum((value * torch.randn(value.shape, generator=g)).sum() for key, value in sorted(out.items()))
    loss.backward()
    return {k: v.detach() for k, v in out.items()}, field.table.grad


def assert_close(actual, expected):
    # The same sums in another order and another exp: float tolerance relative to the scale.
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=2e-6 * scale)


@pytest.mark.parametrize("shading", ["albedo", "lambertian", "textureless"])
@pytest.mark.parametrize("need_normals", [False, True])
def test_fused_compositing_matches_nerfacc_and_torch(cpp_ready, shading, need_normals):
    origins, dirs = rays()
    grid = OccupancyGrid(resolution=8)
    grid.mask.copy_(torch.rand(grid.mask.shape, generator=torch.Generator().manual_seed(3)) < 0.5)
    background = torch.rand(len(origins), 3, generator=torch.Generator().manual_seed(4))
    light = F.normalize(torch.randn(len(origins), 3, generator=torch.Generator().manual_seed(5)), dim=-1)
    field = with_ray_levels(TableField(len(origins) * SAMPLES), origins, dirs, grid)
    kwargs = dict(grid=grid, shading=shading, need_normals=need_normals, background=background,
                  light=light if shading == "lambertian" else None)  # textureless: the headlight
    fused, fused_grad = render_and_backward(field, origins, dirs, True, **kwargs)
    reference, reference_grad = render_and_backward(field, origins, dirs, False, **kwargs)
    assert sorted(fused) == sorted(reference)
    assert ("normal" in fused) == (need_normals or shading != "albedo")
    for key in reference:
        assert fused[key].shape == reference[key].shape, key
        assert_close(fused[key], reference[key])
    assert_close(fused_grad, reference_grad)
    # per unit of density too: the faint rays' gradients (1e-6 of the others in the table) must match
    faint = field.scale == 1e-6
    assert_close(fused_grad[faint, 0] / 1e-6, reference_grad[faint, 0] / 1e-6)
    # the case mix the field promises: empty rays, transparent, faint and opaque ones
    opacity = reference["opacity"][:, 0]
    assert (opacity == 0).any() and ((opacity > 0) & (opacity < 1e-6)).any() and (opacity > 0.999).any()
    assert fused_grad.abs().sum() > 0


def test_fused_compositing_is_thread_count_invariant(cpp_ready):
    origins, dirs = rays(600, seed=1)
    field = with_ray_levels(TableField(600 * SAMPLES, seed=1), origins, dirs, None)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(render_and_backward(field, origins, dirs, True, shading="lambertian", need_normals=True))
    finally:
        torch.set_num_threads(threads)
    for out, grad in results[1:]:
        assert all(torch.equal(out[k], results[0][0][k]) for k in out)
        assert torch.equal(grad, results[0][1])


def test_fused_compositing_without_samples_keeps_the_graph(cpp_ready):
    origins, dirs = rays(40)
    grid = OccupancyGrid(resolution=8)
    grid.mask.zero_()
    field = TableField(40 * SAMPLES)
    out, grad = render_and_backward(field, origins, dirs, True, grid=grid, shading="lambertian", background=0.25)
    assert torch.equal(out["rgb"], torch.full((40, 3), 0.25)) and not out["opacity"].any()
    assert grad is not None and not grad.any()


def test_a_real_field_composites_the_same_fused(cpp_ready):
    """A NeRFField on the cpp grid (its blob gives an opaque core) renders through the C++ compositor
    with the torch path's image and parameter gradients."""
    from sds3d.geometry.cameras import spherical_cameras
    from sds3d.nerf.encoding import HashGridEncoding
    from sds3d.nerf.field import CPU_FAST_ENCODING, NeRFField

    torch.manual_seed(0)
    field = NeRFField(encoding=HashGridEncoding(**CPU_FAST_ENCODING, backend="cpp"))
    with torch.no_grad():
        field.encoding.table.uniform_(-0.1, 0.1)
    grid = OccupancyGrid(resolution=32)
    grid.update(field, generator=torch.Generator().manual_seed(0))
    camera = spherical_cameras(20.0, [30.0, 200.0], 2.5, 45.0, 16)
    used, real = [], hashgrid_cpp.composite
    results = []
    for fused in (True, False):
        field.zero_grad(set_to_none=True)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(hashgrid_cpp, "composite", lambda *a, **k: used.append(fused) or real(*a, **k))
            out = render.render_image(field, camera, occupancy=grid, shading="lambertian", num_samples=32,
                                      generator=torch.Generator().manual_seed(1), fused_compositing=fused)
        (out["rgb"].square().sum() + out["opacity"].sum() + out["backfacing"].sum()).backward()
        results.append([out[k].detach() for k in ("rgb", "opacity", "depth", "normal")] +
                       [p.grad for p in field.parameters() if p.grad is not None])
    assert used == [True]
    assert results[0][1].max() > 0.5  # something opaque on screen
    for a, b in zip(*results):
        assert_close(a, b)


def test_ray_offsets_need_the_samplers_order(cpp_ready):
    offsets = hashgrid_cpp.ray_offsets(torch.tensor([1, 2, 9, 20, 23]), 4, 6)
    assert offsets.tolist() == [0, 2, 2, 3, 3, 3, 5]
    with pytest.raises(RuntimeError, match="index must ascend"):
        hashgrid_cpp.ray_offsets(torch.tensor([2, 1]), 4, 6)
    with pytest.raises(RuntimeError, match="index must ascend"):
        hashgrid_cpp.ray_offsets(torch.tensor([1, 24]), 4, 6)


def test_composite_refuses_offsets_that_do_not_cover_the_samples(cpp_ready):
    n = torch.zeros(4)
    args = (n, n + 0.1, n + 0.05, n + 1.0, torch.rand(4, 3), None, None, None, "albedo", 0.5)
    assert hashgrid_cpp.composite(torch.tensor([0, 3, 4]), *args)[1].shape == (2,)
    for bad in ([0, 3, 2, 4], [1, 3, 4], [0, 3, 5]):
        with pytest.raises(RuntimeError, match="composite: offsets"):
            hashgrid_cpp.composite(torch.tensor(bad), *args)
