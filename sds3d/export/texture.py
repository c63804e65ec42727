"""UV atlas (xatlas) and the albedo texture baked from the field at the surface, with seam padding.

Texture coordinates here follow glTF 2.0 (section 3.8.1): (0, 0) is the image's top-left corner,
u runs right and v down, so texel (i, j) has its centre at ((j + 0.5) / W, (i + 0.5) / H). OBJ
files flip v on writing (`files.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.ndimage
import torch
import xatlas

from .mesh import sample_grid
from .raster import rasterize

# Empty texels between charts, per side (xatlas' `padding`): bilinear filtering and the first mip
# levels then read only this chart's colours, which `fill_empty_texels` extends into the gap.
CHART_PADDING = 4
CHART_AREA_DIVISOR = 256


@dataclass
class UVLayout:
    """A mesh cut along the atlas' seams: the corners of `faces` (F, 3) index `uv` (V', 2), and
    `vertex_of` (V',) says which vertex of the uncut mesh each one copies."""

    vertex_of: np.ndarray
    faces: np.ndarray
    uv: np.ndarray


def unwrap(vertices: np.ndarray, faces: np.ndarray, texture_size: int, padding: int = CHART_PADDING) -> UVLayout:
    """Charts and their packing into one square atlas of `texture_size`^2 texels, by xatlas
    (Young, "xatlas", after Lévy et al. 2002's least-squares conformal maps for the charts).

    xatlas picks its own texel density for the requested resolution and may return a slightly
    non-square atlas; the coordinates are scaled into [0, 1]^2 of the square texture, which only
    changes the texel density (and the padding, in texels) a little along one axis.
    """
    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(vertices, dtype=np.float32), np.ascontiguousarray(faces, dtype=np.uint32))
    charts = xatlas.ChartOptions()
    # Charts of at most 1/256 of the surface: xatlas' chart growing then takes well under a second on
    # a 20k-face NeRF mesh instead of several, for a less tightly packed atlas (~2/3 of the texels
    # used instead of ~5/6).
    triangles = np.asarray(vertices, dtype=np.float64)[np.asarray(faces)]
    area = 0.5 * np.linalg.norm(np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0]), axis=1).sum()
    charts.max_chart_area = float(area / CHART_AREA_DIVISOR)
    pack = xatlas.PackOptions()
    pack.resolution = int(texture_size)
    pack.padding = int(padding)
    pack.bilinear = True
    atlas.generate(charts, pack)
    vertex_of, uv_faces, uv = atlas.get_mesh(0)
    if atlas.atlas_count != 1:  # never seen at these sizes; one texture is what every format below holds
        raise RuntimeError(f"xatlas packed the charts into {atlas.atlas_count} atlases instead of one")
    # The binding divides by the atlas' width and height. Whichever way xatlas' v points, `bake_texture`
    # puts v = (i + 0.5) / H at image row i, glTF's convention, so the layout and the texture agree.
    return UVLayout(vertex_of.astype(np.int64), uv_faces.astype(np.int64), uv.astype(np.float64))


