"""Multiresolution hash grid encoding (Instant-NGP), in plain torch, with a closed-form Jacobian.

The function is tiny-cuda-nn's ``HashGrid`` (``include/tiny-cuda-nn/encodings/grid.h``, linear
interpolation), so that every backend ("torch", "cpp", "tcnn") computes the same features from the
same hyperparameters, and a checkpoint trained on one means the same on another:

- level ``l`` has the float32 scale ``s_l = exp2(l * log2(per_level_scale)) * base_resolution - 1``
  (tcnn's ``grid_scale``; the -1 makes ``base_resolution`` count vertices, not cells) and
  ``R_l = ceil(s_l) + 1`` vertices per axis (``grid_resolution``). With ``max_resolution`` given,
  ``per_level_scale = exp((ln max - ln base) / (L - 1))``, so the finest level has ``max_resolution``
  vertices per axis;
- a point ``x`` in [0, 1]^3 is at ``pos = x * s_l + 0.5`` (tcnn's ``pos_fract``; the half-cell offset
  staggers the levels, Instant-NGP appendix A); its cell corners are ``floor(pos) + {0, 1}`` per
  axis and its weights the offsets ``pos - floor(pos)``;
- a level uses ``size_l = min(next_multiple(R_l^3, 8), T)`` rows of its table. When the R_l^3
  vertices fit (coarse levels) it is dense: corner ``(X, Y, Z)`` is row
  ``(X + Y R_l + Z R_l^2) mod size_l`` (a corner one past the last vertex, reachable through the
  +0.5 offset, wraps around, as in tcnn). The finer levels are hashed,
  ``(X * 1) ^ (Y * 2654435761) ^ (Z * 805459861) mod T`` (int64 here; for a power-of-two T the low
  bits equal tcnn's uint32 products);
- features of a point are the trilinear interpolation of the 8 corner features; the output is
  level-major: ``[l0 f0, l0 f1, l1 f0, ...]``.

Why tcnn's convention rather than nerfstudio's (``floor(base * b**l)`` cells, no offset, every level
hashed), which this file followed before: the GPU path is tcnn, and a run resumed, exported or
evaluated on the other kind of machine must see the same field. nerfstudio's ``HashEncoding`` stays
a peer for speed only (``benchmarks/encoding.py``): its features differ from ours by design. The
remaining difference to tcnn is rounding: tcnn computes ``pos`` with one fused multiply-add
(``fmaf``) and its GPU ``exp2f``; here the multiply and the add round separately (as the C++ op
does, bit for bit), a float32 ulp of ``pos`` apart, which moves a feature by ~1e-7 of its scale.
Checkpoints of runs trained under the old convention are refused when resumed (see
`sds3d.pipelines.text_to_3d`); ``GRID_CONVENTION`` names the current one.

Speed (CPU): everything is computed one level at a time (the level's table stays in cache and the
temporaries stay small) in a feature-major layout, (features, corners, points), where the lerps
are contiguous elementwise ops and the outputs need no transposition. Training (table gradients,
points without grad) goes through `_HashGridInterp`, whose backward scatters the corner gradients
with one `index_add_` per level and feature instead of autograd's chain of slice-backward copies.
Points that require grad (e.g. normals checked against autograd) go through `hash_grid_encode`
under plain autograd: the same formulas. The per-axis index factors (primes or dense strides) are
cached per device, so that a call builds no small tensors (on a GPU: no host-to-device copies).

Backends: ``HashGridEncoding(backend=...)`` picks the implementation: "torch" (this file), "cpp"
(the fused OpenMP op of `sds3d.nerf.hashgrid_cpp`, JIT-built on first use), "tcnn" (tiny-cuda-nn's
fused CUDA grid, imported only when chosen) or "auto" (tcnn for a CUDA device when tinycudann
imports; otherwise cpp when it builds, else torch). torch and cpp share one parameter (``self.table``,
(L, T, F); a level uses its first ``size_l`` rows). tcnn keeps its own flat parameter vector
(``self.tcnn.params``): the levels' used rows one after the other, (sum size_l, F) flattened. The
two layouts hold the same numbers, so a state_dict written by one family is converted when loaded
into the other (`table_to_tcnn_params`, `tcnn_params_to_table`). tcnn gives no Jacobian: a field on
it computes normals by finite differences (`NeRFField`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
from typing import NamedTuple

import torch
from torch import nn

from . import hashgrid_cpp

PRIMES = (1, 2654435761, 805459861)
# Written into run checkpoints: the function the table parametrizes (see the module docstring).
GRID_CONVENTION = "tcnn-hashgrid"


class GridLevel(NamedTuple):
    """One level of the grid, as tiny-cuda-nn lays it out (see the module docstring)."""

    scale: float  # s_l (a float32 value): pos = x * scale + 0.5
    resolution: int  # R_l = ceil(s_l) + 1 vertices per axis
    size: int  # rows of the level's table in use: min(next_multiple(R_l^3, 8), T)
    dense: bool  # R_l^3 <= size: indexed densely, else hashed


def grid_levels(n_levels: int, log2_hashmap_size: int, base_resolution: int,
                per_level_scale: float) -> tuple[GridLevel, ...]:
    """The levels of tcnn's HashGrid for these hyperparameters (grid.h: ``grid_scale``,
    ``grid_resolution`` and the constructor's ``params_in_level``), the scale in float32 as tcnn's
    kernel computes it: ``exp2f(l * log2f(per_level_scale)) * base - 1``."""
    table_size = 2 ** log2_hashmap_size
    log2_scale = torch.tensor(per_level_scale, dtype=torch.float32).log2()
    scales = torch.exp2(torch.arange(n_levels, dtype=torch.float32) * log2_scale) * base_resolution - 1.0
    levels = []
    for scale in scales.tolist():
        resolution = math.ceil(scale) + 1
        size = min(-(-resolution ** 3 // 8) * 8, table_size)
        levels.append(GridLevel(scale, resolution, size, resolution ** 3 <= size))
    return tuple(levels)


def table_to_tcnn_params(table: torch.Tensor, levels) -> torch.Tensor:
    """tcnn's flat parameter vector from an (L, T, F) table: each level's used rows, concatenated."""
    return torch.cat([table[l, :level.size].reshape(-1) for l, level in enumerate(levels)])


def tcnn_params_to_table(params: torch.Tensor, levels, table_size: int, n_features: int) -> torch.Tensor:
    """The (L, T, F) table holding tcnn's flat parameters (rows a level does not use are zero)."""
    table = params.new_zeros(len(levels), table_size, n_features)
    offset = 0
    for l, level in enumerate(levels):
        rows = params[offset * n_features:(offset + level.size) * n_features]
        table[l, :level.size] = rows.view(level.size, n_features)
        offset += level.size
    return table


