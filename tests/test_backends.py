"""The automatic choice of fast backends (tiny-cuda-nn grid, nerfacc's CUDA sampler), on a machine
without CUDA: CPU runs never import tinycudann, CUDA selection logic with a fake tinycudann, the
tcnn code paths of the encoder and field (finite-difference normals) exercised through the fake.
"""

import os
import shutil
import sys
import types

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sds3d.nerf import backends, hashgrid_cpp
from sds3d.geometry.cameras import orbit_cameras
from sds3d.nerf.encoding import (TCNN_INSTALL, BackendUnavailableError, HashGridEncoding, hash_grid_encode,
                                 level_resolutions, select_backend)
from sds3d.nerf.field import NeRFField
from sds3d.nerf.occupancy import CudaOccupancy, OccupancyGrid
from sds3d.nerf.render import render_image

HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++").split()[0]) is not None
SMALL = dict(n_levels=2, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4, max_resolution=8)


def fake_tinycudann():
    """A stand-in for tiny-cuda-nn's torch bindings: `Encoding(n_input_dims, encoding_config, dtype=...)`
    with one flat `params` vector, computed here by our torch encoder on the CPU. `created` records
    every construction (with its config)."""
    module = types.ModuleType("tinycudann")
    module.created = []

    class Encoding(nn.Module):
        def __init__(self, n_input_dims, encoding_config, seed=1337, dtype=None):
            super().__init__()
            module.created.append(dict(encoding_config, n_input_dims=n_input_dims, dtype=dtype))
            c = encoding_config
            self.shape = (c["n_levels"], 2 ** c["log2_hashmap_size"], c["n_features_per_level"])
            self.resolutions = tuple(float(r) for r in level_resolutions(c["n_levels"], c["base_resolution"],
                                                                         c["per_level_scale"]))
            self.params = nn.Parameter(torch.zeros(self.shape).reshape(-1))
            self.n_output_dims = c["n_levels"] * c["n_features_per_level"]

        def forward(self, x):
            feats, _ = hash_grid_encode(self.params.view(self.shape), x.t().contiguous(), self.resolutions, False)
            return feats.reshape(self.n_output_dims, -1).t()

    module.Encoding = Encoding
    return module


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch "sees" a GPU and tinycudann "imports" (the fake); no CUDA tensor is ever made."""
    fake = fake_tinycudann()
    monkeypatch.setitem(sys.modules, "tinycudann", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return fake


def test_auto_on_cpu_picks_the_cpu_op_and_never_imports_tinycudann(monkeypatch):
    if "tinycudann" in sys.modules:
        pytest.skip("tinycudann was imported by something else in this process")
    expected = "cpp" if HAS_COMPILER else "torch"
    assert select_backend("auto") == expected and select_backend("auto", device="cpu") == expected
    field = NeRFField(**SMALL, backend="auto")
    assert field.encoding.backend == expected and field.normal_mode == "analytic"
    occupancy = backends.make_occupancy("cpu", resolution=8)
    assert type(occupancy) is OccupancyGrid
    occupancy.update(field)
    out = render_image(field, orbit_cameras(1, 8), occupancy=occupancy, num_samples=8, shading="lambertian")
    out["rgb"].sum().backward()
    assert "tinycudann" not in sys.modules

    # A tinycudann that *would* import is still not touched for a CPU field.
    fake = fake_tinycudann()
    monkeypatch.setitem(sys.modules, "tinycudann", fake)
    field = NeRFField(**SMALL, backend="auto")
    field(torch.rand(16, 3) - 0.5, with_normals=True)["normal"].sum().backward()
    assert field.encoding.backend == expected and select_backend("auto", device="cpu") == expected
    assert fake.created == [] and not hasattr(field.encoding, "tcnn")


def test_auto_falls_back_to_torch_with_one_warning_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hashgrid_cpp, "_tried", True)  # as if the build had been tried and had failed
    monkeypatch.setattr(hashgrid_cpp, "_module", None)
    monkeypatch.setattr(hashgrid_cpp, "_error", "test: no compiler")
    monkeypatch.setattr(hashgrid_cpp, "_warned", False)
    assert hashgrid_cpp.available() is False
    assert select_backend("auto") == "torch"
    field = NeRFField(**SMALL, backend="auto")
    field(torch.rand(8, 3) - 0.5, with_normals=True)
    assert field.encoding.backend == "torch"
    assert backends.describe_backends("cpu", "auto").startswith("hash grid: torch")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "test: no compiler" in err and "pure-torch encoder" in err


def test_cuda_selection_logic_with_a_fake_tinycudann(fake_cuda, monkeypatch):
    assert select_backend("auto", device="cuda") == "tcnn"
    assert select_backend("auto", device=torch.device("cuda:0")) == "tcnn"
    assert select_backend("tcnn", device="cuda") == "tcnn"
    assert select_backend("auto", device="cpu") in ("cpp", "torch")  # a CPU grid never takes tcnn
    assert select_backend("torch", device="cuda") == "torch"  # --encoding-backend overrides
    assert fake_cuda.created == []  # selection imports, it builds nothing

    monkeypatch.setitem(sys.modules, "tinycudann", None)  # `import tinycudann` now fails
    assert select_backend("auto", device="cuda") == "torch"
    with pytest.raises(BackendUnavailableError) as error:
        select_backend("tcnn", device="cuda")
    message = str(error.value)
    assert "\n" not in message and "import tinycudann failed" in message and TCNN_INSTALL in message


def test_explicit_tcnn_without_cuda_is_one_clear_line():
    for call in (lambda: select_backend("tcnn"), lambda: select_backend("tcnn", device="cpu"),
                 lambda: HashGridEncoding(**SMALL, backend="tcnn")):
        with pytest.raises(BackendUnavailableError) as error:
            call()
        assert isinstance(error.value, RuntimeError) and isinstance(error.value, ValueError)
        message = str(error.value)
        assert "\n" not in message and "needs a CUDA device" in message and "auto, cpp or torch" in message
    assert "tinycudann" not in sys.modules or isinstance(sys.modules["tinycudann"], types.ModuleType)


def tcnn_field_and_twin(seed=0):
    """A field on the (fake) tcnn grid and a torch-backend field with the same weights."""
    torch.manual_seed(seed)
    ref = NeRFField(**SMALL, backend="torch", blob_density=1.0, hidden_dim=32)
    with torch.no_grad():
        ref.encoding.table.uniform_(-1.0, 1.0)
        ref.head.weight.mul_(4.0)
    tcnn = NeRFField(**SMALL, backend="tcnn", device="cuda", blob_density=1.0, hidden_dim=32)
    with torch.no_grad():
        tcnn.encoding.tcnn.params.copy_(ref.encoding.table.reshape(-1))
        for a, b in zip(tcnn.hidden.parameters(), ref.hidden.parameters()):
            a.copy_(b)
        tcnn.head.load_state_dict(ref.head.state_dict())
    return tcnn, ref


def test_tcnn_encoding_config_and_finite_difference_normals(fake_cuda):
    tcnn, ref = tcnn_field_and_twin()
    enc = tcnn.encoding
    assert enc.backend == "tcnn" and not hasattr(enc, "table") and not enc.has_jacobian
    assert tcnn.normal_mode == "finite_difference"
    (config,) = fake_cuda.created
    assert config == {"otype": "HashGrid", "n_levels": 2, "n_features_per_level": 2, "log2_hashmap_size": 8,
                      "base_resolution": 4, "per_level_scale": pytest.approx(2.0), "n_input_dims": 3,
                      "dtype": torch.float32}
    with pytest.raises(RuntimeError, match="no Jacobian"):
        enc.forward_with_jacobian(torch.rand(4, 3))
    assert "tcnn" in repr(enc)

    x = (torch.rand(2000, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 0.9
    analytic = ref(x, with_normals=True)
    out = tcnn(x, with_normals=True)
    torch.testing.assert_close(out["density"], analytic["density"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["albedo"], analytic["albedo"], rtol=1e-5, atol=1e-6)
    cos = (out["normal"] * analytic["normal"]).sum(-1)
    assert cos.mean() > 0.97 and cos.median() > 0.99  # eps = 0.01 of the box: cells here are 1/8 of it
    out["normal"].sum().backward()  # differentiable w.r.t. the grid, like the analytic normals
    assert enc.tcnn.params.grad is not None and enc.tcnn.params.grad.abs().sum() > 0


def test_finite_difference_normals_match_the_analytic_ones_on_cpu():
    """Forced on a torch-backend field: the same sign convention, cosine ~1 where the field is smooth."""
    torch.manual_seed(0)
    field = NeRFField(**SMALL, backend="torch", blob_density=1.0, hidden_dim=32)
    with torch.no_grad():
        field.encoding.table.uniform_(-1.0, 1.0)
        field.head.weight.mul_(4.0)
    x = (torch.rand(2000, 3, generator=torch.Generator().manual_seed(2)) * 2 - 1) * 0.9
    analytic = field(x, with_normals=True)
    assert field.normal_mode == "analytic"
    field.normals, field.normal_eps = "finite_difference", 1e-4
    fd = field(x, with_normals=True)
    torch.testing.assert_close(fd["density"], analytic["density"])
    torch.testing.assert_close(fd["albedo"], analytic["albedo"])
    cos = (fd["normal"] * analytic["normal"]).sum(-1)
    # only points within eps of a cell face or a ReLU kink differ
    assert cos.median() > 0.9999 and (cos > 0.999).float().mean() > 0.97
    # the blob alone (a smooth field): -normalize(grad density) points outward
    blob = NeRFField(**SMALL, backend="torch", normals="finite_difference")
    with torch.no_grad():
        blob.head.weight.zero_()
    away = x.norm(dim=-1) > 0.2  # the cone |x| has its kink at 0; default eps (0.02 here) elsewhere
    torch.testing.assert_close(blob(x[away], with_normals=True)["normal"], F.normalize(x[away], dim=-1),
                               rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="normals must be one of"):
        NeRFField(**SMALL, normals="sobel")


def test_state_dicts_do_not_cross_grid_layouts(fake_cuda):
    tcnn, ref = tcnn_field_and_twin()
    with pytest.raises(RuntimeError) as error:
        ref.load_state_dict(tcnn.state_dict())
    message = str(error.value)
    assert "\n" not in message and "written by the tcnn" in message and "this encoder uses the torch" in message
    with pytest.raises(RuntimeError, match="written by the torch/cpp"):
        tcnn.load_state_dict(ref.state_dict(), strict=False)  # not even leniently
    with pytest.raises(RuntimeError, match="written by the tcnn"):
        ref.encoding.load_state_dict(tcnn.encoding.state_dict())
    # Within a family, as before.
    twin, _ = tcnn_field_and_twin(seed=1)
    twin.load_state_dict(tcnn.state_dict())
    torch.testing.assert_close(twin.encoding.tcnn.params, tcnn.encoding.tcnn.params)
    other = NeRFField(**SMALL, backend="torch", blob_density=1.0, hidden_dim=32)
    other.load_state_dict(ref.state_dict())


def test_describe_backends(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = backends.describe_backends("cpu", "auto")
    assert line.startswith("hash grid: cpp (fused C++/OpenMP op)" if HAS_COMPILER else "hash grid: torch")
    assert line.endswith("sampler: occupancy grid (CPU, dense nerfacc compositing)") and "\n" not in line
    assert backends.describe_backends(None, "torch").startswith("hash grid: torch (pure PyTorch)")
    assert not backends.nerfacc_cuda_available("cpu")
    assert fake_cuda.created == []

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # selection logic only: nothing runs on CUDA
    monkeypatch.setattr(backends, "_nerfacc_cuda", True)
    line = backends.describe_backends("cuda", "auto")
    assert line == ("hash grid: tcnn (tiny-cuda-nn fused CUDA grid; finite-difference normals); "
                    "sampler: nerfacc OccGridEstimator (CUDA, packed rendering)")
    monkeypatch.setattr(backends, "_nerfacc_cuda", False)
    monkeypatch.setitem(sys.modules, "tinycudann", None)
    line = backends.describe_backends("cuda", "auto")
    assert line.startswith("hash grid: torch (pure PyTorch); tinycudann unavailable") and "dense" in line
    assert type(backends.make_occupancy("cpu")) is OccupancyGrid
    assert CudaOccupancy.packed and not getattr(OccupancyGrid, "packed", False)


def packed_weights_on_cpu(t_starts, t_ends, sigmas, packed_info=None, ray_indices=None, n_rays=None,
                          prefix_trans=None):
    """nerfacc's packed `render_weight_from_density` (CUDA scans) in plain torch, for sorted ray_indices."""
    sd = sigmas * (t_ends - t_starts)
    inclusive = torch.cumsum(sd, 0)
    counts = torch.zeros(n_rays, dtype=torch.long).index_add_(0, ray_indices, torch.ones_like(ray_indices))
    starts = counts.cumsum(0) - counts
    before = torch.cat([sd.new_zeros(1), inclusive])[starts]  # sum of all earlier rays' samples
    trans = torch.exp(-(inclusive - sd - before[ray_indices]))
    alphas = 1.0 - torch.exp(-sd)
    return trans * alphas, trans, alphas


