"""Occupancy grids that let the renderer skip empty space.

`OccupancyGrid` is ours (CPU and CUDA, dense (rays, samples) layout); `CudaOccupancy` wraps
nerfacc's `OccGridEstimator` behind the same interface for the packed CUDA renderer. Both keep an
exponential moving average of the field's density per cell (Instant-NGP's update rule).

Either grid is a cache of the field: `load_occupancy_state` restores a saved state, or, when the
state was written by the other kind of grid (a run resumed on another machine), rebuilds it from
the field instead of failing on the state_dict's keys.
"""

from __future__ import annotations

import torch
from torch import nn


class OccupancyGrid(nn.Module):
    """Which cells of the box [-radius, radius]^3 may hold density, to skip samples in empty space.

    Instant-NGP / nerfacc rule: each update evaluates the density at one jittered point per cell,
    keeps ema = max(decay * ema, density), and marks a cell occupied where
    ema > min(threshold, mean(ema)). The threshold is on density: a sample with sigma = 0.01 and a
    step of ~0.05 has alpha ~ 5e-4, so dropping such cells cannot change an image visibly, while the
    per-cell max keeps thin parts. Before the first update every cell is occupied.
    """

    def __init__(self, radius: float = 1.0, resolution: int = 32, decay: float = 0.95, threshold: float = 0.01,
                 update_every: int = 16):
        super().__init__()
        self.radius, self.resolution, self.decay, self.threshold = radius, resolution, decay, threshold
        self.update_every = update_every
        shape = (resolution,) * 3
        self.register_buffer("density_ema", torch.full(shape, -1.0))  # < 0: never evaluated
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool))

    @property
    def cell_size(self) -> float:
        return 2.0 * self.radius / self.resolution

    def cell_centers(self) -> torch.Tensor:
        """(res^3, 3) centres, in the same (i, j, k) order as the grid."""
        c = (torch.arange(self.resolution, dtype=torch.float32, device=self.mask.device) + 0.5) * self.cell_size - self.radius
        return torch.stack(torch.meshgrid(c, c, c, indexing="ij"), -1).reshape(-1, 3)

    @torch.no_grad()
    def update(self, field, step: int | None = None, generator: torch.Generator | None = None,
               chunk: int = 65536) -> bool:
        """Re-evaluate the density on the grid (every `update_every` steps when `step` is given)."""
        if step is not None and step % self.update_every != 0:
            return False
        centers = self.cell_centers()
        jitter = torch.rand(centers.shape, generator=generator,  # on the generator's device, then the grid's
                            device=centers.device if generator is None else generator.device).to(centers.device) - 0.5
        points = centers + jitter * self.cell_size
        density = torch.cat([field.density(p) for p in points.split(chunk)]).view(self.mask.shape)
        seen = self.density_ema >= 0
        self.density_ema.copy_(torch.where(seen, torch.maximum(self.density_ema * self.decay, density), density))
        threshold = self.density_ema.mean().clamp(max=self.threshold)  # on the device: no host read
        self.mask.copy_(self.density_ema > threshold)
        return True

    def occupied(self, points: torch.Tensor) -> torch.Tensor:
        """Bool mask (...,) of points inside the box and in an occupied cell."""
        r = self.resolution
        # int32 cells and one flat index into the grid (not three int64 index tensors): this runs on
        # every sample of every render, a few hundred thousand points, and is 2-3x faster so
        dtype = torch.int32 if r ** 3 < 2 ** 31 else torch.int64
        cell = ((points + self.radius) / self.cell_size).floor().to(dtype)
        inside = ((cell >= 0) & (cell < r)).all(-1)
        cell = cell.clamp(0, r - 1)
        return inside & self.mask.view(-1)[(cell[..., 0] * r + cell[..., 1]) * r + cell[..., 2]]

    def occupied_fraction(self) -> float:
        return float(self.mask.float().mean())


