"""The NeRF field: a hash grid and a small MLP giving density and albedo, with analytic normals.

Layout: one hash grid -> one MLP (ReLU hidden layers, `hidden_dim` wide) -> 4 outputs, a density
logit and 3 albedo logits (threestudio's implicit volume also shares one network for density and
colour features). Density is softplus(logit + blob), where the blob
``blob_density * (1 - |x| / blob_radius)`` starts the optimisation from a ball of density around
the origin (Magic3D / threestudio "blob_magic3d"). Albedo is sigmoid(logits).

Normals are -normalize(grad_x density), computed by explicit formulas: d logit / d features is
taken in reverse mode through the MLP (g <- W^T (g * ReLU'), one small GEMM per layer), contracted
with the hash grid's closed-form Jacobian (D, 3, N), and the blob's gradient is added; nothing
needs a double backward. (Pushing the Jacobian forward through the layers instead costs an
(H, 3N) GEMM and mask per layer, three times the work of one (H, N) pass back.) The MLP runs
feature-major, (features, points), so that every layer is one GEMM. On the fused CPU hash grid a
one-hidden-layer network runs as one fused kernel instead (`hashgrid_cpp.field_mlp`, the same
function and gradients: as torch ops each step streams the (H, N) activations through memory some
twenty times); `fused_mlp=False` keeps the torch ops, the reference it is tested against.

With `albedo_levels` = k (0 < k < the grid's levels; 0 or more levels mean all of them) the albedo
depends on the k coarsest levels only, the density on all of them: the last half of every hidden
layer's units ("colour units") read only the coarse levels' features (and, deeper, only colour
units), and the albedo logits read only colour units. It is a mask on the weights, so it costs
nothing. Why: a level finer than the pixels the teacher sees gets no consistent colour signal, and
SDS noise walks its albedo at random, which shows as grain in the texture; the shape still needs
those levels for its edges.

A grid with no Jacobian (the tcnn backend) gets finite-difference normals instead (threestudio's
"finite_difference" normals): central differences of the density logit along each axis, with
offsets of `normal_eps` of the box side; the 6 offset points go through the field in the same
batch as the samples. `normals` ("auto", "analytic", "finite_difference") overrides the choice.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn import functional as F

from . import hashgrid_cpp
from .encoding import HashGridEncoding

# cpu-fast's hash grid (GenerateConfig's defaults, which say why it stops at 64 cells).
CPU_FAST_ENCODING = dict(n_levels=6, n_features_per_level=2, log2_hashmap_size=17, base_resolution=16,
                         max_resolution=64)
NORMAL_MODES = ("auto", "analytic", "finite_difference")
# softplus(x) = x above this (torch's default threshold): exp would overflow, and log1p(e^x) = x in fp32.
SOFTPLUS_THRESHOLD = 20.0


class _Softplus(torch.autograd.Function):
    """softplus with its derivative from the output: d/dx log(1 + e^x) = 1 - e^-y = -expm1(-y)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = torch.where(x > SOFTPLUS_THRESHOLD, x, x.clamp_max(SOFTPLUS_THRESHOLD).exp_().log1p_())
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return -grad * torch.expm1(-y)  # out of place: double backward (tests) differentiates this


class _Sigmoid(torch.autograd.Function):
    """sigmoid with torch's derivative s (1 - s); e^-x = inf below -88 gives s = 0, as it should."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        s = torch.exp(-x).add_(1.0).reciprocal_()
        ctx.save_for_backward(s)
        return s

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (s,) = ctx.saved_tensors
        return grad * s * (1.0 - s)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) (x above SOFTPLUS_THRESHOLD: x), bit-identical at any number of torch CPU threads.

    Why not F.softplus: torch's fused CPU kernels for softplus and sigmoid run the vector body of
    each thread's chunk through a vectorised exp and the chunk's scalar tail through libm's, which
    differ in the last bit; the chunks follow the thread count, so the density (and every gradient
    after it) did too. `exp`, `log1p` and `expm1` apply one vector function to every element, tail
    included, and the rest is exactly rounded arithmetic: the same bits at 1, 2 or 3 threads
    (tests/test_thread_invariance.py). An autograd.Function, not a chain of autograd ops: ~1 ms
    more than F.softplus + torch.sigmoid per step on 60k samples instead of ~8 ms.
    """
    return _Softplus.apply(x)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """1 / (1 + e^-x), bit-identical at any number of torch CPU threads (see `softplus` for why not
    torch.sigmoid)."""
    return _Sigmoid.apply(x)


