"""The NeRF field: a hash grid and a small MLP giving density and albedo, with analytic normals.

Layout: one hash grid -> one MLP (ReLU hidden layers, `hidden_dim` wide) -> 4 outputs, a density
logit and 3 albedo logits (threestudio's implicit volume also shares one network for density and
colour features). Density is softplus(logit + blob), where the blob
``blob_density * (1 - |x| / blob_radius)`` starts the optimisation from a ball of density around
the origin (Magic3D / threestudio "blob_magic3d"). Albedo is sigmoid(logits).

Normals are -normalize(grad_x density), computed in forward mode by explicit formulas: the hash
grid's closed-form Jacobian (D, 3, N) is pushed through the layers (J <- W J, masked by ReLU'),
the blob's gradient is added, and nothing needs a double backward. The MLP runs feature-major,
(features, points), so that every layer, on values and on Jacobians alike, is one GEMM.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .encoding import HashGridEncoding

# The hash grid configuration that keeps CPU steps fast (see the encoding's benchmark notes).
CPU_FAST_ENCODING = dict(n_levels=12, n_features_per_level=2, log2_hashmap_size=17, base_resolution=16,
                         max_resolution=512)


class NeRFField(nn.Module):
    """Density and albedo in the box [-radius, radius]^3; zero density outside it."""

    def __init__(self, radius: float = 1.0, encoding: HashGridEncoding | None = None, hidden_dim: int = 64,
                 n_hidden_layers: int = 1, blob_density: float = 10.0, blob_radius: float = 0.5,
                 **encoding_kwargs):
        super().__init__()
        self.radius, self.blob_density, self.blob_radius = radius, blob_density, blob_radius
        self.encoding = encoding if encoding is not None else HashGridEncoding(**encoding_kwargs)
        dims = [self.encoding.output_dim] + [hidden_dim] * n_hidden_layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(dims[-1], 4)  # [density logit, albedo logits x 3]
        nn.init.zeros_(self.head.bias)  # start from the pure blob and grey albedo

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """World points in the box -> [0, 1]^3 for the encoding."""
        return (x / self.radius + 1.0) * 0.5

    def inside(self, x: torch.Tensor) -> torch.Tensor:
        return (x.abs() <= self.radius * (1 + 1e-6)).all(-1)

    def blob(self, x: torch.Tensor) -> torch.Tensor:
        return self.blob_density * (1.0 - x.norm(dim=-1) / self.blob_radius)

    def forward(self, x: torch.Tensor, with_normals: bool = False) -> dict[str, torch.Tensor]:
        """x (N, 3) world points -> density (N,), albedo (N, 3) and, if asked, normal (N, 3)."""
        u = self.to_unit(x)
        if with_normals:
            feats, jac = self.encoding.forward_with_jacobian(u)
            j = jac.permute(1, 2, 0)  # (D, 3, N): contiguous storage of the encoding
        else:
            feats, j = self.encoding(u), None
        h = feats.t()  # (D, N)
        n = h.shape[1]
        for layer in self.hidden:
            pre = torch.addmm(layer.bias[:, None], layer.weight, h)  # (H, N)
            h = F.relu(pre)
            if j is not None:
                j = (layer.weight @ j.reshape(j.shape[0], 3 * n)).view(layer.out_features, 3, n) * (pre > 0)[:, None, :]
        out = torch.addmm(self.head.bias[:, None], self.head.weight, h)  # (4, N)
        logit = out[0] + self.blob(x)
        inside = self.inside(x)
        result = {
            "density": torch.where(inside, F.softplus(logit), torch.zeros_like(logit)),
            "albedo": torch.sigmoid(out[1:]).t(),
        }
        if with_normals:
            # d logit / d x: the MLP part is w.r.t. the unit coordinates u = (x / radius + 1) / 2.
            grad = (self.head.weight[0] @ j.reshape(j.shape[0], 3 * n)).view(3, n).t() * (0.5 / self.radius)
            r = x.norm(dim=-1, keepdim=True).clamp_min(1e-9)
            grad = grad - (self.blob_density / self.blob_radius) * x / r
            # softplus' > 0 only scales the gradient, so it is left out: the direction is the same,
            # and it cannot underflow to a zero normal where the density is tiny.
            result["normal"] = -F.normalize(grad, dim=-1)
        return result

    def density(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)["density"]
