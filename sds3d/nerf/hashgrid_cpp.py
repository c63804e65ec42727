"""The fused CPU hash grid (``csrc/``): a JIT-built PyTorch C++ extension with OpenMP.

Nothing is compiled when sds3d is imported: the first `available()` / `load()` (e.g. the first
use of a ``HashGridEncoding(backend="auto")``) builds the extension with
`torch.utils.cpp_extension.load` (15-30 s on 2 cores) into a cache folder,
``$SDS3D_CACHE/ext/hashgrid-<key>`` (default ``~/.cache/sds3d/ext/...``), where the key hashes the
sources, the compiler flags, torch's and Python's versions and the CPU (model and flags). Later
processes import the cached library directly (milliseconds). Building needs a C++ compiler
(``$CXX`` or ``c++``) and ``ninja`` (the PyPI package is enough); without them, or if the build
fails, `available()` is False and one warning line on stderr says why and that the pure-torch
encoder is used. Nothing here is needed at install time, so installing sds3d builds nothing and
needs no torch in a build-isolated environment.

`field_mlp` is the field's one-hidden-layer network on those features, with its density logit's
gradient for the normals, fused (csrc/mlp_kernels.h); `NeRFField` uses it with this grid.
`occupied_samples` is the renderer's ray sampler with the occupancy grid's test, fused
(csrc/sampling_kernels.h), and `composite` its compositing of the kept samples, with `ray_offsets`
(csrc/compositing_kernels.h); `render_rays` uses both for a field on this grid.

`encode` is the op: features (L, F, N) and optionally Jacobians (L, F, 3, N), in the planar layout
of `sds3d.nerf.encoding.hash_grid_encode`, differentiable w.r.t. the table (through both outputs),
not w.r.t. the points. It computes the torch encoder's function (tiny-cuda-nn's HashGrid; see
`sds3d.nerf.encoding`), with the same float32 operations in the same order.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "hashgrid.cpp", CSRC / "hashgrid_kernels.cpp", CSRC / "mlp_kernels.cpp",  # bindings; kernels
           CSRC / "sampling_kernels.cpp", CSRC / "compositing_kernels.cpp")
NAME = "sds3d_hashgrid"
# -ffp-contract=off: no fused multiply-adds, so that the arithmetic (and the result, bit for bit
# in the forward) is that of the torch encoder's separate elementwise ops. -fno-trapping-math (as
# torch's own build) lets the clamps vectorize; it changes no result. No -march=native: the kernels
# carry AVX-512/AVX2/baseline clones picked at load time (see csrc/hashgrid_kernels.h).
BASE_CFLAGS = ("-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno")
LDFLAGS = ("-fopenmp",)  # tuples: torch appends to the lists it is given
# A lock file older than this was left by a killed build (a build takes 15-30 s on 2 cores).
STALE_LOCK_SECONDS = 300

_lock = threading.Lock()
_module = None
_error: str | None = None
_tried = False
_warned = False


def cache_root() -> Path:
    root = os.environ.get("SDS3D_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sds3d")
    return Path(root) / "ext"


def _cpu_model() -> str:
    """The CPU's model name and feature flags (VMs often share a generic model name)."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part") and key not in found:
                    found[key] = line.strip()
    except OSError:
        pass
    return "\n".join(found.values()) or platform.processor() or platform.machine()


def _openmp() -> bool:
    # Apple's clang has no -fopenmp (and torch's macOS wheels bring no libgomp): one thread there.
    return sys.platform != "darwin"


def _cflags() -> list[str]:
    flags = [f for f in BASE_CFLAGS if _openmp() or f != "-fopenmp"]
    extra = os.environ.get("SDS3D_EXT_CFLAGS")  # e.g. "-march=native" on a machine of one's own
    if extra:
        flags += extra.split()
    return flags


def _ldflags() -> list[str]:
    return [f for f in LDFLAGS if _openmp() or f != "-fopenmp"]


