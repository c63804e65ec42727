"""NeRFField: analytic normals against autograd, the initial blob, gradients through normals."""

import pytest
import torch
from torch.nn import functional as F

from sds3d.nerf.field import CPU_FAST_ENCODING, NeRFField

SMALL = dict(n_levels=4, log2_hashmap_size=12, base_resolution=4, max_resolution=32)


def random_field(n_hidden_layers=1, **kwargs):
    torch.manual_seed(0)
    field = NeRFField(n_hidden_layers=n_hidden_layers, **{**SMALL, **kwargs})
    with torch.no_grad():
        field.encoding.table.uniform_(-1.0, 1.0)  # a field with structure, not the blob alone
    return field


@pytest.mark.parametrize("n_hidden_layers, albedo_levels", [(1, 0), (2, 0), (1, 2), (2, 1)])
def test_analytic_normals_match_autograd(n_hidden_layers, albedo_levels):
    # A mild blob so that softplus' does not underflow anywhere (autograd's gradient would vanish).
    field = random_field(n_hidden_layers, radius=1.5, blob_density=1.0, blob_radius=1.0, albedo_levels=albedo_levels)
    x = (torch.rand(300, 3) * 2 - 1) * 1.4
    out = field(x, with_normals=True)
    xr = x.clone().requires_grad_()
    density = field(xr)["density"]
    (grad,) = torch.autograd.grad(density.sum(), xr)
    expected = -F.normalize(grad, dim=-1)
    torch.testing.assert_close(out["density"], density.detach())
    assert grad.norm(dim=-1).min() > 1e-4
    torch.testing.assert_close(out["normal"], expected, atol=1e-4, rtol=1e-4)


def test_initial_field_is_a_blob():
    torch.manual_seed(0)
    field = NeRFField(**CPU_FAST_ENCODING)
    direction = F.normalize(torch.randn(5, 3), dim=-1)
    r = torch.linspace(0.0, 0.95, 20)
    x = (direction[:, None, :] * r[None, :, None]).reshape(-1, 3)
    out = field(x, with_normals=True)
    density = out["density"].view(5, 20)
    assert (density[:, 1:] < density[:, :-1]).all()  # decreasing with r
    # density(0) = softplus(blob_density + raw), raw being the MLP's (small) density logit.
    with torch.no_grad():
        raw = field.head(F.relu(field.hidden[0](field.encoding(field.to_unit(torch.zeros(1, 3))))))[0, 0]
    torch.testing.assert_close(out["density"][0], F.softplus(field.blob_density + raw))
    assert abs(float(raw)) < 1.0 and density[:, 0].min() > 9.0
    assert density[:, -1].max() < 0.01  # near the box: (almost) empty
    # At the blob's edge the density is softplus(raw) ~ 0.7, and normals point outwards.
    at_edge = field(direction * field.blob_radius)["density"]
    torch.testing.assert_close(at_edge, F.softplus(raw).expand(5), atol=1e-2, rtol=0)
    normals = out["normal"].view(5, 20, 3)[:, 1:]
    cos = (normals * direction[:, None, :]).sum(-1)
    assert cos.min() > 0.99
    albedo = out["albedo"]
    assert albedo.shape == (100, 3) and ((albedo - 0.5).abs() < 0.1).all()


def test_density_is_zero_outside_the_box():
    field = random_field(radius=1.0)
    x = torch.tensor([[1.2, 0.0, 0.0], [0.0, -1.01, 0.0], [0.3, 0.2, 2.0], [0.9, 0.9, 0.9]])
    density = field.density(x)
    assert torch.equal(density[:3], torch.zeros(3)) and density[3] > 0