class CudaOccupancy(nn.Module):
    """nerfacc's `OccGridEstimator` (CUDA only) with `OccupancyGrid`'s interface: `update(field, step,
    generator)`, `occupied`, `occupied_fraction` and a state_dict (the estimator's buffers).

    Same rule as `OccupancyGrid`: the occupancy value is the density (threshold 0.01 on density),
    ema = max(decay * ema, density), occupied where ema > min(threshold, mean). nerfacc re-evaluates
    every cell for `warmup_steps` steps, then a quarter of the cells at random plus as many occupied
    ones. Every cell starts occupied. Random draws come from torch's global CUDA generator (nerfacc
    takes no generator), so `generator` is ignored: runs are not bit-reproducible here.
    """

    packed = True  # render_image: render with `render_rays_packed`

    def __init__(self, radius: float = 1.0, resolution: int = 32, decay: float = 0.95, threshold: float = 0.01,
                 update_every: int = 16, levels: int = 1, warmup_steps: int = 256, device="cuda",
                 chunk: int = 262144):
        super().__init__()
        from nerfacc import OccGridEstimator  # nerfacc's import is slow: lazy

        self.radius, self.resolution, self.decay, self.threshold = radius, resolution, decay, threshold
        self.update_every, self.levels, self.warmup_steps, self.chunk = update_every, levels, warmup_steps, chunk
        self.estimator = OccGridEstimator(roi_aabb=[-radius] * 3 + [radius] * 3, resolution=resolution,
                                          levels=levels).to(device)
        self.estimator.binaries.fill_(True)

    @property
    def cell_size(self) -> float:
        return 2.0 * self.radius / self.resolution

    def render_step_size(self, num_samples: int) -> float:
        """The marching step: the dense renderer's spacing, the box side in `num_samples` steps, and
        never longer than a grid cell.

        `render_rays` splits each ray's chord through the box into `num_samples` intervals; nerfacc
        marches every ray with one fixed step. A ray from an orbit camera through the middle of the
        object crosses the box face to face (chord 2 radius at normal incidence, up to ~2.3 radius
        for the training views' obliquity), so side / num_samples gives the packed renderer the
        dense one's sample density where the object is (slightly more on oblique rays), where the
        box diagonal / num_samples (threestudio's rule, this file's before) gave ~0.6 of it: ~28
        samples where the CPU renderer takes 48, and a different image for the same config. A step
        longer than a cell could step over an occupied cell, hence the cap.
        """
        return min(2.0 * self.radius / num_samples, self.cell_size)

    @torch.no_grad()
    def update(self, field, step: int | None = None, generator: torch.Generator | None = None) -> bool:
        """Re-evaluate the density on the grid (every `update_every` steps when `step` is given)."""
        if step is not None and step % self.update_every != 0:
            return False

        def occ_eval_fn(x):  # (M, 3) world points -> (M,) density
            return torch.cat([field.density(p) for p in x.split(self.chunk)]) if x.shape[0] else x.new_zeros(0)

        self.estimator.train()  # update_every_n_steps refuses an estimator in eval mode
        self.estimator.update_every_n_steps(step=step or 0, occ_eval_fn=occ_eval_fn, occ_thre=self.threshold,
                                            ema_decay=self.decay, warmup_steps=self.warmup_steps, n=1)
        return True

    def occupied(self, points: torch.Tensor) -> torch.Tensor:
        """Bool mask (...,) of points inside the box and in an occupied cell of the finest level."""
        cell = ((points + self.radius) / self.cell_size).floor().long()
        inside = ((cell >= 0) & (cell < self.resolution)).all(-1)
        cell = cell.clamp(0, self.resolution - 1)
        return inside & self.estimator.binaries[0][cell[..., 0], cell[..., 1], cell[..., 2]]

    def occupied_fraction(self) -> float:
        return float(self.estimator.binaries[0].float().mean())


def occupancy_kind(state: dict) -> str:
    """Which grid wrote an occupancy state_dict, in words."""
    if any(key.startswith("estimator.") for key in state):
        return "nerfacc's OccGridEstimator (CudaOccupancy)"
    if "mask" in state and "density_ema" in state:
        return "OccupancyGrid"
    return "an unknown occupancy grid"


def load_occupancy_state(occupancy: OccupancyGrid | CudaOccupancy, state: dict, field) -> str | None:
    """Restore `occupancy` from a saved state_dict, or rebuild it from `field` when the state does
    not fit it (written by the other kind of grid, e.g. a CUDA run resumed on a CPU, or for another
    resolution). The grid only caches where the field has density (Instant-NGP's occupancy), so a
    rebuild, one full update from the field (every cell evaluated), loses nothing but the EMA's
    memory of earlier steps. Returns None when the state was loaded, else a one-line note of the
    rebuild for the caller to print.
    """
    mine = occupancy.state_dict()
    if set(state) == set(mine) and all(torch.as_tensor(state[k]).shape == mine[k].shape for k in mine):
        occupancy.load_state_dict(state)
        return None
    occupancy.update(field)  # no step: always runs; CudaOccupancy's first update evaluates every cell
    return (f"occupancy state in the checkpoint was written by {occupancy_kind(state)} and this run uses "
            f"{occupancy_kind(mine)} at resolution {occupancy.resolution}: rebuilt the grid from the field")
