"""Mesh extraction from a density field: grid -> iso-level -> marching cubes -> floaters removed ->
decimation -> outward normals -> vertex colors.

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

from ..geometry.cameras import Camera, camera_rays, concat_cameras, orbit_cameras, ray_box_intersect

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


def selection_cameras(resolution: int = 64) -> Camera:
    """The views the automatic iso-level is fitted on: 8 around the object at 15 degrees elevation,
    half-way between the 8 evaluation views (which judge the result), and 4 from 60 degrees above."""
    low = orbit_cameras(8, resolution, elevation_deg=15.0, distance=2.75, fovy_deg=45.0, start_azimuth_deg=22.5)
    high = orbit_cameras(4, resolution, elevation_deg=60.0, distance=2.75, fovy_deg=45.0, start_azimuth_deg=45.0)
    return concat_cameras([low, high])


def sample_grid(grid: np.ndarray | torch.Tensor, points: torch.Tensor, radius: float = 1.0) -> torch.Tensor:
    """Trilinear interpolation of a grid over [-radius, radius]^3 (indexed [x, y, z]) at points
    (..., 3); zero outside the box. The same interpolant marching cubes puts its surface in."""
    volume = torch.as_tensor(np.ascontiguousarray(grid) if isinstance(grid, np.ndarray) else grid, dtype=torch.float32)
    # grid_sample wants (N, C, D, H, W) indexed [z, y, x] with x first in the coordinates: our grid is
    # [x, y, z], so pass it transposed; align_corners=True puts -1 and 1 on the outer grid points.
    volume = volume.permute(2, 1, 0)[None, None]
    flat = points.reshape(1, 1, 1, -1, 3).float() / radius
    values = torch.nn.functional.grid_sample(volume, flat, mode="bilinear", padding_mode="zeros", align_corners=True)
    return values.reshape(points.shape[:-1])


def grid_ray_profiles(grid: np.ndarray, radius: float, cameras: Camera,
                      samples_per_cell: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Along every camera ray through the grid's box: the volume-rendered opacity of the grid's
    density (trilinear), 1 - exp(-sum sigma delta) (Max 1995, the NeRF's quadrature), and the
    highest density the ray meets. Both (rays,), for `silhouette_threshold`.

    A ray sees the surface {density = level} of the grid iff it meets a density above the level,
    so the mesh's silhouette at a level is {max density > level}, with no marching cubes needed.
    """
    resolution = grid.shape[0]
    cell = 2.0 * radius / (resolution - 1)
    origins, dirs = (v.reshape(-1, 3) for v in camera_rays(cameras))
    t_near, t_far, hit = ray_box_intersect(origins, dirs, radius)
    origins, dirs, t_near, t_far = origins[hit], dirs[hit], t_near[hit], t_far[hit]
    n = int(np.ceil(2.0 * np.sqrt(3.0) * radius / cell * samples_per_cell))
    volume = torch.as_tensor(np.ascontiguousarray(grid), dtype=torch.float32)
    opacity, peak = [], []
    for start in range(0, len(origins), 4096):
        o, d = origins[start : start + 4096], dirs[start : start + 4096]
        lo, hi = t_near[start : start + 4096], t_far[start : start + 4096]
        steps = (torch.arange(n, dtype=torch.float32) + 0.5) / n
        t = lo[:, None] + (hi - lo)[:, None] * steps  # (R, n) midpoints
        sigma = sample_grid(volume, o[:, None] + d[:, None] * t[..., None], radius)  # (R, n)
        delta = ((hi - lo) / n)[:, None]
        opacity.append(1.0 - torch.exp(-(sigma.clamp_min(0) * delta).sum(1)))
        peak.append(sigma.amax(1))
    total = cameras.batch_size * cameras.height * cameras.width
    full_opacity, full_peak = np.zeros(total), np.zeros(total)
    if opacity:
        full_opacity[hit.numpy()] = torch.cat(opacity).numpy()
        full_peak[hit.numpy()] = torch.cat(peak).numpy()
    return full_opacity, full_peak