def test_packed_renderer_matches_the_dense_one_on_cpu(monkeypatch):
    """`render_rays_packed` with nerfacc's CUDA-only pieces (the estimator's ray marching, the packed
    scans) replaced by torch stand-ins that emit the dense renderer's samples: same images."""
    import nerfacc.volrend

    from sds3d.geometry.cameras import camera_rays, ray_box_intersect
    from sds3d.nerf.render import render_rays, render_rays_packed

    dense_weights = nerfacc.volrend.render_weight_from_density  # the batched path runs on CPU as it is

    def weights(*args, **kwargs):
        packed = kwargs.get("ray_indices") is not None
        return (packed_weights_on_cpu if packed else dense_weights)(*args, **kwargs)

    monkeypatch.setattr(nerfacc.volrend, "render_weight_from_density", weights)
    torch.manual_seed(0)
    field = NeRFField(**SMALL, hidden_dim=16)
    with torch.no_grad():
        field.encoding.table.uniform_(-0.5, 0.5)
    origins, dirs = (v.reshape(-1, 3) for v in camera_rays(orbit_cameras(2, 6)))
    origins = torch.cat([origins, torch.tensor([[3.0, 3.0, 3.0]])])  # and a ray that misses the box
    dirs = torch.cat([dirs, torch.tensor([[0.0, 0.0, 1.0]])])
    s = 24
    occupancy = CudaOccupancy(resolution=8, device="cpu")  # nerfacc's estimator is plain torch but for `sampling`
    sigma_calls = []

    def sampling(rays_o, rays_d, sigma_fn=None, render_step_size=None, stratified=False, early_stop_eps=0.0,
                 alpha_thre=0.0, **kwargs):
        assert render_step_size == occupancy.render_step_size(s) and not stratified
        t_near, t_far, hit = ray_box_intersect(rays_o, rays_d, field.radius)
        edges = t_near[:, None] + (t_far - t_near)[:, None] * torch.linspace(0, 1, s + 1)
        rays = hit.nonzero().squeeze(1)
        ray_indices = rays.repeat_interleave(s)
        t_starts, t_ends = edges[rays, :-1].reshape(-1), edges[rays, 1:].reshape(-1)
        if sigma_fn is not None:
            sigma_calls.append(sigma_fn(t_starts, t_ends, ray_indices).shape)
        return ray_indices.int(), t_starts, t_ends

    monkeypatch.setattr(occupancy.estimator, "sampling", sampling)
    light = F.normalize(torch.randn(origins.shape[0], 3), dim=-1)
    background = torch.rand(origins.shape[0], 3)
    kwargs = dict(num_samples=s, shading="lambertian", light=light, background=background, stratified=False)
    dense = render_rays(field, origins, dirs, **kwargs)
    packed = render_rays_packed(field, origins, dirs, occupancy=occupancy, **kwargs)
    assert set(packed) == set(dense) - {"weights"}
    for key in packed:
        torch.testing.assert_close(packed[key], dense[key], rtol=1e-5, atol=1e-6, msg=key)
    (packed["rgb"].sum() + packed["backfacing"].sum()).backward()
    assert field.encoding.table.grad.abs().sum() > 0
    render_rays_packed(field, origins, dirs, occupancy=occupancy, early_stop_eps=1e-4, num_samples=s,
                       stratified=False)
    assert sigma_calls == [torch.Size([s * (origins.shape[0] - 1)])]
    with pytest.raises(ValueError, match="CudaOccupancy"):
        render_rays_packed(field, origins, dirs, occupancy=OccupancyGrid())


