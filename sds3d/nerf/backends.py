"""Which fast paths a run takes, chosen by device: the hash grid backend and the ray sampler.

- Hash grid (`sds3d.nerf.encoding.select_backend`): on CUDA "tcnn" (tiny-cuda-nn) when tinycudann
  imports, else "torch"; on CPU "cpp" (fused C++/OpenMP op) when it builds, else "torch".
- Sampler: on CUDA with nerfacc's CUDA extension, `CudaOccupancy` (nerfacc's OccGridEstimator)
  and packed rendering (`render_rays_packed`); elsewhere our `OccupancyGrid` and dense compositing.

Nothing here imports tinycudann or nerfacc's CUDA extension for a CPU device.
"""

from __future__ import annotations

import sys

import torch

from .encoding import _is_cuda, select_backend, tcnn_unavailable_reason
from .occupancy import CudaOccupancy, OccupancyGrid
from .render import field_device

__all__ = ["describe_backends", "field_device", "make_occupancy", "nerfacc_cuda_available"]

HASH_GRID_DESCRIPTIONS = {
    "tcnn": "tcnn (tiny-cuda-nn fused CUDA grid; finite-difference normals)",
    "cpp": "cpp (fused C++/OpenMP op)",
    "torch": "torch (pure PyTorch)",
}

_nerfacc_cuda: bool | None = None


def nerfacc_cuda_available(device) -> bool:
    """Whether `device` is CUDA, torch sees a GPU, and nerfacc's CUDA extension loads (tried once).

    The first call on a GPU machine may JIT-build nerfacc's extension (minutes, once, cached by
    torch); a failure prints one warning line and the dense sampler is used.
    """
    global _nerfacc_cuda
    if not (_is_cuda(device) and torch.cuda.is_available()):
        return False
    if _nerfacc_cuda is None:
        try:
            from nerfacc.cuda._backend import _C

            _nerfacc_cuda = _C is not None
            reason = "no CUDA toolkit (nvcc) to build it"
        except Exception as error:  # noqa: BLE001 - a failed build means: use the dense sampler
            _nerfacc_cuda = False
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        if not _nerfacc_cuda:
            print(f"sds3d: warning: nerfacc's CUDA extension unavailable ({reason}); using the dense occupancy-grid "
                  f"sampler", file=sys.stderr, flush=True)
    return _nerfacc_cuda


def make_occupancy(device=None, radius: float = 1.0, resolution: int = 32, update_every: int = 16,
                   **kwargs) -> OccupancyGrid | CudaOccupancy:
    """The occupancy structure for a field on `device`: `CudaOccupancy` where nerfacc's CUDA
    extension is usable, else `OccupancyGrid` (on that device)."""
    device = torch.device(device or "cpu")
    if nerfacc_cuda_available(device):
        return CudaOccupancy(radius=radius, resolution=resolution, update_every=update_every, device=device, **kwargs)
    return OccupancyGrid(radius=radius, resolution=resolution, update_every=update_every, **kwargs).to(device)


def describe_backends(device=None, encoding_backend: str = "auto") -> str:
    """One line naming the hash grid backend and the sampler a run on `device` uses.

    `encoding_backend` is the backend in use (e.g. ``field.encoding.backend``) or "auto", which is
    resolved here as `HashGridEncoding` would (on CPU this may build the fused op).
    """
    device = torch.device(device or "cpu")
    cuda = _is_cuda(device) and torch.cuda.is_available()
    backend = select_backend("auto", device) if encoding_backend == "auto" else encoding_backend
    grid = HASH_GRID_DESCRIPTIONS.get(backend, backend)
    if backend == "torch" and cuda:
        reason = tcnn_unavailable_reason()
        if reason is not None:
            grid += f"; tinycudann unavailable: {reason}"
    if nerfacc_cuda_available(device):
        sampler = "nerfacc OccGridEstimator (CUDA, packed rendering)"
    elif cuda:
        sampler = "occupancy grid (CUDA, dense nerfacc compositing; nerfacc's CUDA extension unavailable)"
    else:
        sampler = "occupancy grid (CPU, dense nerfacc compositing)"
    return f"hash grid: {grid}; sampler: {sampler}"