def fill_empty_texels(image: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Every texel outside the charts takes the colour of the nearest covered texel (dilation to
    convergence, as a Voronoi fill: the usual "edge padding" of texture bakers).

    Bilinear lookups and mipmaps at a chart's border then average its own colours with copies of
    them instead of the background or a neighbouring chart: no dark or foreign seams.
    """
    if covered.all() or not covered.any():
        return image
    _, (rows, cols) = scipy.ndimage.distance_transform_edt(~covered, return_indices=True)
    return image[rows, cols]


def texel_surface(vertices: np.ndarray, normals: np.ndarray, layout: UVLayout, texture_size: int,
                  depths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The points to colour every texel centre inside a chart from: the (H, W) mask of covered
    texels and points (N, K, 3) in its row-major order.

    Each texel centre is located in its triangle of the atlas (barycentric coordinates) and mapped
    to the same barycentric point of the 3D triangle; with per-vertex `depths` (V, K) (`seen_depths`)
    that point is moved each of the K (interpolated) depths along the interpolated inward normal.
    """
    size = int(texture_size)
    corners = layout.uv[layout.faces] * size  # (F, 3, 2) in texel units, y down = v down
    face, bary = rasterize(corners, None, size, size)
    covered = face >= 0
    corner_ids = layout.vertex_of[layout.faces[face[covered]]]  # (N, 3) vertices of the uncut mesh
    weights = bary[covered][..., None]
    points = (np.asarray(vertices, dtype=np.float64)[corner_ids] * weights).sum(1)[:, None, :]
    if depths is not None:
        normal = (np.asarray(normals, dtype=np.float64)[corner_ids] * weights).sum(1)
        normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
        depth = (np.asarray(depths, dtype=np.float64)[corner_ids] * weights).sum(1)  # (N, K)
        points = points - normal[:, None, :] * depth[..., None]
    return covered, points


def seen_depths(points: np.ndarray, normals: np.ndarray, grid: np.ndarray, radius: float = 1.0,
                quantiles: int = 4, outside_cells: float = 2.0, inside_cells: float = 8.0,
                samples: int = 24) -> np.ndarray:
    """Where below each surface point a camera looking straight at it gathers the field's colour:
    the depths (N, K) splitting the volume-rendering weights (Max 1995; NeRF's w_i = T_i (1 -
    exp(-sigma_i delta))) of the density grid along the inward normal into K equal parts, at the
    middle of each part ((k + 1/2) / K of the cumulative weight, each sample's weight spread over
    its interval). The ray runs from `outside_cells` grid cells outside to `inside_cells` inside
    the iso-surface; where it meets no density all depths are 0.

    Why: the iso-level that matches the silhouette sits on the outer fringe of the density, where
    the albedo is barely trained (renders weight it little), and a render's colour is the weighted
    mean of the albedo along the ray. The mean of the albedo at these K depths is that mean's
    K-point quadrature, at K field evaluations per texel instead of one per sample. The depths vary
    slowly along the surface, so they are taken at the vertices and interpolated across the texels
    (`texel_surface`).
    """
    cell = 2.0 * radius / (grid.shape[0] - 1)
    p = torch.tensor(np.asarray(points), dtype=torch.float32)
    n = torch.tensor(np.asarray(normals), dtype=torch.float32)
    steps = torch.linspace(-outside_cells, inside_cells, samples) * cell  # below the surface
    delta = float(steps[1] - steps[0])
    levels = (torch.arange(quantiles, dtype=torch.float32) + 0.5) / quantiles
    volume = torch.as_tensor(np.ascontiguousarray(grid), dtype=torch.float32)
    depths, chunk = [], 1 << 16
    for start in range(0, len(p), chunk):
        pp, nn_ = p[start : start + chunk], n[start : start + chunk]
        sigma = sample_grid(volume, pp[:, None] - nn_[:, None] * steps[None, :, None], radius).clamp_min(0.0)
        alpha = 1.0 - torch.exp(-sigma * delta)
        transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha[:, :-1]], 1), 1)
        weights = alpha * transmittance
        total = weights.sum(1, keepdim=True)
        cumulative = torch.cumsum(weights / total.clamp_min(1e-12), 1)
        target = levels.expand(len(pp), quantiles).contiguous()
        j = torch.searchsorted(cumulative.contiguous(), target).clamp(max=samples - 1)  # the sample holding each level
        before = torch.where(j > 0, cumulative.gather(1, (j - 1).clamp_min(0)), torch.zeros_like(target))
        mass = (cumulative.gather(1, j) - before).clamp_min(1e-12)
        depth = steps[j] - 0.5 * delta + ((target - before) / mass).clamp(0.0, 1.0) * delta
        depths.append(torch.where(total > 1e-3, depth, torch.zeros_like(depth)))
    return torch.cat(depths).double().numpy() if depths else np.zeros((0, quantiles))


def surface_colors(color_fn: Callable, points: np.ndarray, chunk: int = 1 << 18, device="cpu") -> np.ndarray:
    """The mean of `color_fn(points (M, 3)) -> (M, 3)` over the K points of each entry of points
    (N, K, 3): (N, 3) in [0, 1]."""
    points = np.asarray(points)
    flat = points.reshape(-1, 3)
    colors = []
    with torch.no_grad():
        for start in range(0, len(flat), chunk):
            part = torch.as_tensor(flat[start : start + chunk], dtype=torch.float32, device=device)
            colors.append(color_fn(part).detach().float().cpu().clamp(0.0, 1.0).numpy().reshape(-1, 3))
    if not colors:
        return np.zeros((points.shape[0], 3))
    return np.concatenate(colors).reshape(points.shape[0], points.shape[1], 3).mean(1)


def bake_texture(color_fn: Callable, points: np.ndarray, covered: np.ndarray, chunk: int = 1 << 18,
                 device="cpu") -> np.ndarray:
    """`surface_colors` at the points (N, K, 3) of the covered texels (`texel_surface`, row-major
    order), as an (H, W, 3) texture in [0, 1] padded by `fill_empty_texels`."""
    image = np.zeros(covered.shape + (3,))
    image[covered] = surface_colors(color_fn, points, chunk, device)
    return fill_empty_texels(image, covered)
