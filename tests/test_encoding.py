"""HashGridEncoding against a plain per-point, per-level, per-corner loop."""

import math

import pytest
import torch

from sds3d.nerf.encoding import HashGridEncoding, level_resolutions

PRIMES = (1, 2654435761, 805459861)


def reference_encode(table, x, resolutions):
    """The textbook hash grid, one point, level and corner at a time (Python ints for the hash)."""
    n_levels, table_size, _ = table.shape
    out = []
    for p in range(x.shape[0]):
        feats = []
        for level in range(n_levels):
            res = float(resolutions[level])
            scaled = [float(x[p, a].detach()) * res for a in range(3)]
            cell = [math.floor(s) for s in scaled]
            frac = [x[p, a] * res - cell[a] for a in range(3)]  # tensors: differentiable in x
            value = 0.0
            for cx in (0, 1):
                for cy in (0, 1):
                    for cz in (0, 1):
                        corner = (cell[0] + cx, cell[1] + cy, cell[2] + cz)
                        h = (corner[0] * PRIMES[0]) ^ (corner[1] * PRIMES[1]) ^ (corner[2] * PRIMES[2])
                        h %= table_size
                        w = 1.0
                        for a, c in enumerate((cx, cy, cz)):
                            w = w * (frac[a] if c else 1.0 - frac[a])
                        value = value + w * table[level, h]
            feats.append(value)
        out.append(torch.cat(feats))
    return torch.stack(out)


def small_encoding(dtype=torch.float32):
    torch.manual_seed(0)
    enc = HashGridEncoding(n_levels=4, n_features_per_level=2, log2_hashmap_size=10, base_resolution=4,
                           max_resolution=40).to(dtype)
    with torch.no_grad():
        enc.table.uniform_(-1.0, 1.0)  # visible values, not the 1e-4 init
    return enc


def test_resolutions_follow_nerfstudio():
    assert level_resolutions(12, 16, math.exp((math.log(512) - math.log(16)) / 11)).tolist() == [
        16, 21, 30, 41, 56, 77, 105, 145, 198, 272, 373, 511]
    enc = HashGridEncoding()
    assert enc.resolutions.tolist() == [16, 23, 33, 48, 70, 101, 147, 212, 307, 445, 645, 933, 1351, 1955, 2830, 4095]
    assert enc.table.shape == (16, 2 ** 19, 2) and enc.output_dim == 32 and enc.backend == "torch"
    assert enc.table.abs().max() <= 1e-4


def test_forward_matches_loop_reference():
    enc = small_encoding()
    # The coarse level (4^3 cells) fits the table; the fine ones (40^3) collide in the hash.
    assert (enc.resolutions[0] + 1) ** 3 < 2 ** 10 < (enc.resolutions[-1] + 1) ** 3
    x = torch.rand(50, 3)
    x[0] = 0.0
    x[1] = 1.0  # the far faces
    ref = reference_encode(enc.table.detach(), x, enc.resolutions)
    out = enc(x)
    assert out.shape == (50, 8)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    feats, jac = enc.forward_with_jacobian(x)
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-5)
    assert jac.shape == (50, 8, 3)


@pytest.mark.parametrize("points_need_grad", [False, True])
def test_table_gradient_matches_loop_reference(points_need_grad):
    enc = small_encoding()
    x = torch.rand(50, 3)
    v = torch.randn(50, 8)
    ref_table = enc.table.detach().clone().requires_grad_()
    (reference_encode(ref_table, x, enc.resolutions) * v).sum().backward()
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
    ref = reference_encode(enc.table.detach(), xr, enc.resolutions)
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