def test_cuda_occupancy_updates_like_the_cpu_grid():
    """`CudaOccupancy.update` (nerfacc's `update_every_n_steps`, plain torch) on CPU: the schedule, the
    density rule and the state_dict; every cell starts occupied, like `OccupancyGrid`."""
    torch.manual_seed(0)
    field = NeRFField(**SMALL)  # the blob: density > 0 within |x| < 0.5
    occupancy = CudaOccupancy(resolution=16, update_every=4, device="cpu")
    grid = OccupancyGrid(resolution=16, update_every=4)
    assert occupancy.occupied_fraction() == 1.0
    assert occupancy.update(field, step=3) is False and occupancy.occupied_fraction() == 1.0
    assert occupancy.update(field, step=4) is True and grid.update(field, step=4)
    assert occupancy.occupied_fraction() == pytest.approx(grid.occupied_fraction(), abs=0.02)
    assert 0.05 < occupancy.occupied_fraction() < 0.4  # the blob, not the whole box
    points = torch.rand(4000, 3) * 2.2 - 1.1
    agree = (occupancy.occupied(points) == grid.occupied(points)).float().mean()
    assert agree > 0.97  # only cells on the blob's rim may differ (different jitter)
    copy = CudaOccupancy(resolution=16, update_every=4, device="cpu")
    copy.load_state_dict(occupancy.state_dict())
    assert torch.equal(copy.estimator.binaries, occupancy.estimator.binaries)
    occupancy.eval()  # update_every_n_steps refuses eval mode; update() does not
    assert occupancy.update(field)


def test_tcnn_grid_on_an_empty_batch_keeps_the_graph(fake_cuda):
    enc = HashGridEncoding(**SMALL, backend="tcnn")  # an explicit tcnn with no device means CUDA
    feats = enc(torch.zeros(0, 3))
    assert feats.shape == (0, 4) and feats.requires_grad
    (feats.sum() + enc(torch.rand(5, 3)).sum()).backward()
