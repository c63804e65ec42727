"""HashGridEncoding against tiny-cuda-nn's HashGrid, written out from grid.h one point, level and
corner at a time (Python ints for the index, numpy float32 for tcnn's float arithmetic)."""

import math

import numpy as np
import pytest
import torch

from sds3d.nerf.encoding import GridLevel, HashGridEncoding, grid_levels

PRIMES = (1, 2654435761, 805459861)


def tcnn_levels(n_levels, log2_hashmap_size, base_resolution, per_level_scale):
    """(scale, resolution, hashmap_size) per level, from grid.h: grid_scale, grid_resolution and the
    GridEncodingTemplated constructor's params_in_level (next_multiple(res^3, 8), capped at 2^log2)."""
    log2_scale = np.log2(np.float32(per_level_scale))  # std::log2 of the float config value
    out = []
    for level in range(n_levels):
        scale = np.exp2(np.float32(level) * log2_scale) * np.float32(base_resolution) - np.float32(1.0)
        resolution = int(np.ceil(scale)) + 1
        params_in_level = (resolution ** 3 + 7) // 8 * 8
        out.append((float(scale), resolution, min(params_in_level, 2 ** log2_hashmap_size)))
    return out


def tcnn_grid_index(corner, hashmap_size, resolution):
    """grid.h's grid_index: dense while the strides fit the level's table, else the coherent prime
    hash, in uint32 arithmetic, modulo the level's size."""
    stride, index = 1, 0
    for dim in range(3):
        if stride > hashmap_size:
            break
        index = (index + corner[dim] * stride) & 0xFFFFFFFF
        stride *= resolution
    if hashmap_size < stride:
        index = 0
        for dim in range(3):
            index ^= (corner[dim] * PRIMES[dim]) & 0xFFFFFFFF
    return index % hashmap_size


def reference_encode(table, x, levels, offset=0.5):
    """tcnn's kernel_grid (linear interpolation): pos = x * scale + 0.5, corners floor(pos) + {0, 1},
    weights pos - floor(pos); a level's rows are the first `hashmap_size` of its slice of `table`.
    Differentiable w.r.t. x and table (autograd through the weights and the gathered rows)."""
    n_levels = table.shape[0]
    out = []
    for p in range(x.shape[0]):
        feats = []
        for level in range(n_levels):
            scale, resolution, size = levels[level]
            pos = [x[p, a].clamp(0.0, 1.0) * scale + offset for a in range(3)]  # tensors: differentiable in x
            cell = [math.floor(float(v.detach())) for v in pos]
            frac = [pos[a] - cell[a] for a in range(3)]
            value = 0.0
            for cx in (0, 1):
                for cy in (0, 1):
                    for cz in (0, 1):
                        corner = (cell[0] + cx, cell[1] + cy, cell[2] + cz)
                        w = 1.0
                        for a, c in enumerate((cx, cy, cz)):
                            w = w * (frac[a] if c else 1.0 - frac[a])
                        value = value + w * table[level, tcnn_grid_index(corner, size, resolution)]
            feats.append(value)
        out.append(torch.cat(feats))
    return torch.stack(out)


def levels_of(enc):
    """The encoder's levels as (scale, resolution, size), checked against grid.h's (the float32
    scales to an ulp, see `assert_levels_match`): the float64 comparisons need the very same scale."""
    expected = tcnn_levels(enc.n_levels, enc.log2_hashmap_size, enc.base_resolution, enc.per_level_scale)
    assert_levels_match(enc.levels, expected)
    return [(lv.scale, lv.resolution, lv.size) for lv in enc.levels]


def small_encoding(dtype=torch.float32):
    torch.manual_seed(0)
    enc = HashGridEncoding(n_levels=4, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4,
                           max_resolution=40).to(dtype)
    with torch.no_grad():
        enc.table.uniform_(-1.0, 1.0)  # visible values, not the 1e-4 init
    return enc


def assert_levels_match(levels, expected):
    """Resolutions and sizes exactly; scales to an ulp or two (exp2 in float32: torch's, numpy's and
    CUDA's exp2f may round differently)."""
    assert [(lv.resolution, lv.size) for lv in levels] == [(r, size) for _, r, size in expected]
    assert [lv.scale for lv in levels] == pytest.approx([s for s, _, _ in expected], rel=3e-7)


def test_levels_follow_tcnn():
    cpu_fast = math.exp((math.log(512) - math.log(16)) / 11)
    levels = grid_levels(12, 17, 16, cpu_fast)
    assert_levels_match(levels, tcnn_levels(12, 17, 16, cpu_fast))
    # base_resolution counts vertices (scale base - 1), the finest level has max_resolution of them,
    # and the levels whose res^3 vertices fit 2^17 rows are dense.
    assert levels[0] == GridLevel(15.0, 16, 4096, True) and levels[-1].resolution == 512
    assert [lv.resolution for lv in levels] == [16, 22, 31, 42, 57, 78, 106, 146, 199, 273, 374, 512]
    assert [lv.dense for lv in levels] == [True] * 4 + [False] * 8
    assert levels[2].size == 29792 == 31 ** 3 + 1 and all(lv.size == 2 ** 17 for lv in levels[4:])
    enc = HashGridEncoding()
    assert_levels_match(enc.levels, tcnn_levels(16, 19, 16, 1.447269))
    assert enc.levels[-1].resolution == 4096 and sum(lv.dense for lv in enc.levels) == 5
    assert enc.table.shape == (16, 2 ** 19, 2) and enc.output_dim == 32 and enc.backend == "torch"
    assert enc.table.abs().max() <= 1e-4


