"""The fused C++ hash grid (backend "cpp") against the pure-torch encoder (itself checked against
tiny-cuda-nn's grid.h written out in tests/test_encoding.py), dense and hashed levels alike.

The first test to use the extension builds it into the cache ($SDS3D_CACHE or ~/.cache/sds3d/ext;
about 15-30 s on 2 cores, once); the tests skip only where no C++ compiler is present.
"""

import io
import os
import shutil
import subprocess
import sys

import pytest
import torch

from sds3d.nerf import hashgrid_cpp
from sds3d.nerf.encoding import HashGridEncoding
from sds3d.nerf.field import CPU_FAST_ENCODING, NeRFField

HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++").split()[0]) is not None

ODD_CONFIGS = {
    # non-power-of-two resolutions 3, 5, 8 and a table small enough that every level collides
    "F=1": dict(n_levels=3, n_features_per_level=1, log2_hashmap_size=7, base_resolution=3, per_level_scale=1.7),
    "F=4": dict(n_levels=4, n_features_per_level=4, log2_hashmap_size=9, base_resolution=5, max_resolution=37),
    "F=3": dict(n_levels=2, n_features_per_level=3, log2_hashmap_size=6, base_resolution=7, max_resolution=11),
    "cpu-fast": CPU_FAST_ENCODING,
    "default": dict(),
}