def silhouette_threshold(grid: np.ndarray, radius: float = 1.0, cameras: Camera | None = None,
                         tolerance: float = 1e-3) -> float:
    """The iso-level whose surface has the silhouette of the field's opacity (> 0.5) in `cameras`.

    For each level the mesh covers the rays whose highest density exceeds it (`grid_ray_profiles`),
    so the IoU with the opacity mask is known for every level at once: sort the rays by their peak
    density and take cumulative sums. Around the best level, those within `tolerance` of its IoU
    form a plateau (a sharp surface leaves a wide one); its geometric middle is returned, away from
    both the fog (low end) and the core (high end). Raises ValueError when no view sees opacity
    above 0.5.
    """
    cameras = selection_cameras() if cameras is None else cameras
    opacity, peak = grid_ray_profiles(grid, radius, cameras)
    target = opacity > 0.5
    if not target.any():
        raise ValueError(f"no surface: the field is empty (max density {float(grid.max()):.3g}; no view "
                         f"sees an opacity above 0.5)")
    order = np.argsort(-peak, kind="stable")
    sorted_peak, sorted_target = peak[order], target[order]
    # The first k rays (peak > level) in the mask: IoU_k for every k; only levels between distinct
    # positive peaks count (a level equal to a peak value would split a tie).
    intersection = np.cumsum(sorted_target)
    union = target.sum() + np.cumsum(~sorted_target)
    iou = intersection / union
    next_peak = np.append(sorted_peak[1:], 0.0)
    cuts = np.nonzero((sorted_peak > next_peak) & (sorted_peak > 0))[0]  # in order of falling level
    iou = iou[cuts]
    # The plateau: the run of cuts around the best one whose IoU stays within `tolerance` of it.
    best = int(np.argmax(iou))
    near = iou >= iou[best] - tolerance
    first, last = best, best
    while first > 0 and near[first - 1]:
        first -= 1
    while last < len(cuts) - 1 and near[last + 1]:
        last += 1
    # Levels between peak k and peak k+1 (geometric mean); below the last ray of all, half its peak.
    ends = cuts[[first, last]]
    levels = np.sqrt(sorted_peak[ends] * np.where(next_peak[ends] > 0, next_peak[ends], 0.25 * sorted_peak[ends]))
    return float(np.sqrt(levels[0] * levels[1]))


def component_report(mesh: trimesh.Trimesh, min_fraction: float) -> tuple[np.ndarray, dict]:
    """Which faces belong to components kept by `remove_small_components`, and what goes.

    Returns the face mask and {"components": found, "removed": count, "faces_removed": count,
    "largest_removed_faces": the biggest removed component's face count}.
    """
    if len(mesh.faces) == 0:
        return np.zeros(0, dtype=bool), {"components": 0, "removed": 0, "faces_removed": 0, "largest_removed_faces": 0}
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    sizes = np.bincount(labels)
    keep = sizes >= min_fraction * sizes.max()
    removed = sizes[~keep]
    report = {"components": int(len(sizes)), "removed": int((~keep).sum()), "faces_removed": int(removed.sum()),
              "largest_removed_faces": int(removed.max()) if len(removed) else 0}
    return keep[labels], report


def remove_small_components(mesh: trimesh.Trimesh, min_fraction: float) -> trimesh.Trimesh:
    """Keep the connected components with at least `min_fraction` of the faces of the largest one.

    NeRFs leave floaters (small blobs of density in the air); they would otherwise become specks of
    geometry in the exported mesh.
    """
    keep, _ = component_report(mesh, min_fraction)
    mesh.update_faces(keep)
    mesh.remove_unreferenced_vertices()
    return mesh


