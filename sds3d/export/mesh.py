"""Mesh extraction from a density field: grid -> marching cubes -> cleanup -> vertex colors.

Works against plain callables so any field will do:
``density_fn(points (N, 3) float32) -> (N,)`` and ``color_fn(points (N, 3)) -> (N, 3)`` albedo in [0, 1].
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import skimage.filters
import skimage.measure
import torch
import trimesh

# threestudio extracts NeRF meshes at the isosurface density 25 (`isosurface_threshold: 25.`).
# Density is extinction per unit length: at 25 the mean free path is 1/25 = 0.04, about 2.5 cells of
# a 128^3 grid over [-1, 1]^3, so a layer a few cells thick is already ~90% opaque -- the level set
# sits where renders show a surface. Our softplus density is in the same units and reaches the same
# range once trained, so we keep 25; `threshold="auto"` adapts to fields that never get that dense.
DEFAULT_THRESHOLD = 25.0


def _evaluate(fn: Callable, points: torch.Tensor, chunk: int, device) -> torch.Tensor:
    """fn over `points` in chunks, without autograd, gathered on the CPU as float32."""
    out = []
    with torch.no_grad():
        for start in range(0, points.shape[0], chunk):
            out.append(fn(points[start : start + chunk].to(device)).detach().float().cpu())
    return torch.cat(out, 0)


def density_grid(density_fn: Callable, resolution: int = 128, radius: float = 1.0, chunk: int = 65536,
                 device="cpu") -> np.ndarray:
    """Density at the `resolution`^3 grid points spanning [-radius, radius]^3, indexed [x, y, z]."""
    axis = torch.linspace(-radius, radius, resolution)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    density = _evaluate(density_fn, points, chunk, device).reshape(-1)
    return density.reshape(resolution, resolution, resolution).numpy()


def auto_threshold(grid: np.ndarray) -> float:
    """Otsu's level on log(1 + density): the value that best splits the grid into empty and filled.

    threestudio's "auto" takes the mean of the positive densities instead, which drifts with how much
    of the box the object fills; densities are heavy-tailed, hence the log.
    """
    values = np.log1p(np.clip(grid, 0.0, None)).ravel()
    if values.max() - values.min() < 1e-6:
        return float(np.expm1(values.max()))  # flat field: no surface; the caller reports it
    return float(np.expm1(skimage.filters.threshold_otsu(values)))


def remove_small_components(mesh: trimesh.Trimesh, min_fraction: float) -> trimesh.Trimesh:
    """Keep the connected components with at least `min_fraction` of the faces of the largest one.

    NeRFs leave floaters (small blobs of density in the air); they would otherwise become specks of
    geometry in the exported mesh.
    """
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    sizes = np.bincount(labels)
    keep = sizes >= min_fraction * sizes.max()
    mesh.update_faces(keep[labels])
    mesh.remove_unreferenced_vertices()
    return mesh


def extract_mesh(density_fn: Callable, color_fn: Callable | None = None, resolution: int = 128,
                 threshold: float | str = DEFAULT_THRESHOLD, radius: float = 1.0, chunk: int = 65536,
                 min_component_fraction: float = 0.05, device="cpu") -> trimesh.Trimesh:
    """Surface {density = threshold} of the field inside [-radius, radius]^3 as a cleaned, colored mesh.

    The grid is padded with empty space before marching cubes, so geometry that touches the box is
    capped at the box walls and the mesh is closed (watertight) there. Faces are wound so normals
    point out of the dense region. Vertex colors (uint8 RGBA) come from `color_fn` at the vertices.
    `threshold="auto"` picks the level with `auto_threshold`.
    """
    grid = density_grid(density_fn, resolution, radius, chunk, device)
    if np.isnan(grid).any():
        raise ValueError(f"density_fn returned NaN at {int(np.isnan(grid).sum())} of {grid.size} grid points")
    if isinstance(threshold, str) and threshold != "auto":
        raise ValueError(f"threshold must be a density or 'auto', got {threshold!r}")
    level = auto_threshold(grid) if threshold == "auto" else float(threshold)
    if not (grid.max() > level):
        raise ValueError(f"no surface at density threshold {level:g}: the field is empty (max density "
                         f"{grid.max():g}); lower `threshold` or pass threshold='auto'")

    cell = 2.0 * radius / (resolution - 1)
    padded = np.pad(grid, 1, mode="constant", constant_values=min(grid.min(), level) - 1.0)
    # gradient_direction="ascent": with [x, y, z] indexing this winds faces so normals point toward
    # decreasing density, i.e. out of the object (checked below with the signed volume anyway).
    verts, faces, _, _ = skimage.measure.marching_cubes(padded, level, spacing=(cell, cell, cell),
                                                        gradient_direction="ascent")
    verts = np.clip(verts - (radius + cell), -radius, radius)  # padded index space -> world

    mesh = trimesh.Trimesh(verts, faces, process=False)
    mesh.merge_vertices()
    mesh.update_faces(mesh.unique_faces())
    mesh.remove_unreferenced_vertices()
    mesh = remove_small_components(mesh, min_component_fraction)
    # Marching cubes winds every face consistently, so one global flip fixes orientation; per-body
    # fixes would wrongly turn the walls of inner cavities inside out.
    if mesh.volume < 0:
        mesh.invert()

    if color_fn is not None:
        points = torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32)
        rgb = _evaluate(color_fn, points, chunk, device).reshape(-1, 3).clamp(0.0, 1.0)
        rgba = np.full((len(rgb), 4), 255, dtype=np.uint8)
        rgba[:, :3] = (rgb.numpy() * 255.0).round().astype(np.uint8)
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=rgba)
    return mesh