def test_normal_loss_gradient_reaches_the_table_and_matches_double_backward():
    field = random_field()
    x = (torch.rand(200, 3) * 2 - 1) * 0.9
    target = F.normalize(torch.randn(200, 3), dim=-1)
    out = field(x, with_normals=True)
    ((out["normal"] - target) ** 2).sum().backward()
    table_grad = field.encoding.table.grad.clone()
    weight_grad = field.hidden[0].weight.grad.clone()
    assert table_grad.abs().sum() > 0 and weight_grad.abs().sum() > 0
    # The same loss through autograd's double backward (normals from torch.autograd.grad).
    field.zero_grad()
    xr = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(field(xr)["density"].sum(), xr, create_graph=True)
    ((-F.normalize(grad, dim=-1) - target) ** 2).sum().backward()
    torch.testing.assert_close(table_grad, field.encoding.table.grad, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(weight_grad, field.hidden[0].weight.grad, atol=1e-4, rtol=1e-3)


def test_display_normals_average_grid_noise_and_restore_the_mode():
    """display_normals: central differences `eps` of the box side apart. On the blob plus a hash-grid
    ripple of the finest cells, the analytic normals follow the ripple while the display normals
    stay close to the blob's radial normal x/|x| (the ripple averages out over the difference);
    leaving the block restores the field's own normals."""
    torch.manual_seed(0)
    field = NeRFField(n_levels=1, log2_hashmap_size=16, base_resolution=64, max_resolution=64, blob_density=2.0)
    with torch.no_grad():
        field.encoding.table.uniform_(-0.5, 0.5)  # fine-cell noise of the density logit
    direction = F.normalize(torch.randn(400, 3), dim=-1)
    x = direction * 0.4
    radial = direction
    analytic = field(x, with_normals=True)["normal"]
    with field.display_normals(0.05) as same:
        assert same is field and field.normal_mode == "finite_difference"
        smooth = field(x, with_normals=True)["normal"]
    assert field.normal_mode == "analytic" and field.normal_eps == 0.01
    off_analytic = 1 - (analytic * radial).sum(-1)
    off_display = 1 - (smooth * radial).sum(-1)
    assert off_analytic.mean() > 0.05  # the ripple does tilt the analytic normals
    assert off_display.mean() < 0.5 * off_analytic.mean(), (off_display.mean(), off_analytic.mean())
    torch.testing.assert_close(field(x, with_normals=True)["normal"], analytic)


def test_cpu_fast_encoding_is_the_generate_default():
    """CPU_FAST_ENCODING (the nerf layer cannot import the config) names the grid cpu-fast trains."""
    from sds3d.config import make_config
    from sds3d.pipelines.text_to_3d import make_field

    field = make_field(make_config("cpu-fast", prompt="a red cube"))
    reference = NeRFField(**CPU_FAST_ENCODING)
    assert field.encoding.table.shape == reference.encoding.table.shape
    assert [lv.resolution for lv in field.encoding.levels] == [lv.resolution for lv in reference.encoding.levels]


@pytest.mark.parametrize("n_hidden_layers", [1, 2])
def test_albedo_levels_keep_the_albedo_off_the_fine_levels(n_hidden_layers):
    # Rewriting the table of the levels past albedo_levels must leave the albedo bit for bit as it was
    # and move the density; rewriting a coarse level moves both.
    field = random_field(n_hidden_layers, albedo_levels=2)
    x = torch.rand(400, 3) * 2 - 1
    before = field(x, with_normals=True)
    with torch.no_grad():
        field.encoding.table[2:].uniform_(-1.0, 1.0)
    fine = field(x, with_normals=True)
    assert torch.equal(fine["albedo"], before["albedo"])
    assert (fine["density"] - before["density"]).abs().max() > 1e-2
    with torch.no_grad():
        field.encoding.table[:1].uniform_(-1.0, 1.0)
    assert (field(x)["albedo"] - fine["albedo"]).abs().max() > 1e-4
    # and the gradients agree: none from the albedo reaches the fine levels
    field(x, with_normals=True)["albedo"].sum().backward()
    per_level = field.encoding.table.grad.abs().sum((1, 2))
    assert torch.all(per_level[2:] == 0) and torch.all(per_level[:2] > 0)


@pytest.mark.parametrize("albedo_levels", [0, 4, 5])
def test_albedo_levels_zero_or_all_is_the_plain_field(albedo_levels):
    plain, other = random_field(), random_field(albedo_levels=albedo_levels)
    x = torch.rand(200, 3) * 2 - 1
    a, b = plain(x, with_normals=True), other(x, with_normals=True)
    for key in ("density", "albedo", "normal"):
        assert torch.equal(a[key], b[key])
    with pytest.raises(ValueError, match="albedo_levels must be >= 0"):
        random_field(albedo_levels=-1)