@pytest.fixture(scope="module")
def cpp_ready():
    if not HAS_COMPILER:
        pytest.skip(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on this machine: the cpp backend cannot build")
    hashgrid_cpp.load()  # a compiler that fails to build the extension is a failure, not a skip


def encoder_pair(config, seed=0):
    """(torch, cpp) encoders with the same visible table (uniform(-1, 1), not the 1e-4 init)."""
    torch.manual_seed(seed)
    ref = HashGridEncoding(**config, backend="torch")
    with torch.no_grad():
        ref.table.uniform_(-1.0, 1.0)
    fused = HashGridEncoding(**config, backend="cpp")
    fused.load_state_dict(ref.state_dict())
    assert ref.backend == "torch" and fused.backend == "cpp"
    return ref, fused


def probe_points(enc, n_random=700, seed=1):
    """Random points, the cube's corners and faces, points on every level's lattice planes, outside points."""
    g = torch.Generator().manual_seed(seed)
    x = [torch.rand(n_random, 3, generator=g)]
    x.append(torch.tensor([[a, b, c] for a in (0.0, 1.0) for b in (0.0, 1.0) for c in (0.0, 1.0)]))
    for level in enc.levels:
        k = torch.randint(1, level.resolution + 1, (20, 3), generator=g).float()
        on_planes = ((k - 0.5) / level.scale).clamp(0.0, 1.0)  # pos = x * scale + 0.5 on a cell boundary (near enough)
        mixed = torch.where(torch.rand(20, 3, generator=g) < 0.5, on_planes, torch.rand(20, 3, generator=g))
        x += [on_planes, mixed]
    x.append(torch.tensor([[-0.25, 0.5, 1.5], [1e-8, 1 - 1e-7, 0.5], [2.0, -1.0, 0.0]]))  # clamped
    return torch.cat(x)



def grad_close(actual, expected):
    # Sums of the same terms in another order: float tolerance relative to the gradient's scale.
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("name", list(ODD_CONFIGS))
def test_features_jacobian_and_table_gradients_match_torch(cpp_ready, name):
    ref, fused = encoder_pair(ODD_CONFIGS[name])
    x = probe_points(ref)
    d = ref.output_dim
    v, vj = torch.randn(x.shape[0], d), torch.randn(x.shape[0], d, 3)

    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), rtol=1e-6, atol=1e-6)

    outputs, grads = {}, {}
    for label, enc in (("torch", ref), ("cpp", fused)):
        feats, jac = enc.forward_with_jacobian(x)
        assert feats.shape == (x.shape[0], d) and jac.shape == (x.shape[0], d, 3)
        outputs[label] = feats.detach(), jac.detach()
        for loss_name, loss in (("features", (feats * v).sum()), ("jacobian", (jac * vj).sum()),
                                ("both", (feats * v).sum() + (jac * vj).sum())):
            enc.table.grad = None
            loss.backward(retain_graph=True)
            grads[label, loss_name] = enc.table.grad.clone()
        enc.table.grad = None
        (enc(x) * v).sum().backward()  # forward() without the Jacobian
        grads[label, "forward"] = enc.table.grad.clone()

    (feats, jac), (ref_feats, ref_jac) = outputs["cpp"], outputs["torch"]
    torch.testing.assert_close(feats, ref_feats, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(jac, ref_jac, rtol=1e-5, atol=1e-5 * ref_jac.abs().max().item())
    for loss_name in ("features", "jacobian", "both", "forward"):
        grad_close(grads["cpp", loss_name], grads["torch", loss_name])
    grad_close(grads["cpp", "forward"], grads["cpp", "features"])

def field_pair(albedo_levels=0, n_hidden_layers=1):
    """(torch, cpp) NeRFFields with the same parameters; the cpp one runs the fused MLP
    (csrc/mlp_kernels.cpp) when it has one hidden layer, the torch one every op in torch."""
    torch.manual_seed(0)
    fields = {b: NeRFField(encoding=HashGridEncoding(**CPU_FAST_ENCODING, backend=b), albedo_levels=albedo_levels,
                           n_hidden_layers=n_hidden_layers) for b in ("torch", "cpp")}
    with torch.no_grad():
        fields["torch"].encoding.table.uniform_(-0.1, 0.1)
        fields["torch"].head.bias.uniform_(-0.5, 0.5)  # every bias in play (the head's starts at zero)
    fields["cpp"].load_state_dict(fields["torch"].state_dict())
    return fields


@pytest.mark.parametrize("n, albedo_levels, loss_terms", [
    (3000, 0, "all"), (3000, 3, "all"), (1, 0, "all"), (577, 0, "all"), (577, 0, "no normals"),
    (577, 0, "normals only"), (0, 0, "all")])
def test_field_outputs_and_gradients_match_torch(cpp_ready, n, albedo_levels, loss_terms):
    """NeRFField on both backends: density, albedo, normals and every parameter's gradient; the cpp
    field's network is the fused kernel, for point counts that fill no pass (1, 577 = 9 passes + 1
    point, 0) and for losses that leave the normals or the logits without a gradient."""
    fields = field_pair(albedo_levels)
    x = torch.rand(n, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out, grads = {}, {}
    for b, field in fields.items():
        out[b] = field(x, with_normals=True)
        loss = (out[b]["normal"] * x).sum()
        if loss_terms != "normals only":
            loss = loss + out[b]["density"].sum() + out[b]["albedo"].square().sum()
        if loss_terms == "no normals":
            loss = out[b]["density"].sum() + out[b]["albedo"].square().sum()
        loss.backward()
        grads[b] = {k: p.grad for k, p in field.named_parameters()}
    for k in ("density", "albedo", "normal"):
        torch.testing.assert_close(out["cpp"][k], out["torch"][k], rtol=1e-5, atol=1e-5)
    for k in grads["torch"]:
        actual, expected = grads["cpp"][k], grads["torch"][k]
        if expected is None:  # out of the loss's reach in torch's graph (a bias of the normals alone): zeros
            expected = torch.zeros_like(actual)
        if n == 0:
            assert actual is None or not actual.any()
            continue
        grad_close(actual, expected)


def test_field_without_normals_and_with_two_layers_match_torch(cpp_ready):
    for n_hidden_layers in (1, 2):  # two hidden layers: the torch ops on both backends
        fields = field_pair(n_hidden_layers=n_hidden_layers)
        x = torch.rand(700, 3) * 2 - 1
        outs = {b: f(x) for b, f in fields.items()}
        for b, field in fields.items():
            (outs[b]["density"].sum() + outs[b]["albedo"].sum()).backward()
        torch.testing.assert_close(outs["cpp"]["albedo"], outs["torch"]["albedo"], rtol=1e-5, atol=1e-5)
        for (k, a), b in zip(fields["cpp"].named_parameters(), fields["torch"].parameters()):
            grad_close(a.grad, b.grad)


def test_fused_field_mlp_is_thread_count_invariant(cpp_ready):
    """Outputs and every gradient bit for bit the same at 1, 2 and 3 threads (the weight gradients
    are summed over fixed blocks of points in a fixed order)."""
    field = field_pair(albedo_levels=3)["cpp"]
    x = torch.rand(9000, 3) * 2 - 1
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            field.zero_grad(set_to_none=True)
            out = field(x, with_normals=True)
            (out["density"].sum() + out["albedo"].square().sum() + (out["normal"] * x).sum()).backward()
            results.append([out[k].detach() for k in ("density", "albedo", "normal")] +
                           [p.grad for p in field.parameters()])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_state_dict_round_trip_between_backends(cpp_ready):
    config = ODD_CONFIGS["F=4"]
    x = probe_points(HashGridEncoding(**config, backend="torch"))
    for source, target in (("cpp", "torch"), ("torch", "cpp")):
        torch.manual_seed(3)
        a = HashGridEncoding(**config, backend=source)
        with torch.no_grad():
            a.table.normal_()
        buffer = io.BytesIO()
        torch.save(a.state_dict(), buffer)
        buffer.seek(0)
        b = HashGridEncoding(**config, backend=target)
        b.load_state_dict(torch.load(buffer, weights_only=True))
        assert list(a.state_dict()) == list(b.state_dict()) == ["table"]
        assert b.backend == target
        with torch.no_grad():
            torch.testing.assert_close(b(x), a(x), rtol=1e-6, atol=1e-6)


def test_thread_count_does_not_change_results(cpp_ready):
    _, fused = encoder_pair(ODD_CONFIGS["cpu-fast"])
    x = torch.rand(5000, 3)
    v, vj = torch.randn(5000, fused.output_dim), torch.randn(5000, fused.output_dim, 3)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            fused.table.grad = None
            feats, jac = fused.forward_with_jacobian(x)
            ((feats * v).sum() + (jac * vj).sum()).backward()
            results.append((feats.detach(), jac.detach(), fused.table.grad))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)  # each level's scatter is serial: deterministic


def test_points_requiring_grad_use_the_torch_path(cpp_ready):
    ref, fused = encoder_pair(ODD_CONFIGS["F=4"])
    x = torch.rand(50, 3)
    grads = []
    for enc in (ref, fused):
        xg = x.clone().requires_grad_()
        enc(xg).sum().backward()
        grads.append(xg.grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_edge_inputs(cpp_ready):
    ref, fused = encoder_pair(ODD_CONFIGS["F=1"])
    assert fused(torch.zeros(0, 3)).shape == (0, 3)
    feats, jac = fused.forward_with_jacobian(torch.zeros(0, 3))
    assert feats.shape == (0, 3) and jac.shape == (0, 3, 3)
    nan = torch.tensor([[float("nan"), 0.5, 0.5]])
    assert fused(nan).isnan().all() and ref(nan).isnan().all()
    assert fused(torch.rand(10, 3, dtype=torch.float64)).dtype == torch.float64  # float64 points: torch path


def test_torch_backend_never_builds(tmp_path):
    """Importing sds3d and using backend="torch" (the default) compiles and loads nothing."""
    code = (
        "import torch, sds3d, sds3d.cli, sds3d.nerf.field\n"
        "from sds3d.nerf import hashgrid_cpp\n"
        "from sds3d.nerf.encoding import HashGridEncoding\n"
        "enc = HashGridEncoding(n_levels=2, log2_hashmap_size=8)\n"
        "feats, jac = enc.forward_with_jacobian(torch.rand(10, 3))\n"
        "(feats.sum() + jac.sum()).backward()\n"
        "assert enc.backend == 'torch' and not hashgrid_cpp._tried and not hashgrid_cpp.is_built()\n"
    )
    env = dict(os.environ, SDS3D_CACHE=str(tmp_path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert not (tmp_path / "ext").exists()


def sampler_rays(n=600, seed=0):
    """Rays of every kind the sampler meets: from cameras round the box, from inside it, missing
    it, and parallel to the axes (zero direction components, the box's 1e-9 guard)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    origins = -2.8 * dirs + 0.4 * (torch.rand(n, 3, generator=g) - 0.5)
    origins[: n // 6] = torch.rand(n // 6, 3, generator=g) * 1.6 - 0.8  # inside the box
    origins[n // 6: n // 3] += 3.0  # mostly missing it
    axis = torch.eye(3).repeat(n // 12, 1)[: n // 6]
    dirs[n // 3: n // 2] = torch.where(torch.rand(len(axis), 1, generator=g) < 0.5, axis, -axis)
    origins[n // 3: n // 2] = -2.5 * dirs[n // 3: n // 2] + (torch.rand(len(axis), 3, generator=g) - 0.5) * (1 - axis)
    return origins.contiguous(), dirs.contiguous()


@pytest.mark.parametrize("stratified", [True, False])
def test_fused_ray_sampler_gives_the_torch_samples_bit_for_bit(cpp_ready, stratified):
    """occupied_samples' C++ op (csrc/sampling_kernels.cpp) against its torch ops: the same kept
    samples, in the same order, with the same bits (same float32 operations, same offsets drawn),
    at 1, 2 and 3 threads. Two grids: one smaller than the rays' box, and one whose cell faces
    (every 0.05) carry the midpoints of the axis rays' 20 intervals (every 0.1 from -0.95), where a
    rounding different from torch's would flip the cell."""
    from sds3d.nerf.occupancy import OccupancyGrid
    from sds3d.nerf.render import occupied_samples

    origins, dirs = sampler_rays()
    threads = torch.get_num_threads()
    try:
        for k, (radius, resolution) in enumerate(((0.9, 16), (1.0, 40))):
            grid = OccupancyGrid(radius=radius, resolution=resolution)
            grid.mask.copy_(torch.rand(grid.mask.shape, generator=torch.Generator().manual_seed(k)) < 0.3)
            reference = occupied_samples(origins, dirs, 20, 1.0, grid, stratified, torch.Generator().manual_seed(2))
            assert 0 < len(reference[0]) < 0.5 * 600 * 20  # some kept, many dropped
            assert torch.equal(reference[0], reference[0].sort().values)  # row-major order
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                fused = occupied_samples(origins, dirs, 20, 1.0, grid, stratified, torch.Generator().manual_seed(2),
                                         fused=True)
                for a, b in zip(fused, reference):
                    assert a.dtype == b.dtype and torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)
    empty = OccupancyGrid(resolution=8)
    empty.mask.zero_()
    assert all(len(v) == 0 for v in occupied_samples(origins, dirs, 20, 1.0, empty, stratified, fused=True))


def test_renders_of_a_fused_field_use_the_fused_sampler_and_match_the_torch_one(cpp_ready, monkeypatch):
    """A field on the cpp grid renders through the C++ sampler; the torch sampler (fused_sampling=False)
    gives the same image, gradients and all, bit for bit."""
    from sds3d.geometry.cameras import spherical_cameras
    from sds3d.nerf import render
    from sds3d.nerf.occupancy import OccupancyGrid

    field = field_pair()["cpp"]
    grid = OccupancyGrid(resolution=32)
    grid.update(field, generator=torch.Generator().manual_seed(0))
    assert 0.0 < grid.occupied_fraction() < 1.0
    camera = spherical_cameras(20.0, [30.0, 200.0], 2.5, 45.0, 16)
    used = []
    real = render.occupied_samples
    monkeypatch.setattr(render, "occupied_samples", lambda *a, **k: used.append(a[-1]) or real(*a, **k))
    results = []
    for fused in (True, False):
        field.zero_grad(set_to_none=True)
        out = render.render_image(field, camera, occupancy=grid, shading="lambertian", num_samples=32,
                                  generator=torch.Generator().manual_seed(1), fused_sampling=fused)
        (out["rgb"].square().sum() + out["opacity"].sum()).backward()
        results.append([out[k].detach() for k in ("rgb", "opacity", "depth", "normal")] +
                       [p.grad for p in field.parameters()])
    assert used == [True, False]
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_missing_compiler_falls_back_with_one_warning_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDS3D_CACHE", str(tmp_path))  # no cached build to import
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(hashgrid_cpp, "_tried", False)
    monkeypatch.setattr(hashgrid_cpp, "_module", None)
    monkeypatch.setattr(hashgrid_cpp, "_error", None)
    monkeypatch.setattr(hashgrid_cpp, "_warned", False)
    enc = HashGridEncoding(n_levels=2, log2_hashmap_size=8, backend="auto")
    assert enc.backend == "torch"
    assert HashGridEncoding(n_levels=2, log2_hashmap_size=8, backend="auto").backend == "torch"  # no second line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-compiler" in err and "pure-torch encoder" in err
    with pytest.raises(RuntimeError, match="no-such-compiler"):
        HashGridEncoding(n_levels=2, log2_hashmap_size=8, backend="cpp")
    with pytest.raises(ValueError):
        HashGridEncoding(backend="tcnn")


def test_a_killed_build_does_not_block_the_next(tmp_path, monkeypatch):
    """torch's lock file, left by a killed build, is removed once stale instead of waited on forever."""
    lock = tmp_path / "lock"
    lock.touch()
    os.utime(lock, (0, 0))
    hashgrid_cpp._wait_for_other_build(lock)
    assert not lock.exists()
    lock.touch()  # a build in progress: waited on until it is stale too
    monkeypatch.setattr(hashgrid_cpp, "STALE_LOCK_SECONDS", 0.3)
    hashgrid_cpp._wait_for_other_build(lock)
    assert not lock.exists()