def decimate(mesh: trimesh.Trimesh, max_faces: int) -> trimesh.Trimesh:
    """At most `max_faces` triangles by quadric edge collapse (Garland & Heckbert 1997) through
    pymeshlab (MeshLab's `meshing_decimation_quadric_edge_collapse`); a mesh within the budget is
    returned as it is.

    `preservetopology` refuses collapses that would change the topology, so a closed manifold
    stays closed and manifold at any budget (fast-simplification, tried first, folds thin parts
    onto each other below a few thousand faces); `preservenormal` refuses collapses that flip a
    face; `planarquadric` keeps flat regions flat (a cube's faces).
    """
    import pymeshlab

    if len(mesh.faces) <= max_faces:
        return mesh
    meshes = pymeshlab.MeshSet()
    meshes.add_mesh(pymeshlab.Mesh(np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int32)))
    meshes.meshing_decimation_quadric_edge_collapse(targetfacenum=int(max_faces), preservetopology=True,
                                                    preservenormal=True, optimalplacement=True, planarquadric=True,
                                                    autoclean=True)
    out = meshes.current_mesh()
    out = trimesh.Trimesh(out.vertex_matrix(), out.face_matrix(), process=False)
    out.update_faces(out.nondegenerate_faces())
    out.remove_unreferenced_vertices()
    return out


def orient_outward(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Consistent winding with normals pointing out of the solid.

    Marching cubes and edge collapses wind every face consistently, so one global flip fixes the
    orientation (by the signed volume); per-body fixes would wrongly turn the walls of inner cavities
    inside out. A mesh whose winding is not consistent (never seen) is repaired by trimesh first.
    """
    if not mesh.is_winding_consistent:
        trimesh.repair.fix_winding(mesh)
    if mesh.volume < 0:
        mesh.invert()
    return mesh


def mesh_from_grid(grid: np.ndarray, level: float, radius: float = 1.0) -> trimesh.Trimesh:
    """The surface {density = level} of a grid over [-radius, radius]^3 (indexed [x, y, z]) by
    marching cubes (Lorensen & Cline 1987; scikit-image's Lewiner variant), merged and without
    duplicate faces.

    The grid is padded with empty space first, so geometry that touches the box is capped at the
    box walls and the mesh is closed (watertight) there.
    """
    resolution = grid.shape[0]
    cell = 2.0 * radius / (resolution - 1)
    padded = np.pad(grid, 1, mode="constant", constant_values=min(grid.min(), level) - 1.0)
    # gradient_direction="ascent": with [x, y, z] indexing this winds faces so normals point toward
    # decreasing density, i.e. out of the object (`orient_outward` checks with the signed volume anyway).
    verts, faces, _, _ = skimage.measure.marching_cubes(padded, level, spacing=(cell, cell, cell),
                                                        gradient_direction="ascent")
    verts = np.clip(verts - (radius + cell), -radius, radius)  # padded index space -> world
    mesh = trimesh.Trimesh(verts, faces, process=False)
    mesh.merge_vertices()
    mesh.update_faces(mesh.unique_faces())
    mesh.remove_unreferenced_vertices()
    return mesh


def vertex_colors(color_fn: Callable, points: np.ndarray, chunk: int = 65536, device="cpu") -> np.ndarray:
    """`color_fn` at `points` as uint8 RGBA (N, 4), opaque."""
    rgb = _evaluate(color_fn, torch.as_tensor(np.asarray(points), dtype=torch.float32), chunk, device)
    rgba = np.full((len(rgb), 4), 255, dtype=np.uint8)
    rgba[:, :3] = (rgb.reshape(-1, 3).clamp(0.0, 1.0).numpy() * 255.0).round().astype(np.uint8)
    return rgba


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

    mesh = remove_small_components(mesh_from_grid(grid, level, radius), min_component_fraction)
    mesh = orient_outward(mesh)
    if color_fn is not None:
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=vertex_colors(color_fn, mesh.vertices, chunk, device))
    return mesh