@functools.lru_cache(maxsize=None)
def _axis_factors(device: torch.device, dense_resolution: int) -> torch.Tensor:
    """(3, 1) int64 factors of a corner's per-axis index terms: the hash primes (dense_resolution 0)
    or the dense strides (1, R, R^2). Cached per device: built once, not per level and call."""
    factors = PRIMES if dense_resolution == 0 else (1, dense_resolution, dense_resolution ** 2)
    return torch.tensor(factors, dtype=torch.long, device=device)[:, None]


def corner_indices(x3: torch.Tensor, level: GridLevel, table_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Table rows of the 8 cell corners around each point at one level, and the point's offsets.

    x3: (3, N) points in [0, 1]. Returns idx (8 * N,) int64, ordered (cx, cy, cz, point) with
    corner (cx, cy, cz) at floor(pos) + (cx, cy, cz), pos = x * scale + 0.5, and frac (3, N) in
    [0, 1). Hashed levels: `table_size` must be a power of two (the modulo is a bit mask, applied
    per axis term since it commutes with XOR). Dense levels: the terms are summed, then reduced
    modulo the level's size.
    """
    n = x3.shape[1]
    pos = x3 * level.scale + 0.5
    cell = pos.floor()
    frac = pos - cell
    factors = _axis_factors(x3.device, level.resolution if level.dense else 0)
    lo = cell.long() * factors  # (3, N): per-axis index terms of the lower corner
    hi = lo + factors
    if level.dense:
        combine = torch.add
    else:
        combine = torch.bitwise_xor
        hi &= table_size - 1
        lo &= table_size - 1
    yz = torch.empty(2, 2, n, dtype=torch.long, device=x3.device)
    for j, hy in enumerate((lo[1], hi[1])):
        for k, hz in enumerate((lo[2], hi[2])):
            combine(hy, hz, out=yz[j, k])
    idx = torch.empty(2, 2, 2, n, dtype=torch.long, device=x3.device)
    combine(yz, lo[0], out=idx[0])
    combine(yz, hi[0], out=idx[1])
    if level.dense:
        idx.remainder_(level.size)
    return idx.view(-1), frac


def gather_corners(table_level: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Corner features of one level, one plane per feature: (F, 2, 2, 2, N) from a (T, F) table."""
    planes = table_level.t().contiguous()  # (F, T): contiguous 1-D gathers are the fast ones
    if torch.is_grad_enabled() and planes.requires_grad:
        g = torch.stack([plane.index_select(0, idx) for plane in planes])
    else:
        g = planes.new_empty(planes.shape[0], idx.shape[0])
        for plane, out in zip(planes, g):
            torch.index_select(plane, 0, idx, out=out)
    return g.view(planes.shape[0], 2, 2, 2, -1)


def interpolate_corners(g: torch.Tensor, frac: torch.Tensor, scale: float, with_jacobian: bool):
    """Trilinear interpolation of corner values g (..., 2, 2, 2, N) at cell offsets frac (3, N).

    Returns values (..., N) and, if asked, the Jacobian w.r.t. the point in [0, 1]^3,
    (..., 3, N): differences along one axis, interpolated along the two others (the derivative of
    the trilinear weights applied to the same corner values), times the level's scale (d pos / d x).
    """
    fx, fy, fz = frac[0], frac[1], frac[2]
    dz = g[..., 1, :] - g[..., 0, :]  # (..., 2, 2, N) over (cx, cy)
    gz = g[..., 0, :] + fz * dz
    dy = gz[..., 1, :] - gz[..., 0, :]  # (..., 2, N) over cx
    gy = gz[..., 0, :] + fy * dy
    dx = gy[..., 1, :] - gy[..., 0, :]
    values = gy[..., 0, :] + fx * dx
    if not with_jacobian:
        return values, None
    dzy = dz[..., 0, :] + fy * (dz[..., 1, :] - dz[..., 0, :])  # (..., 2, N) over cx
    jac_z = dzy[..., 0, :] + fx * (dzy[..., 1, :] - dzy[..., 0, :])
    jac_y = dy[..., 0, :] + fx * (dy[..., 1, :] - dy[..., 0, :])
    return values, torch.stack([dx, jac_y, jac_z], -2) * scale


def corner_gradients(frac: torch.Tensor, scale: float, grad_values: torch.Tensor | None,
                     grad_jac: torch.Tensor | None) -> torch.Tensor:
    """Gradient w.r.t. the 8 corner values (2, 2, 2, N): the adjoint of `interpolate_corners`.

    frac (3, N); grad_values (N,) and grad_jac (3, N) are the incoming gradients of one feature
    (either may be None). With w0 = 1 - f, w1 = f per axis and s = (-scale, +scale), corner
    (cx, cy, cz) gets  wx wy wz gv + sx wy wz gjx + wx sy wz gjy + wx wy sz gjz,  built axis by
    axis so that nothing larger than (2, 2, 2, N) is formed.
    """
    wx = torch.stack([1.0 - frac[0], frac[0]])  # (2, N)
    wy = torch.stack([1.0 - frac[1], frac[1]])
    wz = torch.stack([1.0 - frac[2], frac[2]])
    a = wx * grad_values if grad_values is not None else torch.zeros_like(wx)  # (2, N) over cx
    if grad_jac is not None:
        gx = scale * grad_jac[0]
        a = a + torch.stack([-gx, gx])
    b = a[:, None] * wy  # (2, 2, N) over (cx, cy)
    if grad_jac is not None:
        c = scale * wx * grad_jac[1]
        b[:, 0] -= c
        b[:, 1] += c
    g = b[:, :, None] * wz  # (2, 2, 2, N)
    if grad_jac is not None:
        d = scale * (wx[:, None] * wy) * grad_jac[2]
        g[..., 0, :] -= d
        g[..., 1, :] += d
    return g


def hash_grid_encode(table: torch.Tensor, x3: torch.Tensor, levels, with_jacobian: bool):
    """Features (L, F, N) and Jacobians (L, F, 3, N) of points x3 (3, N); plain autograd ops.

    `levels`: the `GridLevel`s of `grid_levels`. Feature-major ("planar") outputs: viewed as
    (L*F, N) and (L*F, 3*N) they are the right-hand sides of the next layer's GEMMs, and every
    per-level write is contiguous.
    """
    n_levels, table_size, n_features = table.shape
    n = x3.shape[1]
    feats = x3.new_empty(n_levels, n_features, n)
    jacs = x3.new_empty(n_levels, n_features, 3, n) if with_jacobian else None
    for l, table_level in enumerate(table.unbind(0)):
        idx, frac = corner_indices(x3, levels[l], table_size)
        g = gather_corners(table_level, idx)
        values, jac = interpolate_corners(g, frac, levels[l].scale, with_jacobian)
        feats[l] = values
        if with_jacobian:
            jacs[l] = jac
    return feats, jacs


class _HashGridInterp(torch.autograd.Function):
    """`hash_grid_encode` differentiable w.r.t. the table only, with a hand-written backward.

    The backward recomputes the corner indices (cheap; keeping them would cost 64 bytes per point
    and level), forms the corner gradients per feature plane (`corner_gradients`) and scatters
    them into the table with `index_add_`.
    """

    @staticmethod
    def forward(ctx, table, x3, levels, with_jacobian):
        feats, jacs = hash_grid_encode(table, x3, levels, with_jacobian)
        ctx.save_for_backward(x3)
        ctx.levels, ctx.with_jacobian, ctx.table_shape = levels, with_jacobian, table.shape
        ctx.set_materialize_grads(False)
        return feats, (jacs if with_jacobian else feats.new_zeros(0))

    @staticmethod
    def backward(ctx, grad_feats, grad_jacs):
        (x3,) = ctx.saved_tensors
        n_levels, table_size, n_features = ctx.table_shape
        use_jac = ctx.with_jacobian and grad_jacs is not None
        if grad_feats is None and not use_jac:
            return None, None, None, None
        grad_feats = grad_feats.contiguous() if grad_feats is not None else None
        grad_jacs = grad_jacs.contiguous() if use_jac else None
        grad_planes = x3.new_zeros(n_levels, n_features, table_size)
        for l, level in enumerate(ctx.levels):
            idx, frac = corner_indices(x3, level, table_size)
            for f in range(n_features):
                g = corner_gradients(frac, level.scale, None if grad_feats is None else grad_feats[l, f],
                                     grad_jacs[l, f] if use_jac else None)
                grad_planes[l, f].index_add_(0, idx, g.view(-1))
        return grad_planes.transpose(1, 2), None, None, None


BACKENDS = ("auto", "torch", "cpp", "tcnn")
TCNN_INSTALL = "pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch"


class BackendUnavailableError(RuntimeError, ValueError):
    """A hash grid backend that cannot run here (what is missing and how to get it in one line)."""


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _import_tinycudann():
    """The tinycudann module, or raise with the reason. Imported here only, never at module level.

    tiny-cuda-nn's bindings raise EnvironmentError (not ImportError) at import where torch sees no
    GPU, hence the broad except in the callers.
    """
    return importlib.import_module("tinycudann")


def tcnn_unavailable_reason() -> str | None:
    """None when `import tinycudann` works, else the one-line reason it does not."""
    try:
        _import_tinycudann()
    except Exception as error:  # noqa: BLE001 - ImportError, EnvironmentError (no GPU), a broken build ...
        text = str(error).strip().splitlines()
        return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__
    return None


def select_backend(backend: str, device=None) -> str:
    """The implementation to use for a grid on `device` (None: CPU): "torch", "cpp" or "tcnn".

    "auto": "tcnn" when the device is CUDA (and torch sees a GPU) and `import tinycudann` works;
    on CUDA without it "torch" (the fused CPU op does not apply to CUDA tensors); on CPU "cpp" if
    the fused op builds, else "torch" with one warning line (printed by `hashgrid_cpp.available`).
    tinycudann is never imported for a CPU device. An explicit "cpp" that cannot be built, or an
    explicit "tcnn" without CUDA or without tinycudann, raises `BackendUnavailableError` (both a
    RuntimeError and a ValueError) with one line naming what is missing. An explicit "tcnn" with no
    device means CUDA (the only place it runs).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown hash grid backend {backend!r}; expected one of {BACKENDS}")
    if backend == "tcnn" and device is None:
        device = "cuda"
    cuda = _is_cuda(device) and torch.cuda.is_available()
    if backend == "auto":
        if cuda:
            return "tcnn" if tcnn_unavailable_reason() is None else "torch"
        return "cpp" if hashgrid_cpp.available() else "torch"
    if backend == "cpp":
        hashgrid_cpp.load()  # raises RuntimeError naming the reason
    if backend == "tcnn":
        if not cuda:
            where = "torch.cuda.is_available() is False" if not torch.cuda.is_available() else f"the device is {device}"
            raise BackendUnavailableError(
                f"hash grid backend 'tcnn' needs a CUDA device ({where}); use a GPU with a CUDA build of PyTorch, "
                f"or choose backend auto, cpp or torch")
        reason = tcnn_unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(
                f"hash grid backend 'tcnn' needs tiny-cuda-nn's PyTorch bindings (import tinycudann failed: {reason}); "
                f"install them with `{TCNN_INSTALL}`, or choose backend auto, cpp or torch")
    return backend


def tcnn_encoding_config(n_levels: int, n_features_per_level: int, log2_hashmap_size: int, base_resolution: int,
                         per_level_scale: float) -> dict:
    """tiny-cuda-nn's HashGrid configuration for the same hyperparameters."""
    return {"otype": "HashGrid", "n_levels": n_levels, "n_features_per_level": n_features_per_level,
            "log2_hashmap_size": log2_hashmap_size, "base_resolution": base_resolution,
            "per_level_scale": float(per_level_scale)}


def _cuda_device(device):
    """Context making `device` the current CUDA device: tiny-cuda-nn allocates its parameters and
    runs on the current device, not on the one a module is meant for (a no-op where it is not CUDA)."""
    return torch.cuda.device(torch.device(device)) if _is_cuda(device) else contextlib.nullcontext()


class HashGridEncoding(nn.Module):
    """Instant-NGP multiresolution hash grid: x in [0, 1]^3 (N, 3) -> features (N, L * F).

    tiny-cuda-nn's HashGrid function on every backend (module docstring). Parameters live in one
    table ``self.table`` (L, T, F), initialised uniform(-init_scale, init_scale) as in tiny-cuda-nn;
    ``self.levels`` are the levels' `GridLevel`s. ``backend`` ("torch", "cpp", "tcnn" or "auto")
    picks the implementation (see `select_backend`); torch and cpp share the parameter layout, so
    their state_dicts are interchangeable, and a tcnn state_dict is converted on load (and back).
    "cpp" is checked (built) at construction; "auto" for a CPU device (``device`` None or "cpu") is
    settled the first time it matters, i.e. on the first use with a float32 CPU table, so a module
    moved to a GPU never builds the CPU op. "auto" for a CUDA ``device`` is settled at construction
    (the parameter layout depends on it): "tcnn" when tinycudann imports. With "tcnn" the
    parameters are tiny-cuda-nn's flat vector ``self.tcnn.params``, allocated on ``device`` (made
    the current CUDA device while tcnn builds it), there is no ``table``, and
    `forward_with_jacobian` is unavailable. The attribute ``backend`` reports the implementation in
    use. The fused CPU op takes float32 CPU tensors and points that need no gradient; any other call
    (points requiring grad, e.g. for autograd normals; another device or dtype) goes through the
    torch path.
    """

    def __init__(self, n_levels: int = 16, n_features_per_level: int = 2, log2_hashmap_size: int = 19,
                 base_resolution: int = 16, per_level_scale: float = 1.447269, max_resolution: int | None = None,
                 init_scale: float = 1e-4, backend: str = "torch", device=None):
        super().__init__()
        if backend == "auto" and not _is_cuda(device):
            self._backend = "auto"  # settled on first use (see the class docstring)
        else:
            self._backend = select_backend(backend, device)
        if max_resolution is not None:
            per_level_scale = math.exp((math.log(max_resolution) - math.log(base_resolution)) / max(n_levels - 1, 1))
        self.n_levels, self.n_features_per_level = n_levels, n_features_per_level
        self.log2_hashmap_size, self.base_resolution, self.per_level_scale = log2_hashmap_size, base_resolution, per_level_scale
        self.levels = grid_levels(n_levels, log2_hashmap_size, base_resolution, per_level_scale)
        # The fused CPU op's view of the levels: scales (L,) and (dense resolution or 0, rows used) (L, 2).
        self.register_buffer("scales", torch.tensor([lv.scale for lv in self.levels], dtype=torch.float32),
                             persistent=False)
        self.register_buffer("layout", torch.tensor([[lv.resolution if lv.dense else 0, lv.size] for lv in self.levels],
                                                    dtype=torch.long).view(n_levels, 2), persistent=False)
        if self._backend == "tcnn":
            self.tcnn = self._make_tcnn(init_scale, device)
            return
        table_size = 2 ** log2_hashmap_size
        self.table = nn.Parameter((torch.rand(n_levels, table_size, n_features_per_level) * 2 - 1) * init_scale)
        if device is not None:
            self.to(device)

    def _make_tcnn(self, init_scale: float, device) -> nn.Module:
        """tiny-cuda-nn's hash grid with this module's hyperparameters, float32 parameters and output,
        built with `device` current (tcnn allocates on the current device)."""
        tcnn = _import_tinycudann()
        config = tcnn_encoding_config(self.n_levels, self.n_features_per_level, self.log2_hashmap_size,
                                      self.base_resolution, self.per_level_scale)
        with _cuda_device(device or "cuda"):
            module = tcnn.Encoding(n_input_dims=3, encoding_config=config, dtype=torch.float32)
            expected = sum(lv.size for lv in self.levels) * self.n_features_per_level
            if module.params.numel() != expected:
                raise RuntimeError(
                    f"tiny-cuda-nn's HashGrid has {module.params.numel()} parameters where grid.h's layout gives "
                    f"{expected}: this tinycudann lays its levels out differently; use backend cpp or torch")
            with torch.no_grad():  # drawn from torch's RNG (seeded runs stay reproducible), same range as the table
                module.params.copy_((torch.rand(module.params.shape) * 2 - 1) * init_scale)
        return module

    @property
    def output_dim(self) -> int:
        return self.n_levels * self.n_features_per_level

    @property
    def backend(self) -> str:
        if self._backend == "tcnn":
            return "tcnn"
        if self._backend == "torch" or not (self.table.device.type == "cpu" and self.table.dtype == torch.float32):
            return "torch"
        return self._cpu_backend()

    def _cpu_backend(self) -> str:
        if self._backend == "auto":
            self._backend = select_backend("auto")
        return self._backend

    @property
    def has_jacobian(self) -> bool:
        """Whether `forward_with_jacobian` works (every backend but tcnn)."""
        return self._backend != "tcnn"

    def _encode(self, x: torch.Tensor, with_jacobian: bool):
        if self._backend == "tcnn":
            if with_jacobian:
                raise RuntimeError("the tcnn hash grid gives no Jacobian; use finite-difference normals "
                                   "(NeRFField(normals='finite_difference'), the default for this backend)")
            params = self.tcnn.params
            if x.shape[0] == 0:  # no kernel launch for an empty batch; the graph to the parameters stays
                return params.new_zeros(0, self.output_dim) + params[:1].sum() * 0.0, None
            return self.tcnn(x.clamp(0.0, 1.0).contiguous()).float(), None
        if self._backend != "torch" and hashgrid_cpp.supports(self.table, x) and self._cpu_backend() == "cpp":
            feats, jacs = hashgrid_cpp.encode(self.table, x, self.scales, self.layout, with_jacobian)
            return self._unplanar(feats, jacs, x.shape[0], with_jacobian)
        # Clamped to [0, 1] (tcnn's caller, `NeRFField`, clamps too).
        x3 = x.t().clamp(0.0, 1.0).contiguous()
        if x3.requires_grad and torch.is_grad_enabled():
            feats, jacs = hash_grid_encode(self.table, x3, self.levels, with_jacobian)
        else:
            feats, jacs = _HashGridInterp.apply(self.table, x3, self.levels, with_jacobian)
        return self._unplanar(feats, jacs, x3.shape[1], with_jacobian)

    def _unplanar(self, feats: torch.Tensor, jacs: torch.Tensor, n: int, with_jacobian: bool):
        """(N, D) and (N, D, 3) views of the planar (L, F, N) and (L, F, 3, N) outputs."""
        features = feats.view(self.output_dim, n).t()
        if not with_jacobian:
            return features, None
        return features, jacs.view(self.output_dim, 3, n).permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode(x, False)[0]

    def forward_with_jacobian(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (N, L*F) and d features / d x (N, L*F, 3), both differentiable w.r.t. the table.

        Both are views of feature-major storage: ``features.t()`` is a contiguous (D, N) and
        ``jacobian.permute(1, 2, 0)`` a contiguous (D, 3, N), so a following linear layer is one
        GEMM each, ``W @ (D, N)`` and ``W @ (D, 3 * N)`` (see `NeRFField`).
        """
        return self._encode(x, True)

    def convert_parameter(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like either family's parameter (the grid itself, or per-entry optimizer
        state such as Adam's moments) in this encoder's layout: an (L, T, F) table becomes tcnn's
        flat vector for a tcnn encoder, a flat vector becomes a table for a torch/cpp one, and a
        tensor already in this layout is returned as it is. Anything else raises ValueError."""
        table_shape = (self.n_levels, 2 ** self.log2_hashmap_size, self.n_features_per_level)
        flat_shape = (sum(lv.size for lv in self.levels) * self.n_features_per_level,)
        mine, other = (flat_shape, table_shape) if self._backend == "tcnn" else (table_shape, flat_shape)
        if tuple(tensor.shape) == mine:
            return tensor
        if tuple(tensor.shape) != other:
            raise ValueError(f"hash grid tensor of shape {tuple(tensor.shape)} fits neither layout of this grid "
                             f"(table {table_shape}, tcnn {flat_shape}): it was written for other hyperparameters")
        if self._backend == "tcnn":
            return table_to_tcnn_params(tensor, self.levels)
        return tcnn_params_to_table(tensor, self.levels, table_shape[1], table_shape[2])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Convert a state_dict written by the other parameter layout (tcnn's flat vector vs the
        (L, T, F) table) to this one: both hold the same function (see the module docstring)."""
        keys = {"tcnn": prefix + "tcnn.params", "cpu": prefix + "table"}
        mine, other = ("tcnn", "cpu") if self._backend == "tcnn" else ("cpu", "tcnn")
        if keys[mine] not in state_dict and keys[other] in state_dict:
            state_dict[keys[mine]] = self.convert_parameter(state_dict.pop(keys[other]))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"levels={self.n_levels}, features={self.n_features_per_level}, table=2^{self.log2_hashmap_size}, "
                f"resolutions={[lv.resolution for lv in self.levels]}, "
                f"dense_levels={sum(lv.dense for lv in self.levels)}, "
                f"backend={self._backend if self._backend == 'auto' else self.backend}")