def test_forward_matches_tcnn_reference():
    enc = small_encoding()
    levels = tcnn_levels(enc.n_levels, enc.log2_hashmap_size, enc.base_resolution, enc.per_level_scale)
    # Dense coarse levels (4^3 and 9^3 vertices fit the 2^10 rows), hashed fine ones.
    assert [lv.dense for lv in enc.levels] == [True, True, False, False]
    x = torch.rand(50, 3)
    x[0] = 0.0
    x[1] = 1.0  # the far faces: the +0.5 offset reaches one vertex past the dense grid (wraps, as in tcnn)
    x[2] = torch.tensor([1.0, 0.3, 0.0])
    ref = reference_encode(enc.table.detach(), x, levels)
    out = enc(x)
    assert out.shape == (50, 8)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    feats, jac = enc.forward_with_jacobian(x)
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-5)
    assert jac.shape == (50, 8, 3)
    # The reference tells the conventions apart: no half-cell offset, or nerfstudio's resolutions
    # floor(base * b^l) instead of tcnn's scales base * b^l - 1, give other features.
    assert (reference_encode(enc.table.detach(), x[:10], levels, offset=0.0) - out[:10]).abs().max() > 0.1
    nerfstudio_scales = [(math.floor(4 * enc.per_level_scale ** l), r, size) for l, (_, r, size) in enumerate(levels)]
    assert (reference_encode(enc.table.detach(), x[:10], nerfstudio_scales) - out[:10]).abs().max() > 0.1


@pytest.mark.parametrize("points_need_grad", [False, True])
def test_table_gradient_matches_loop_reference(points_need_grad):
    enc = small_encoding()
    x = torch.rand(50, 3)
    v = torch.randn(50, 8)
    ref_table = enc.table.detach().clone().requires_grad_()
    (reference_encode(ref_table, x, levels_of(enc)) * v).sum().backward()
    x_in = x.clone().requires_grad_(points_need_grad)  # custom backward / plain autograd path
    (enc(x_in) * v).sum().backward()
    torch.testing.assert_close(enc.table.grad, ref_table.grad, atol=1e-5, rtol=1e-5)


def test_jacobian_matches_autograd_and_finite_differences():
    enc = small_encoding(torch.float64)
    x = torch.rand(6, 3, dtype=torch.float64) * 0.98 + 0.01
    _, jac = enc.forward_with_jacobian(x)
    for p in range(x.shape[0]):
        auto = torch.autograd.functional.jacobian(lambda y: enc(y[None])[0], x[p])  # (D, 3)
        torch.testing.assert_close(jac[p], auto)
        eps = 1e-6
        fd = torch.stack([(enc((x[p] + eps * e)[None]) - enc((x[p] - eps * e)[None]))[0] / (2 * eps)
                          for e in torch.eye(3, dtype=torch.float64)], -1)
        torch.testing.assert_close(jac[p], fd, atol=1e-5, rtol=1e-5)
    # And against the loop reference's autograd, all points at once (sum over points is separable).
    xr = x.clone().requires_grad_()
    ref = reference_encode(enc.table.detach(), xr, levels_of(enc))
    rows = [torch.autograd.grad(ref[:, d].sum(), xr, retain_graph=True)[0] for d in range(ref.shape[1])]
    torch.testing.assert_close(jac, torch.stack(rows, 1))


def test_jacobian_table_gradient_fast_path_matches_autograd_path():
    enc = small_encoding()
    x = torch.rand(300, 3)
    v, vj = torch.randn(300, 8), torch.randn(300, 8, 3)
    grads = []
    for need_grad in (False, True):
        enc.table.grad = None
        feats, jac = enc.forward_with_jacobian(x.clone().requires_grad_(need_grad))
        ((feats * v).sum() + (jac * vj).sum()).backward()
        grads.append(enc.table.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-5)
    # Jacobian only (the features' gradient is absent, not zero-filled).
    enc.table.grad = None
    (enc.forward_with_jacobian(x)[1] * vj).sum().backward()
    only_jac = enc.table.grad.clone()
    enc.table.grad = None
    (enc.forward_with_jacobian(x.clone().requires_grad_())[1] * vj).sum().backward()
    torch.testing.assert_close(only_jac, enc.table.grad, atol=1e-4, rtol=1e-5)


def test_cpu_fast_config_shapes_and_no_grad():
    enc = HashGridEncoding(n_levels=12, log2_hashmap_size=17, max_resolution=512)
    x = torch.rand(1000, 3)
    with torch.no_grad():
        feats, jac = enc.forward_with_jacobian(x)
    assert feats.shape == (1000, 24) and jac.shape == (1000, 24, 3)
    assert torch.equal(feats, enc(x))
    assert enc(torch.zeros(0, 3)).shape == (0, 24)