class _FeatureMajorLinear(torch.autograd.Function):
    """out = W h (+ b[:, None]) for feature-major h (in, N), with a weight gradient that is the same
    at any number of torch CPU threads.

    Why: the weight gradient is a GEMM reducing over all N points, g h^T. MKL splits its output's
    columns among the threads, and a block narrower than the vector width (16 floats on AVX-512) runs
    another micro-kernel with another summation order; for the first layer's (64, 24) gradient
    (24 = 12 levels x 2 features) that changed the last bits from 2 or 3 threads on. Computed with
    the wider dimension as the output's columns, (h g^T)^T for a layer that widens (64 columns),
    g h^T for the head (4, 64) and for the normals' W^T (24, 64), every block is full width and the
    bits are the same at 1, 2 or 3 threads (tests/test_thread_invariance.py); autograd's own mm
    backward picks the orientation from the strides, the narrow one for both. The input gradient
    reduces over the few `out` features and the bias gradient over each row: one fixed order already.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        return torch.mm(weight, h) if bias is None else torch.addmm(bias[:, None], weight, h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight = ctx.saved_tensors
        grad_h = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_h = weight.t() @ grad
        if ctx.needs_input_grad[1]:
            grad_weight = (h @ grad.t()).t() if weight.shape[0] >= weight.shape[1] else grad @ h.t()
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(1)
        return grad_h, grad_weight, grad_bias


def linear_feature_major(layer: nn.Linear, h: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """`layer` on feature-major h (in, N) -> (out, N), one GEMM, thread-count-invariant gradients;
    `weight` replaces `layer.weight` (the field's masked weights, `NeRFField._weight`)."""
    return _FeatureMajorLinear.apply(h, layer.weight if weight is None else weight, layer.bias)


def albedo_masks(dims: list[int], coarse_features: int) -> list[torch.Tensor]:
    """Weight masks (out, in) of the hidden layers and the head (`dims` = [features, hidden...]) that make
    the albedo logits (head rows 1-3) a function of the first `coarse_features` features alone.

    The last half of each hidden layer's units are colour units: in the first layer they read the
    coarse features only, deeper only the previous layer's colour units. The density row of the head
    reads every unit, the albedo rows the colour units only."""
    masks = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        mask = torch.ones(b, a)
        colour = slice(b - b // 2, b)
        if i == 0:
            mask[colour, coarse_features:] = 0.0
        else:
            mask[colour, : a - a // 2] = 0.0
        masks.append(mask)
    head = torch.ones(4, dims[-1])
    head[1:, : dims[-1] - dims[-1] // 2] = 0.0
    return masks + [head]


DISPLAY_NORMAL_EPS = 0.02
"""`display_normals`' difference, as a fraction of the box side: about 2 pixels of a 128 px turntable
at the evaluation distance (10 cells of the 512-cell grid cpu-fast had before, 1.3 of today's
64-cell one). It cut the shaded grain of trained runs of that grid 2.8-3.1x (benchmarks/speckle.py)."""


class NeRFField(nn.Module):
    """Density and albedo in the box [-radius, radius]^3; zero density outside it.

    With `regions` (a layout of objects: Set-the-Scene, Cohen-Bar et al. 2023; GraphDreamer, Gao et
    al. 2024) density lives only inside the regions' boxes, and each region starts from its own blob,
    the single-object blob scaled by the region's scale about its centre. `only_region(k)` keeps
    region k alone, so that a render from cameras around it shows that object as if it were alone.
    `regions` is a dict of tensors: "lo", "hi" (K, 3) the boxes, "centre" (K, 3), "scale" (K,)."""

    def __init__(self, radius: float = 1.0, encoding: HashGridEncoding | None = None, hidden_dim: int = 64,
                 n_hidden_layers: int = 1, blob_density: float = 10.0, blob_radius: float = 0.5,
                 normals: str = "auto", normal_eps: float = 0.01, regions: dict[str, torch.Tensor] | None = None,
                 albedo_levels: int = 0, fused_mlp: bool = True, **encoding_kwargs):
        super().__init__()
        if normals not in NORMAL_MODES:
            raise ValueError(f"normals must be one of {NORMAL_MODES}, got {normals!r}")
        self.radius, self.blob_density, self.blob_radius = radius, blob_density, blob_radius
        self.active_region: int | None = None
        self.has_regions = regions is not None
        if regions is not None:  # buffers: saved with the field, moved with it
            for name in ("lo", "hi", "centre", "scale"):
                self.register_buffer(f"region_{name}", torch.as_tensor(regions[name], dtype=torch.float32).clone())
        self.normals, self.normal_eps = normals, normal_eps
        # False keeps the network in torch ops even on the fused CPU hash grid: the reference the fused
        # kernel is tested and benchmarked against (benchmarks/step.py --compare-fused-mlp)
        self.fused_mlp = fused_mlp
        self.encoding = encoding if encoding is not None else HashGridEncoding(**encoding_kwargs)
        dims = [self.encoding.output_dim] + [hidden_dim] * n_hidden_layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(dims[-1], 4)  # [density logit, albedo logits x 3]
        nn.init.zeros_(self.head.bias)  # start from the pure blob and grey albedo
        if albedo_levels < 0:
            raise ValueError(f"albedo_levels must be >= 0 (0, or the grid's levels and more: all of them), got {albedo_levels}")
        self.albedo_levels = albedo_levels
        self.masked = 0 < albedo_levels < self.encoding.n_levels
        if self.masked:  # not saved: they follow from albedo_levels, like the grid's layout
            coarse = albedo_levels * self.encoding.n_features_per_level
            for i, mask in enumerate(albedo_masks(dims, coarse)):
                self.register_buffer(f"mask_{i}", mask, persistent=False)

    def _layer(self, i: int) -> nn.Linear:
        """Hidden layer i, or the head for i = len(hidden)."""
        return self.head if i == len(self.hidden) else self.hidden[i]

    def _weight(self, i: int) -> torch.Tensor:
        """The weight of `_layer(i)` as the field uses it: masked with `albedo_levels`."""
        weight = self._layer(i).weight
        return weight * getattr(self, f"mask_{i}") if self.masked else weight

    def _linear(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """`_layer(i)` with its `_weight` on feature-major h (in, N) -> (out, N)."""
        return linear_feature_major(self._layer(i), h, self._weight(i))

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """World points in the box -> [0, 1]^3 for the encoding."""
        return (x / self.radius + 1.0) * 0.5

    def inside(self, x: torch.Tensor) -> torch.Tensor:
        """Where density may be non-zero: the box, and with regions inside one (the active one) of them."""
        inside = (x.abs() <= self.radius * (1 + 1e-6)).all(-1)
        if not self.has_regions:
            return inside
        lo, hi = self._regions("lo"), self._regions("hi")
        in_region = ((x[:, None] >= lo) & (x[:, None] <= hi)).all(-1).any(-1)  # (N, K) -> (N,)
        return inside & in_region

    def _regions(self, name: str) -> torch.Tensor:
        """A region buffer, (K, ...), or only the active region's (1, ...)."""
        value = getattr(self, f"region_{name}")
        return value if self.active_region is None else value[self.active_region : self.active_region + 1]

    @contextlib.contextmanager
    def only_region(self, index: int):
        """Within the block, density lives in region `index` alone (the other objects vanish)."""
        if not self.has_regions or not 0 <= index < self.region_lo.shape[0]:
            raise ValueError(f"region {index} does not exist: this field has "
                             f"{self.region_lo.shape[0] if self.has_regions else 0} regions")
        saved, self.active_region = self.active_region, index
        try:
            yield self
        finally:
            self.active_region = saved

    def _blob_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(offsets x - c (N, 3), their norms (N,), radii (N,)) of the blob each point takes: the one
        at the origin, or with regions the region whose blob is highest there (all of them, not only
        the active one: a region's density must not change when it is rendered alone)."""
        if not self.has_regions:
            return x, x.norm(dim=-1), x.new_full(x.shape[:1], self.blob_radius)
        centre, radius = self.region_centre, self.blob_radius * self.region_scale  # (K, 3), (K,)
        offsets = x[:, None] - centre  # (N, K, 3)
        dist = offsets.norm(dim=-1)
        k = (1.0 - dist / radius).argmax(-1)  # (N,)
        rows = torch.arange(x.shape[0], device=x.device)
        return offsets[rows, k], dist[rows, k], radius[k]

    def blob(self, x: torch.Tensor) -> torch.Tensor:
        _, dist, radius = self._blob_parts(x)
        return self.blob_density * (1.0 - dist / radius)

    def blob_gradient(self, x: torch.Tensor) -> torch.Tensor:
        """d blob / dx (N, 3): -blob_density / radius along the unit offset from the blob's centre."""
        offsets, dist, radius = self._blob_parts(x)
        return -(self.blob_density / radius)[:, None] * offsets / dist.clamp_min(1e-9)[:, None]

    @property
    def normal_mode(self) -> str:
        """The normals in use: "analytic" (closed-form Jacobian) or "finite_difference" (no Jacobian, or forced)."""
        if self.normals != "auto":
            return self.normals
        return "analytic" if getattr(self.encoding, "has_jacobian", True) else "finite_difference"

    @contextlib.contextmanager
    def display_normals(self, eps: float = DISPLAY_NORMAL_EPS):
        """Within the block, normals by central differences `eps` of the box side apart, for pictures
        (turntable, contact sheet) only. The analytic normals of a hash grid carry its finest levels'
        high-frequency density noise, which Lambertian shading turns into a sandpaper grain; a
        difference over a few of those cells averages it out (a wider difference only rounds edges
        by as much). Training keeps its own normals."""
        saved = self.normals, self.normal_eps
        self.normals, self.normal_eps = "finite_difference", eps
        try:
            yield self
        finally:
            self.normals, self.normal_eps = saved

    def forward(self, x: torch.Tensor, with_normals: bool = False) -> dict[str, torch.Tensor]:
        """x (N, 3) world points -> density (N,), albedo (N, 3) and, if asked, normal (N, 3)."""
        if with_normals and self.normal_mode == "finite_difference":
            return self._forward_finite_difference(x)
        u = self.to_unit(x)
        if with_normals:
            feats, jac = self.encoding.forward_with_jacobian(u)
            j = jac.permute(1, 2, 0)  # (D, 3, N): contiguous storage of the encoding
        else:
            feats, j = self.encoding(u), None
        h = feats.t()  # (D, N)
        if self._runs_fused(feats):
            out, grad_u = hashgrid_cpp.field_mlp(h, j, self._weight(0), self.hidden[0].bias, self._weight(1),
                                                 self.head.bias)
            return self._outputs(x, out, None if grad_u is None else grad_u.t().contiguous())  # rows: fast norms
        active = []  # ReLU derivatives (H, N), for the normals
        for i in range(len(self.hidden)):
            pre = self._linear(i, h)  # (H, N)
            h = F.relu(pre)
            if j is not None:
                active.append((pre > 0).to(pre.dtype))
        out = self._linear(len(self.hidden), h)  # (4, N)
        grad_u = None
        if with_normals:
            # d logit / d features in reverse mode: one (in, H) GEMM per layer, g <- W^T (g * relu'),
            # far cheaper than pushing the (H, 3, N) Jacobian forward through every layer.
            g = self._weight(len(self.hidden))[0][:, None]  # (H, 1)
            for i in reversed(range(len(self.hidden))):
                g = _FeatureMajorLinear.apply(g * active[i], self._weight(i).t(), None)  # (in, N) = W^T (g * relu')
            # then through the encoding's Jacobian (D, 3, N), one coordinate at a time (contiguous rows)
            grad_u = torch.stack([(j_k * g).sum(0) for j_k in j.unbind(1)], dim=1)
        return self._outputs(x, out, grad_u)

    def _runs_fused(self, feats: torch.Tensor) -> bool:
        """Whether the network runs as the fused CPU kernel (`hashgrid_cpp.field_mlp`): one hidden
        layer, and the fused CPU hash grid in use (backend "cpp"; "torch" keeps every op in torch)."""
        return (self.fused_mlp and len(self.hidden) == 1 and self.encoding.backend == "cpp"
                and hashgrid_cpp.supports_mlp(feats, self.hidden[0].out_features))

    def _outputs(self, x: torch.Tensor, out: torch.Tensor, grad_u: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """density, albedo and (given grad_u, d logit / d u (N, 3) of the network) normal from the
        network's logits out (4, N) at world points x (N, 3)."""
        logit = out[0] + self.blob(x)
        result = {
            "density": torch.where(self.inside(x), softplus(logit), torch.zeros_like(logit)),
            "albedo": sigmoid(out[1:]).t(),
        }
        if grad_u is not None:
            # the network's part is w.r.t. the unit coordinates u = (x / radius + 1) / 2
            grad = grad_u * (0.5 / self.radius) + self.blob_gradient(x)
            # softplus' > 0 only scales the gradient, so it is left out: the direction is the same,
            # and it cannot underflow to a zero normal where the density is tiny.
            result["normal"] = -F.normalize(grad, dim=-1)
        return result

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """(4, N): density logit (blob included) and albedo logits, without normals."""
        h = self.encoding(self.to_unit(x)).t()  # (D, N)
        for i in range(len(self.hidden)):
            h = F.relu(self._linear(i, h))
        out = self._linear(len(self.hidden), h)
        return torch.cat([(out[0] + self.blob(x))[None], out[1:]])

    def _forward_finite_difference(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """`forward` with normals -normalize(grad logit), the gradient by central differences.

        One field call on 7N points: x and x +- eps e_k (eps = normal_eps of the box side, in world
        units 2 * radius * normal_eps). Differentiable w.r.t. the parameters like the analytic normals.
        """
        n = x.shape[0]
        eps = 2.0 * self.radius * self.normal_eps
        offsets = torch.eye(3, dtype=x.dtype, device=x.device) * eps
        offsets = torch.cat([offsets, -offsets])  # (6, 3): +x +y +z -x -y -z
        points = torch.cat([x, (x[None] + offsets[:, None]).reshape(-1, 3)])
        out = self._logits(points)
        logit, shifted = out[0, :n], out[0, n:].view(6, n)
        grad = ((shifted[:3] - shifted[3:]) / (2.0 * eps)).t()  # (N, 3)
        return {
            "density": torch.where(self.inside(x), softplus(logit), torch.zeros_like(logit)),
            "albedo": sigmoid(out[1:, :n]).t(),
            "normal": -F.normalize(grad, dim=-1),
        }

    def density(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)["density"]