def build_directory() -> Path:
    """This machine's cache folder for the extension (it need not exist)."""
    key = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cpp", ".h"):
            key.update(path.name.encode() + b"\0" + path.read_bytes())
    for part in (" ".join([*_cflags(), *_ldflags()]).encode(), torch.__version__.encode(),
                 sys.implementation.cache_tag.encode(), os.environ.get("CXX", "c++").encode(),
                 platform.machine().encode(), _cpu_model().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_root() / f"hashgrid-{key.hexdigest()[:16]}"


def _find_ninja() -> str | None:
    """Path of ninja; puts the venv's (or the `ninja` package's) on PATH if only it is there."""
    found = shutil.which("ninja")
    if found:
        return found
    candidates = [Path(sys.executable).parent]
    try:
        import ninja  # the PyPI package

        candidates.append(Path(ninja.BIN_DIR))
    except Exception:  # noqa: BLE001 - not installed, or an odd layout
        pass
    for folder in candidates:
        exe = shutil.which("ninja", path=str(folder))
        if exe:
            os.environ["PATH"] = str(folder) + os.pathsep + os.environ.get("PATH", "")
            return exe
    return None


def _import_built(folder: Path):
    spec = importlib.util.spec_from_file_location(NAME, folder / f"{NAME}.so")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wait_for_other_build(lock: Path) -> None:
    """Wait while another process builds into the same folder (torch's lock file); a lock older than
    STALE_LOCK_SECONDS was left by a killed build and is removed (torch would wait for it forever)."""
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > STALE_LOCK_SECONDS:
            lock.unlink(missing_ok=True)
            return
        time.sleep(0.2)


def _build(verbose: bool = False):
    folder = build_directory()
    _wait_for_other_build(folder / "lock")
    if (folder / f"{NAME}.so").exists():
        try:
            return _import_built(folder)  # built earlier (by any process): milliseconds
        except ImportError:
            pass  # e.g. a link cut short: cpp_extension.load below builds it again
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler.split()[0]) is None:
        raise RuntimeError(f"no C++ compiler ({compiler}) found")
    if _find_ninja() is None:
        raise RuntimeError("ninja not found (pip install ninja)")
    folder.mkdir(parents=True, exist_ok=True)
    from torch.utils import cpp_extension

    print("sds3d: building the fused CPU hash grid (once, 15-30 s)...", file=sys.stderr, flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compiler-version notes: a failure is reported by its exception
        # ninja also waits for (through torch's lock file) or skips a build another process made.
        return cpp_extension.load(name=NAME, sources=[str(p) for p in SOURCES], extra_cflags=_cflags(),
                                  extra_ldflags=_ldflags(), build_directory=str(folder), verbose=verbose)


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    for line in text.splitlines():  # prefer the compiler's own error line over ninja's preamble
        if "error:" in line:
            return line.strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def _try_load(verbose: bool = False):
    global _module, _error, _tried
    with _lock:
        if not _tried:
            _tried = True
            try:
                _module = _build(verbose)
            except Exception as error:  # noqa: BLE001 - any failure means: use the torch encoder
                _error = _reason(error)
        return _module


def load(verbose: bool = False):
    """The compiled module (building it on first use); raises RuntimeError if it cannot be had."""
    module = _try_load(verbose)
    if module is None:
        raise RuntimeError(f"fused CPU hash grid unavailable: {_error}")
    return module


def available() -> bool:
    """Whether the extension builds/loads here. Tries once per process; on failure prints one line."""
    global _warned
    if _try_load() is not None:
        return True
    with _lock:
        if not _warned:
            _warned = True
            print(f"sds3d: warning: fused CPU hash grid unavailable ({_error}); using the pure-torch encoder",
                  file=sys.stderr, flush=True)
    return False


def unavailable_reason() -> str | None:
    """Why `available()` was False (None if it was not tried or succeeded)."""
    return _error


def is_built() -> bool:
    """Whether this process has loaded the extension (it never builds at import)."""
    return _module is not None


def supports(table: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether `encode` applies: float32 CPU tensors, points that need no gradient."""
    return (table.device.type == "cpu" and x.device.type == "cpu" and table.dtype == torch.float32
            and x.dtype == torch.float32 and table.dim() == 3 and x.dim() == 2 and x.shape[1] == 3
            and not (x.requires_grad and torch.is_grad_enabled()))


class HashGridFunction(torch.autograd.Function):
    """(table, x, scales, layout, with_jacobian) -> feats (L, F, N), jacs (L, F, 3, N) or empty."""

    @staticmethod
    def forward(ctx, table, x, scales, layout, with_jacobian):
        feats, jacs = load().forward(x, table, scales, layout, with_jacobian)
        ctx.save_for_backward(x, scales, layout)
        ctx.table_shape, ctx.with_jacobian = tuple(table.shape), with_jacobian
        ctx.set_materialize_grads(False)
        if not with_jacobian:
            ctx.mark_non_differentiable(jacs)
        return feats, jacs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_feats, grad_jacs):
        x, scales, layout = ctx.saved_tensors
        if not ctx.with_jacobian:
            grad_jacs = None
        if grad_feats is None and grad_jacs is None:
            return None, None, None, None, None
        _, table_size, n_features = ctx.table_shape
        grad = load().backward(x, scales, layout, table_size, n_features, grad_feats, grad_jacs)
        return grad, None, None, None, None


def encode(table: torch.Tensor, x: torch.Tensor, scales: torch.Tensor, layout: torch.Tensor, with_jacobian: bool):
    """Features (L, F, N) and Jacobians (L, F, 3, N) (or an empty tensor) of points x (N, 3).

    Points are clamped to [0, 1]; `scales` (L,) float32 are the levels' scales and `layout` (L, 2)
    int64 their (dense resolution or 0, rows used), as `sds3d.nerf.encoding.grid_levels` gives them.
    """
    return HashGridFunction.apply(table.contiguous(), x.detach().contiguous(),
                                  scales.detach().to(torch.float32).contiguous(), layout.detach().contiguous(),
                                  with_jacobian)


class FieldMLPFunction(torch.autograd.Function):
    """(feats (D, N), jacs (D, 3, N) or None, w1, b1, w2, b2) -> out (4, N), grad_u (3, N) or None:
    `NeRFField`'s one-hidden-layer network and its density logit's gradient (csrc/mlp_kernels.h)."""

    @staticmethod
    def forward(ctx, feats, jacs, w1, b1, w2, b2):
        empty = feats.new_empty(0)
        out, grad_u = load().mlp_forward(feats, empty if jacs is None else jacs, w1, b1, w2, b2)
        ctx.save_for_backward(feats, empty if jacs is None else jacs, w1, b1, w2)
        ctx.set_materialize_grads(False)
        return out, (None if jacs is None else grad_u)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_grad_u):
        feats, jacs, w1, b1, w2 = ctx.saved_tensors
        if grad_out is None:
            grad_out = feats.new_zeros(4, feats.shape[1])
        grad_feats, grad_jacs, gw1, gb1, gw2, gb2 = load().mlp_backward(feats, jacs, w1, b1, w2, grad_out, grad_grad_u)
        return grad_feats, (grad_jacs if grad_jacs.dim() == 3 else None), gw1, gb1, gw2, gb2


def field_mlp(feats: torch.Tensor, jacs: torch.Tensor | None, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
              b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`NeRFField`'s network with one hidden layer on feature-major features (D, N), fused: logits
    (4, N) = w2 relu(w1 f + b1) + b2 and, given the Jacobians (D, 3, N) of the features, the density
    logit's gradient (3, N) w.r.t. the grid's coordinates. Differentiable w.r.t. every input."""
    return FieldMLPFunction.apply(feats.contiguous(), None if jacs is None else jacs.contiguous(), w1.contiguous(),
                                  b1.contiguous(), w2.contiguous(), b2.contiguous())


def supports_mlp(feats: torch.Tensor, hidden_dim: int) -> bool:
    """Whether `field_mlp` applies: float32 CPU features (N, D), widths within the kernels' limits
    (builds the extension if this process has not yet)."""
    if feats.device.type != "cpu" or feats.dtype != torch.float32:
        return False
    module = load()
    return 1 <= feats.shape[-1] <= module.mlp_max_features and 1 <= hidden_dim <= module.mlp_max_hidden


def occupied_samples(origins: torch.Tensor, dirs: torch.Tensor, u: torch.Tensor | None, lin: torch.Tensor,
                     box_radius: float, mask: torch.Tensor, grid_radius: float,
                     cell_size: float) -> tuple[torch.Tensor, ...]:
    """`sds3d.nerf.render.occupied_samples` fused (csrc/sampling_kernels.h), with the same float32
    operations in the same order: (index, t_starts, t_ends, t, positions) of the samples of rays
    (R, 3) on their chords through the box that fall in occupied cells of `mask` (res, res, res),
    the grid over [-grid_radius, grid_radius]^3. u (R, S) are the offsets in the intervals (None:
    midpoints), lin (S + 1,) torch.linspace(0, 1, S + 1). Not differentiable (no graph to the rays)."""
    return tuple(load().occupied_samples(origins.detach().contiguous(), dirs.detach().contiguous(),
                                         origins.new_empty(0) if u is None else u.contiguous(), lin.contiguous(),
                                         float(box_radius), mask.contiguous(), float(grid_radius), float(cell_size)))


SHADING_CODES = {"albedo": 0, "lambertian": 1, "textureless": 2}  # csrc/compositing_kernels.h's Shading


def ray_offsets(index: torch.Tensor, num_samples: int, n_rays: int) -> torch.Tensor:
    """(R + 1,) int64: ray r's kept samples are offsets[r] .. offsets[r + 1] - 1, from their flat
    indices `index` (N,) in a dense (R, S) layout, ascending (as `occupied_samples` gives them)."""
    return load().ray_offsets(index.contiguous(), int(num_samples), int(n_rays))


class CompositeFunction(torch.autograd.Function):
    """(density (N,), albedo (N, 3), normal (N, 3) or None, offsets, t_starts, t_ends, t, light, dirs,
    shading, ambient) -> rgb (R, 3), opacity, depth, z_variance (R,), albedo (R, 3), normal (R, 3),
    backfacing (R,) (empty without normals), weights (N,): csrc/compositing_kernels.h.
    Differentiable w.r.t. density, albedo and normal."""

    @staticmethod
    def forward(ctx, density, albedo, normal, offsets, t_starts, t_ends, t, light, dirs, shading, ambient):
        empty = density.new_empty(0)
        normal = empty if normal is None else normal
        light = empty if light is None else light
        dirs = empty if dirs is None else dirs
        outs = load().composite_forward(offsets, t_starts, t_ends, t, density, albedo, normal, light, dirs, shading,
                                        ambient)
        weights, opacity, depth = outs[7], outs[1], outs[2]
        ctx.save_for_backward(density, albedo, normal, offsets, t_starts, t_ends, t, light, dirs, weights, opacity,
                              depth)
        ctx.shading, ctx.ambient = shading, ambient
        ctx.set_materialize_grads(False)
        if normal.dim() == 1:  # none given
            ctx.mark_non_differentiable(outs[5], outs[6])
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_rgb, g_opacity, g_depth, g_z_variance, g_albedo, g_normal, g_backfacing, g_weights):
        density, albedo, normal, offsets, t_starts, t_ends, t, light, dirs, weights, opacity, depth = ctx.saved_tensors
        none = (None,) * 8
        grads = (g_rgb, g_opacity, g_depth, g_z_variance, g_albedo, g_normal, g_backfacing, g_weights)
        if all(g is None for g in grads):
            return (None, None, None) + none
        grad_density, grad_albedo, grad_normal = load().composite_backward(
            offsets, t_starts, t_ends, t, density, albedo, normal, light, dirs, ctx.shading, ctx.ambient, weights,
            opacity, depth, *grads)
        return (grad_density, grad_albedo, grad_normal if normal.dim() == 2 else None) + none


def composite(offsets: torch.Tensor, t_starts: torch.Tensor, t_ends: torch.Tensor, t: torch.Tensor,
              density: torch.Tensor, albedo: torch.Tensor, normal: torch.Tensor | None, light: torch.Tensor | None,
              dirs: torch.Tensor | None, shading: str, ambient: float) -> tuple[torch.Tensor, ...]:
    """`sds3d.nerf.render.render_rays`' compositing fused (csrc/compositing_kernels.h): the kept
    samples' weights (nerfacc's `render_weight_from_density`), their shading and the per-ray sums.
    Ray r's samples are offsets[r] .. offsets[r + 1] - 1 (`ray_offsets`), in order along it.
    light (R, 3) is needed for "lambertian" and "textureless", normal (N, 3) and dirs (R, 3) for the
    normal and backfacing sums. Returns rgb (R, 3) without the background, opacity, depth,
    z_variance (R,), albedo (R, 3), normal (R, 3) and backfacing (R,) (empty without normals) and
    weights (N,); differentiable w.r.t. density, albedo and normal."""
    def prepared(v):
        return None if v is None else v.detach().to(torch.float32).contiguous()

    return CompositeFunction.apply(density.contiguous(), albedo.contiguous(),
                                   None if normal is None else normal.contiguous(), offsets.contiguous(),
                                   prepared(t_starts), prepared(t_ends), prepared(t), prepared(light), prepared(dirs),
                                   SHADING_CODES[shading], float(ambient))
