"""The automatic choice of fast backends (tiny-cuda-nn grid, nerfacc's CUDA sampler), on a machine
without CUDA: CPU runs never import tinycudann, CUDA selection logic with a fake tinycudann, the
tcnn code paths of the encoder and field (finite-difference normals) exercised through the fake,
which computes tiny-cuda-nn's HashGrid from grid.h's equations on its own flat parameter vector;
nerfacc's CUDA ray marching replaced by a plain-torch model of its traversal; resuming a run across
samplers and grid layouts; `--device cuda:N`.
"""

import contextlib
import math
import os
import shutil
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sds3d.nerf import backends, hashgrid_cpp
from sds3d.geometry.cameras import orbit_cameras
from sds3d.nerf.encoding import TCNN_INSTALL, BackendUnavailableError, HashGridEncoding, select_backend
from sds3d.nerf.field import NeRFField
from sds3d.nerf.occupancy import CudaOccupancy, OccupancyGrid
from sds3d.nerf.render import render_image

HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++").split()[0]) is not None
SMALL = dict(n_levels=2, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4, max_resolution=8)
# A dense level (4^3 vertices fit 2^8 rows), then hashed ones (9^3, 19^3 > 2^8): both index paths.
MIXED = dict(n_levels=3, n_features_per_level=2, log2_hashmap_size=8, base_resolution=4, per_level_scale=2.2)
PRIMES = (1, 2654435761, 805459861)


