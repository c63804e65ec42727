"""A field's textured mesh, its files, and the check that the mesh is the field.

Steps (`build_textured_mesh`): density grid -> iso-level fitted to the field's opacity silhouette
(`mesh.silhouette_threshold`, or a given density) -> marching cubes -> floaters removed (small
disconnected components, reported) -> quadric decimation to a face budget -> outward winding ->
UV atlas (xatlas) -> albedo baked under every texel where a head-on render sees it (the albedo
averaged over where the volume-rendering weights lie, a few cells below the iso-surface:
`texture.seen_depths`), padded across seams. Then
`export_textured_mesh` writes GLB (embedded PNG, PBR material), OBJ + MTL + PNG and PLY (vertex
colours), all made in memory and moved into place together, renders the mesh and the field from
the 8 evaluation views (`eval.ground_truth.evaluation_cameras`), and reports their silhouette IoU
and colour difference (plus the Chamfer distance to a reference mesh, and the glTF validator's
verdict where it is installed) as `mesh_*` metrics.

`texture="none"` keeps the earlier export: vertex colours in every format, no texture.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import trimesh

from ..eval.ground_truth import EVAL_RESOLUTION, evaluation_cameras
from ..eval.metrics import chamfer_distance, color_error, silhouette_iou
from .files import MESH_FORMATS, mesh_file_bytes, png_bytes, textured_glb, textured_obj, write_files
from .mesh import component_report, decimate, density_grid, mesh_from_grid, orient_outward, silhouette_threshold
from .raster import render_mesh
from .texture import UVLayout, bake_texture, seen_depths, surface_colors, texel_surface, unwrap
from .validate import find_validator, validate_gltf

TEXTURE_MODES = ("albedo", "none")
MIN_FACES = 100  # below this a decimated NeRF is a few shards, not the object
TEXTURE_SIZES = tuple(2 ** k for k in range(6, 14))  # 64 .. 8192: powers of two, for every engine's mipmaps


@dataclass
class TexturedMesh:
    """The exported geometry (closed where the field is, outward winding), its vertex colours (uint8
    RGBA), and with a texture the seam-cut UV layout and the baked albedo (H, W, 3) in [0, 1]."""

    mesh: trimesh.Trimesh
    colors: np.ndarray
    level: float
    floaters: dict
    layout: UVLayout | None = None
    texture: np.ndarray | None = None
    faces_before_decimation: int = 0


@dataclass
class MeshExport:
    files: dict[str, Path]  # by suffix: glb, obj, mtl, png, ply
    textured: TexturedMesh
    metrics: dict = field(default_factory=dict)
    views: torch.Tensor | None = None  # `mesh_agreement`'s picture


def check_export_options(formats=MESH_FORMATS, resolution: int = 128, threshold: float | str = "auto",
                         faces: int = 20000, texture_size: int = 1024, texture: str = "albedo",
                         roughness: float = 0.9) -> list[str]:
    """The formats as a list, or ValueError with one line naming the first bad option and what is allowed."""
    formats = [formats] if isinstance(formats, str) else list(formats)
    unknown = [f for f in formats if f not in MESH_FORMATS]
    if unknown or not formats:
        raise ValueError(f"unknown mesh format(s) {unknown}; allowed: {', '.join(MESH_FORMATS)}" if unknown
                         else f"no mesh format given; allowed: {', '.join(MESH_FORMATS)}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an integer >= 8 (grid points per side), got {resolution!r}")
    if not (threshold == "auto" or (isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
                                    and np.isfinite(threshold) and threshold > 0)):
        raise ValueError(f"threshold must be 'auto' or a density > 0, got {threshold!r}")
    if isinstance(faces, bool) or not isinstance(faces, int) or faces < MIN_FACES:
        raise ValueError(f"face budget must be at least {MIN_FACES} triangles, got {faces!r}")
    if texture not in TEXTURE_MODES:
        raise ValueError(f"texture must be one of {', '.join(TEXTURE_MODES)}, got {texture!r}")
    if texture_size not in TEXTURE_SIZES:
        raise ValueError(f"texture size must be a power of two from {TEXTURE_SIZES[0]} to {TEXTURE_SIZES[-1]}, "
                         f"got {texture_size!r}")
    if not (isinstance(roughness, (int, float)) and 0.0 <= roughness <= 1.0):
        raise ValueError(f"roughness must be in [0, 1], got {roughness!r}")
    return formats


def build_textured_mesh(density_fn: Callable, color_fn: Callable, resolution: int = 128,
                        threshold: float | str = "auto", faces: int = 20000, texture_size: int = 1024,
                        texture: str = "albedo", radius: float = 1.0, min_component_fraction: float = 0.05,
                        chunk: int = 65536, device="cpu") -> TexturedMesh:
    """The mesh of the field as it will be written (see the module's steps); nothing is written.

    ValueError when the field has no surface: nothing above the threshold, or (threshold "auto")
    no view in which the field's opacity exceeds 0.5.
    """
    grid = density_grid(density_fn, resolution, radius, chunk, device)
    if np.isnan(grid).any():
        raise ValueError(f"density_fn returned NaN at {int(np.isnan(grid).sum())} of {grid.size} grid points")
    level = silhouette_threshold(grid, radius) if threshold == "auto" else float(threshold)
    if not (grid.max() > level):
        raise ValueError(f"no surface at density threshold {level:g}: the field is empty there (max density "
                         f"{grid.max():g}); lower --threshold or use --threshold auto")
    mesh = mesh_from_grid(grid, level, radius)
    keep, floaters = component_report(mesh, min_component_fraction)
    mesh.update_faces(keep)
    mesh.remove_unreferenced_vertices()
    before = len(mesh.faces)
    mesh = orient_outward(decimate(mesh, faces))
    normals = np.asarray(mesh.vertex_normals)
    depths = seen_depths(mesh.vertices, normals, grid, radius)  # (V, K)
    points = np.asarray(mesh.vertices)[:, None, :] - normals[:, None, :] * depths[..., None]
    colors = np.full((len(points), 4), 255, dtype=np.uint8)
    colors[:, :3] = (surface_colors(color_fn, points, device=device) * 255.0).round().astype(np.uint8)
    result = TexturedMesh(mesh, colors, level, floaters, faces_before_decimation=before)
    if texture == "albedo":
        result.layout = unwrap(mesh.vertices, mesh.faces, texture_size)
        covered, points = texel_surface(mesh.vertices, normals, result.layout, texture_size, depths)
        result.texture = bake_texture(color_fn, points, covered, device=device)
    return result


def mesh_file_contents(textured: TexturedMesh, formats, stem: str = "mesh", roughness: float = 0.9) -> dict[str, bytes | str]:
    """{file name: content} of every format: textured GLB / OBJ + MTL + PNG and a vertex-coloured PLY,
    or vertex colours everywhere when there is no texture."""
    mesh = textured.mesh.copy()
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=textured.colors)
    contents: dict[str, bytes | str] = {}
    textured_formats = [fmt for fmt in formats if fmt != "ply"] if textured.texture is not None else []
    png = png_bytes(textured.texture) if textured_formats else None  # encoded once, for GLB and OBJ alike
    for fmt in formats:
        if fmt not in textured_formats:
            contents[f"{stem}.{fmt}"] = mesh_file_bytes(mesh, fmt)
            continue
        layout = textured.layout
        normals = np.asarray(textured.mesh.vertex_normals)  # of the closed mesh: smooth across UV seams
        if fmt == "glb":
            contents[f"{stem}.glb"] = textured_glb(textured.mesh.vertices[layout.vertex_of], layout.faces,
                                                   normals[layout.vertex_of], layout.uv, png, roughness)
        else:  # obj
            obj, mtl = textured_obj(textured.mesh.vertices, textured.mesh.faces, normals, layout.uv, layout.faces,
                                    stem, roughness)
            contents.update({f"{stem}.obj": obj, f"{stem}.mtl": mtl, f"{stem}.png": png})
    return contents


def mesh_agreement(textured: TexturedMesh, nerf_render_fn: Callable, background: float = 1.0,
                   resolution: int = EVAL_RESOLUTION) -> tuple[dict, torch.Tensor]:
    """The exported mesh against the field, from the 8 evaluation views: silhouette IoU of the
    mesh's coverage with the field's opacity > 0.5, and the mean absolute colour difference (per
    channel, [0, 1]) between the mesh's unlit colour and the field's rendered albedo, over the
    pixels both cover (`eval.metrics.color_error`).

    `nerf_render_fn(cameras)` returns "opacity" (B, 1, H, W) and "albedo" (B, 3, H, W), the albedo
    composited without background (sum of weights x albedo, as `nerf.render.render_image` does);
    it is divided by the opacity to compare colour with colour. Also returns a (3, 3H, 8W) picture:
    the field's views, the mesh's, and the mesh's under the Lambertian light (`raster.render_mesh`).
    """
    cameras = evaluation_cameras(resolution)
    nerf = nerf_render_fn(cameras)
    opacity = nerf["opacity"].detach().float().cpu()
    nerf_color = nerf["albedo"].detach().float().cpu() / opacity.clamp_min(1e-6)
    vertices, normals = np.asarray(textured.mesh.vertices), np.asarray(textured.mesh.vertex_normals)
    if textured.texture is not None:
        layout = textured.layout
        mesh_args = dict(vertices=vertices[layout.vertex_of], faces=layout.faces, uv=layout.uv, texture=textured.texture)
        normals = normals[layout.vertex_of]
    else:
        mesh_args = dict(vertices=vertices, faces=textured.mesh.faces, vertex_colors=textured.colors[:, :3] / 255.0)
    drawn = render_mesh(camera=cameras, background=background, **mesh_args)
    lit = render_mesh(camera=cameras, background=background, normals=normals, **mesh_args)["rgb"]
    iou = silhouette_iou(drawn["mask"], opacity)
    difference = color_error(drawn["rgb"], nerf_color, drawn["mask"], opacity)
    metrics = {"mesh_silhouette_iou": float(iou.mean()), "mesh_silhouette_iou_min": float(iou.min()),
               "mesh_color_difference": float(difference.mean()),
               "mesh_views": [{"azimuth_deg": float(az), "silhouette_iou": float(i), "color_difference": float(c)}
                              for az, i, c in zip(cameras.azimuth_deg, iou, difference)]}
    # Field over mesh, both unlit on the background (what the figures compare), then the mesh lit.
    field_rgb = nerf_color.clamp(0, 1) * opacity + (1.0 - opacity) * background
    rows = [torch.cat(list(images), -1) for images in (field_rgb, drawn["rgb"], lit)]
    return metrics, torch.cat(rows, -2)


def export_textured_mesh(density_fn: Callable, color_fn: Callable, out_dir: str | os.PathLike, stem: str = "mesh",
                         formats=MESH_FORMATS, resolution: int = 128, threshold: float | str = "auto",
                         faces: int = 20000, texture_size: int = 1024, texture: str = "albedo",
                         roughness: float = 0.9, radius: float = 1.0, min_component_fraction: float = 0.05,
                         nerf_render_fn: Callable | None = None, check_resolution: int = EVAL_RESOLUTION,
                         reference_mesh: trimesh.Trimesh | None = None, validate: bool = True, chunk: int = 65536,
                         device="cpu") -> MeshExport:
    """Build the mesh, write its files into `out_dir`, and measure it (`mesh_*` metrics).

    Options are checked first (`check_export_options`) and the whole mesh is made in memory before
    any file is written, so a bad option or an empty field leaves the folder as it was.
    `nerf_render_fn` (see `mesh_agreement`) adds the mesh-vs-field agreement, in views of
    `check_resolution` pixels; `reference_mesh` the
    Chamfer distance to it (`eval.metrics.chamfer_distance`); `validate` the Khronos validator's
    counts for the GLB when the validator is installed (`validate.find_validator`).
    """
    start = time.perf_counter()
    formats = check_export_options(formats, resolution, threshold, faces, texture_size, texture, roughness)
    textured = build_textured_mesh(density_fn, color_fn, resolution, threshold, faces, texture_size, texture, radius,
                                   min_component_fraction, chunk, device)
    contents = mesh_file_contents(textured, formats, stem, roughness)
    files = write_files(out_dir, contents)
    mesh = textured.mesh
    metrics = {"mesh_threshold": textured.level, "mesh_faces": int(len(mesh.faces)),
               "mesh_vertices": int(len(mesh.vertices)), "mesh_faces_before_decimation": textured.faces_before_decimation,
               "mesh_watertight": bool(mesh.is_watertight), "mesh_floaters": textured.floaters,
               "mesh_texture": texture, "mesh_texture_size": texture_size if texture != "none" else None}
    if f"{stem}.glb" in files:
        metrics["mesh_glb_bytes"] = files[f"{stem}.glb"].stat().st_size
    metrics["mesh_build_seconds"] = round(time.perf_counter() - start, 2)
    views = None
    if nerf_render_fn is not None:
        agreement, views = mesh_agreement(textured, nerf_render_fn, resolution=check_resolution)
        metrics.update(agreement)
    if reference_mesh is not None:
        chamfer = chamfer_distance(mesh, reference_mesh)
        metrics.update(mesh_chamfer=chamfer.mean, mesh_chamfer_mesh_to_truth=chamfer.a_to_b,
                       mesh_chamfer_truth_to_mesh=chamfer.b_to_a)
    if validate and f"{stem}.glb" in files and find_validator() is not None:
        report = validate_gltf(files[f"{stem}.glb"])
        metrics["mesh_gltf_validator"] = {"errors": report["numErrors"], "warnings": report["numWarnings"]}
    metrics["mesh_export_seconds"] = round(time.perf_counter() - start, 2)
    return MeshExport({path.suffix[1:]: path for path in files.values()}, textured, metrics, views)