def tcnn_layout(config):
    """(scale, resolution, hashmap_size, offset) per level, as grid.h computes them: float32
    grid_scale = exp2(level * log2(per_level_scale)) * base - 1, grid_resolution = ceil(scale) + 1,
    params_in_level = min(next_multiple(resolution^3, 8), 2^log2_hashmap_size), offsets their sums."""
    log2_scale = np.log2(np.float32(config["per_level_scale"]))
    levels, offset = [], 0
    for level in range(config["n_levels"]):
        scale = np.exp2(np.float32(level) * log2_scale) * np.float32(config["base_resolution"]) - np.float32(1.0)
        resolution = int(np.ceil(scale)) + 1
        size = min((resolution ** 3 + 7) // 8 * 8, 2 ** config["log2_hashmap_size"])
        levels.append((float(scale), resolution, size, offset))
        offset += size
    return levels


def tcnn_hash_grid(params, x, config, offset=0.5, scales=None):
    """tiny-cuda-nn's kernel_grid (grid.h, linear interpolation) on its flat params, (N, L * F).

    Per level: pos = x * scale + 0.5, pos_grid = floor(pos), weights pos - pos_grid; grid.h's loop
    over the 8 corners (bit `dim` of the corner number picks pos_grid + 1 on that axis); grid_index
    as written there: the dense index accumulated while the stride stays <= hashmap_size, the
    coherent prime hash (uint32) when the level's table is smaller than the dense grid, then
    modulo hashmap_size; rows of F features from the level's offset. Vectorized over points only.
    `offset` and `scales` replace the 0.5 and grid_scale, to show that they matter.
    """
    n_features = config["n_features_per_level"]
    out = []
    for level, (scale, resolution, size, start) in enumerate(tcnn_layout(config)):
        grid = params[start * n_features:(start + size) * n_features].view(size, n_features)
        pos = x * (scale if scales is None else scales[level]) + offset
        pos_grid = pos.floor()
        frac = pos - pos_grid
        pos_grid = pos_grid.long()
        value = 0.0
        for idx in range(8):
            weight, local = 1.0, []
            for dim in range(3):
                if idx & (1 << dim):
                    weight, corner = weight * frac[:, dim], pos_grid[:, dim] + 1
                else:
                    weight, corner = weight * (1 - frac[:, dim]), pos_grid[:, dim]
                local.append(corner)
            stride, index = 1, 0
            for dim in range(3):
                if stride > size:
                    break
                index = index + local[dim] * stride
                stride *= resolution
            if size < stride:
                index = ((local[0] * PRIMES[0]) ^ (local[1] * PRIMES[1]) ^ (local[2] * PRIMES[2])) & 0xFFFFFFFF
            value = value + weight[:, None] * grid[index % size]
        out.append(value)
    return torch.cat(out, 1)


def fake_tinycudann():
    """A stand-in for tiny-cuda-nn's torch bindings: `Encoding(n_input_dims, encoding_config, dtype=...)`
    with one flat `params` vector of grid.h's size, computing `tcnn_hash_grid` on the CPU. `created`
    records every construction (its config and the CUDA device current then, see `fake_cuda`)."""
    module = types.ModuleType("tinycudann")
    module.created = []
    module.current_device = None

    class Encoding(nn.Module):
        def __init__(self, n_input_dims, encoding_config, seed=1337, dtype=None):
            super().__init__()
            module.created.append(dict(encoding_config, n_input_dims=n_input_dims, dtype=dtype,
                                       device=module.current_device))
            self.config = dict(encoding_config)
            n_params = sum(size for _, _, size, _ in tcnn_layout(self.config)) * encoding_config["n_features_per_level"]
            self.params = nn.Parameter(torch.zeros(n_params))
            self.n_output_dims = encoding_config["n_levels"] * encoding_config["n_features_per_level"]

        def forward(self, x):
            return tcnn_hash_grid(self.params, x, self.config)

    module.Encoding = Encoding
    return module


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch "sees" a GPU and tinycudann "imports" (the fake); `torch.cuda.device(d)` only records d
    as the current device (the fake's `current_device`); no CUDA tensor is ever made."""
    fake = fake_tinycudann()
    monkeypatch.setitem(sys.modules, "tinycudann", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    @contextlib.contextmanager
    def device(d):
        previous, fake.current_device = fake.current_device, torch.device(d)
        try:
            yield
        finally:
            fake.current_device = previous

    monkeypatch.setattr(torch.cuda, "device", device)
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


def tcnn_field_and_twin(seed=0, config=SMALL):
    """A field on the (fake) tcnn grid and a torch-backend field with the same weights: the grid's
    table copied into tcnn's flat layout (each level's rows in use, one level after the other)."""
    torch.manual_seed(seed)
    ref = NeRFField(**config, backend="torch", blob_density=1.0, hidden_dim=32)
    with torch.no_grad():
        ref.encoding.table.uniform_(-1.0, 1.0)
        ref.head.weight.mul_(4.0)
    tcnn = NeRFField(**config, backend="tcnn", device="cuda", blob_density=1.0, hidden_dim=32)
    with torch.no_grad():
        tcnn.encoding.tcnn.params.copy_(torch.cat([ref.encoding.table[l, :lv.size].reshape(-1)
                                                   for l, lv in enumerate(ref.encoding.levels)]))
        for a, b in zip(tcnn.hidden.parameters(), ref.hidden.parameters()):
            a.copy_(b)
        tcnn.head.load_state_dict(ref.head.state_dict())
    return tcnn, ref


def probe_points(n=300, seed=1):
    x = torch.rand(n, 3, generator=torch.Generator().manual_seed(seed))
    corners = torch.tensor([[a, b, c] for a in (0.0, 1.0) for b in (0.0, 1.0) for c in (0.0, 1.0)])
    return torch.cat([x, corners])  # the far faces: the +0.5 offset reaches past the dense grid there


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_cpu_grids_compute_tiny_cuda_nns_function(backend):
    """Our table backends against grid.h written out (`tcnn_hash_grid`) on the same numbers in
    tcnn's flat layout: the per-level scale, the +0.5 offset, dense and hashed indexing all count."""
    if backend == "cpp" and not HAS_COMPILER:
        pytest.skip("no C++ compiler: the cpp backend cannot build")
    for config in (MIXED, SMALL, dict(n_levels=12, n_features_per_level=2, log2_hashmap_size=17, base_resolution=16,
                                      max_resolution=512)):
        torch.manual_seed(0)
        enc = HashGridEncoding(**config, backend=backend)
        with torch.no_grad():
            enc.table.uniform_(-1.0, 1.0)
        layout = tcnn_layout(dict(config, per_level_scale=enc.per_level_scale))
        assert [(lv.resolution, lv.size) for lv in enc.levels] == [(r, size) for _, r, size, _ in layout]
        assert any(lv.dense for lv in enc.levels) and not all(lv.dense for lv in enc.levels)
        flat = torch.cat([enc.table[l, :size].reshape(-1) for l, (_, _, size, _) in enumerate(layout)]).detach()
        x = probe_points()
        config = dict(config, per_level_scale=enc.per_level_scale)
        with torch.no_grad():
            out = enc(x)
            torch.testing.assert_close(out, tcnn_hash_grid(flat, x, config), rtol=1e-4, atol=1e-4)
            # the old convention's pieces, no offset or nerfstudio's floor(base * b^l) scales, are far off
            assert (out - tcnn_hash_grid(flat, x, config, offset=0.0)).abs().max() > 0.1
            old_scales = [math.floor(config["base_resolution"] * enc.per_level_scale ** l) for l in range(len(layout))]
            assert (out - tcnn_hash_grid(flat, x, config, scales=old_scales)).abs().max() > 0.1


def test_tcnn_encoding_config_and_finite_difference_normals(fake_cuda):
    tcnn, ref = tcnn_field_and_twin()
    enc = tcnn.encoding
    assert enc.backend == "tcnn" and not hasattr(enc, "table") and not enc.has_jacobian
    assert tcnn.normal_mode == "finite_difference"
    (config,) = fake_cuda.created
    assert config == {"otype": "HashGrid", "n_levels": 2, "n_features_per_level": 2, "log2_hashmap_size": 8,
                      "base_resolution": 4, "per_level_scale": pytest.approx(2.0), "n_input_dims": 3,
                      "dtype": torch.float32, "device": torch.device("cuda")}
    with pytest.raises(RuntimeError, match="no Jacobian"):
        enc.forward_with_jacobian(torch.rand(4, 3))
    assert "tcnn" in repr(enc)

    x = (torch.rand(2000, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 0.9
    analytic = ref(x, with_normals=True)
    out = tcnn(x, with_normals=True)
    torch.testing.assert_close(out["density"], analytic["density"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["albedo"], analytic["albedo"], rtol=1e-5, atol=1e-5)
    cos = (out["normal"] * analytic["normal"]).sum(-1)
    assert cos.mean() > 0.97 and cos.median() > 0.99  # eps = 0.01 of the box: cells here are 1/8 of it
    out["normal"].sum().backward()  # differentiable w.r.t. the grid, like the analytic normals
    assert enc.tcnn.params.grad is not None and enc.tcnn.params.grad.abs().sum() > 0


def test_tcnn_grid_is_built_on_its_cuda_device(fake_cuda):
    """tiny-cuda-nn allocates on the current CUDA device: the encoder makes its own device current."""
    HashGridEncoding(**SMALL, backend="tcnn", device="cuda:1")
    HashGridEncoding(**SMALL, backend="tcnn", device=torch.device("cuda", 2))
    HashGridEncoding(**SMALL, backend="tcnn")
    assert [c["device"] for c in fake_cuda.created] == [torch.device("cuda:1"), torch.device("cuda:2"),
                                                        torch.device("cuda")]
    assert fake_cuda.current_device is None  # restored afterwards


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


def test_state_dicts_convert_between_grid_layouts(fake_cuda):
    """tcnn's flat vector and the (L, T, F) table hold the same function: a state_dict written by
    one family loads into the other and the field computes the same outputs."""
    tcnn, ref = tcnn_field_and_twin(config=MIXED)
    x = (torch.rand(500, 3, generator=torch.Generator().manual_seed(3)) * 2 - 1) * 0.95
    expected = ref(x)
    for backend in ("torch", "cpp") if HAS_COMPILER else ("torch",):
        cpu = NeRFField(**MIXED, backend=backend, blob_density=1.0, hidden_dim=32)
        cpu.load_state_dict(tcnn.state_dict())
        assert list(cpu.state_dict()) == list(ref.state_dict())
        out = cpu(x)
        torch.testing.assert_close(out["density"], expected["density"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["albedo"], expected["albedo"], rtol=1e-5, atol=1e-5)
    twin, _ = tcnn_field_and_twin(seed=1, config=MIXED)
    twin.load_state_dict(ref.state_dict())  # table -> flat
    torch.testing.assert_close(twin.encoding.tcnn.params, tcnn.encoding.tcnn.params)
    torch.testing.assert_close(twin(x)["density"], expected["density"], rtol=1e-5, atol=1e-5)
    twin.load_state_dict(tcnn.state_dict())  # within a family, as before
    with pytest.raises(ValueError, match="fits neither layout"):
        twin.encoding.convert_parameter(torch.zeros(7))


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


def march_like_nerfacc(occupancy, rays_o, rays_d, render_step_size, near_plane=0.0):
    """nerfacc's `OccGridEstimator.sampling` without sigma_fn, not stratified (its CUDA
    `traverse_grids`, one level, cone_angle 0) in plain torch: from `near_plane` the ray advances in
    fixed steps; a step [t, t + dt] is a sample when its midpoint lies in the box (entry <= mid < exit)
    and in an occupied cell. Returns ray_indices (int32), t_starts, t_ends, packed ray by ray."""
    from sds3d.geometry.cameras import ray_box_intersect

    t_near, t_far, hit = ray_box_intersect(rays_o, rays_d, occupancy.radius)
    steps = int(((t_far[hit].max() - near_plane) / render_step_size).ceil()) + 1
    mids = (near_plane + (torch.arange(steps) + 0.5) * render_step_size).expand(rays_o.shape[0], steps)
    keep = hit[:, None] & (mids >= t_near[:, None]) & (mids < t_far[:, None])
    keep &= occupancy.occupied(rays_o[:, None] + rays_d[:, None] * mids[..., None])
    rays, k = keep.nonzero(as_tuple=True)
    t_mid = mids[rays, k]
    return rays.int(), t_mid - 0.5 * render_step_size, t_mid + 0.5 * render_step_size


def test_packed_renderer_samples_like_the_dense_one(monkeypatch):
    """The packed (GPU) renderer's step gives the dense renderer's sample density: a ray crossing the
    box face to face gets num_samples samples on both, never fewer than one per occupancy cell, and
    a smooth semi-transparent field renders the same within a tolerance the old step (box diagonal
    / num_samples: ~0.58 of the samples) exceeds. nerfacc's marching runs as `march_like_nerfacc`."""
    import nerfacc.volrend

    from sds3d.geometry.cameras import camera_rays, spherical_cameras
    from sds3d.nerf.render import render_rays, render_rays_packed

    dense_weights = nerfacc.volrend.render_weight_from_density

    def weights(*args, **kwargs):
        packed = kwargs.get("ray_indices") is not None
        return (packed_weights_on_cpu if packed else dense_weights)(*args, **kwargs)

    monkeypatch.setattr(nerfacc.volrend, "render_weight_from_density", weights)
    torch.manual_seed(0)
    field = NeRFField(**SMALL, blob_density=3.0, blob_radius=0.7)  # softplus(3 (1 - |x| / 0.7)): smooth, opacity < 1
    with torch.no_grad():
        field.head.weight.zero_()
    occupancy = CudaOccupancy(resolution=16, device="cpu")
    assert occupancy.render_step_size(48) == pytest.approx(2.0 / 48)
    assert CudaOccupancy(resolution=32, device="cpu").render_step_size(8) == pytest.approx(2.0 / 32)  # capped at a cell

    # Samples per ray: the central ray of a camera on the x axis crosses the box face to face.
    axis = spherical_cameras(0.0, torch.tensor([0.0]), 2.75, 45.0, 5, 5)
    o, d = (v.reshape(-1, 3) for v in camera_rays(axis))
    for s in (24, 48):
        rays, _, _ = march_like_nerfacc(occupancy, o, d, occupancy.render_step_size(s))
        assert abs(int((rays == 12).sum()) - s) <= 1  # every cell occupied still: as many as the dense renderer
    occupancy.update(field)
    monkeypatch.setattr(occupancy.estimator, "sampling",
                        lambda rays_o, rays_d, render_step_size=None, **kwargs: march_like_nerfacc(
                            occupancy, rays_o, rays_d, render_step_size))

    o, d = (v.reshape(-1, 3) for v in camera_rays(orbit_cameras(6, 24, elevation_deg=15.0)))
    s = 24
    with torch.no_grad():
        dense = render_rays(field, o, d, num_samples=s, occupancy=occupancy, stratified=False)
        packed = render_rays_packed(field, o, d, num_samples=s, occupancy=occupancy, stratified=False)
        monkeypatch.setattr(CudaOccupancy, "render_step_size", lambda self, n: 2.0 * math.sqrt(3.0) * self.radius / n)
        old = render_rays_packed(field, o, d, num_samples=s, occupancy=occupancy, stratified=False)

    def gap(a):
        return max((a[k] - dense[k]).abs().max().item() for k in ("rgb", "opacity", "albedo"))

    assert 0.3 < dense["opacity"].max() < 0.97  # semi-transparent: every sample counts
    assert gap(packed) < 0.015 < gap(old)


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


def small_run(tmp_path, **overrides):
    """A `TextTo3D` run on the CPU with a small grid, its state built (no teacher needed)."""
    from sds3d.config import GenerateConfig
    from sds3d.pipelines.text_to_3d import TextTo3D

    config = GenerateConfig(prompt="a red cube", device="cpu", n_levels=3, log2_hashmap_size=8, base_resolution=4,
                            max_resolution=16, hidden_dim=16, occupancy_resolution=16, **overrides)
    run = TextTo3D(config, tmp_path)
    run._init_state()
    return run


def test_resume_across_samplers_and_grid_layouts(tmp_path, capsys):
    """A checkpoint as a CUDA run writes it (tcnn's flat grid and Adam moments, nerfacc's estimator
    state) resumes on the CPU: the field computes what it computed, the moments are the same numbers,
    and the occupancy grid is rebuilt from the field (one line) instead of failing on its keys."""
    from sds3d.nerf.encoding import table_to_tcnn_params

    run = small_run(tmp_path)
    with torch.no_grad():
        run.field.encoding.table.uniform_(-0.05, 0.05)
    x = torch.rand(64, 3) * 2 - 1
    run.field(x)["density"].sum().backward()
    run.optimizer.step()  # Adam moments of the table
    run.step = 5
    expected = run.field(x)
    moments = {k: v.clone() for k, v in run.optimizer.state[run.field.encoding.table].items()}
    run._save_checkpoint()

    state = torch.load(run.checkpoint_path, weights_only=True)
    levels = run.field.encoding.levels
    state["field"]["encoding.tcnn.params"] = table_to_tcnn_params(state["field"].pop("encoding.table"), levels)
    for key in ("exp_avg", "exp_avg_sq"):
        state["optimizer"]["state"][0][key] = table_to_tcnn_params(state["optimizer"]["state"][0][key], levels)
    cuda_occupancy = CudaOccupancy(resolution=16, device="cpu")  # nerfacc's estimator updates on the CPU too
    cuda_occupancy.update(run.field)
    state["occupancy"] = cuda_occupancy.state_dict()
    torch.save(state, run.checkpoint_path)

    resumed = small_run(tmp_path)
    capsys.readouterr()
    torch.manual_seed(7)  # the rebuild's jitter comes from torch's global generator
    resumed._load_checkpoint()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "OccGridEstimator" in err and "rebuilt the grid from the field" in err
    assert resumed.step == 5 and type(resumed.occupancy) is OccupancyGrid
    out = resumed.field(x)
    torch.testing.assert_close(out["density"], expected["density"])
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(resumed.optimizer.state[resumed.field.encoding.table][key], moments[key])
    # the rebuilt grid is a fresh grid's first update from the restored field (every cell evaluated),
    # occupied where the estimator's is but for rim cells (the two draw other points in a cell)
    torch.manual_seed(7)
    fresh = OccupancyGrid(resolution=16)
    fresh.update(resumed.field)
    assert torch.equal(resumed.occupancy.density_ema, fresh.density_ema) and (fresh.density_ema >= 0).all()
    assert torch.equal(resumed.occupancy.mask, fresh.mask) and 0.05 < fresh.occupied_fraction() < 0.5
    points = torch.rand(4000, 3) * 2 - 1
    assert (resumed.occupancy.occupied(points) == cuda_occupancy.occupied(points)).float().mean() > 0.95

    # A matching state loads as it is, silently.
    resumed._save_checkpoint()
    again = small_run(tmp_path)
    again._load_checkpoint()
    assert capsys.readouterr().err == ""
    assert torch.equal(again.occupancy.mask, resumed.occupancy.mask)


def test_checkpoints_of_the_old_grid_convention_are_refused(tmp_path):
    run = small_run(tmp_path)
    run._save_checkpoint()
    state = torch.load(run.checkpoint_path, weights_only=True)
    del state["hash_grid"]  # as written before the grid followed tiny-cuda-nn
    torch.save(state, run.checkpoint_path)
    with pytest.raises(ValueError) as error:
        small_run(tmp_path)._load_checkpoint()
    assert "\n" not in str(error.value) and "earlier sds3d" in str(error.value) and "--overwrite" in str(error.value)


@pytest.mark.parametrize("device, current", [("cuda:1", torch.device("cuda:1")), ("cuda", None), ("cpu", None)])
def test_run_makes_its_cuda_device_current_before_building(tmp_path, monkeypatch, device, current):
    """`--device cuda:N`: torch.cuda.set_device(N) before the field (tcnn allocates on the current device)."""
    from sds3d.pipelines import text_to_3d

    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: events.append(("set_device", torch.device(d))))
    make_field = text_to_3d.make_field

    def fake_make_field(config, device, layout=None):  # records the device, builds on the CPU (no CUDA here)
        events.append(("make_field", torch.device(device)))
        return make_field(config, "cpu", layout)

    monkeypatch.setattr(text_to_3d, "make_field", fake_make_field)
    run = small_run(tmp_path) if device == "cpu" else None
    if run is None:
        from sds3d.config import GenerateConfig

        config = GenerateConfig(prompt="a red cube", device=device, n_levels=2, log2_hashmap_size=8, hidden_dim=16,
                                occupancy_resolution=8)
        text_to_3d.TextTo3D(config, tmp_path)._init_state()
    expected = ([("set_device", current)] if current is not None else []) + [("make_field", torch.device(device))]
    assert events == expected
