"""Mesh files, written atomically: GLB, OBJ and PLY with vertex colors (`export_mesh`), and the
textured ones: GLB with an embedded PNG and a PBR material (`textured_glb`), OBJ + MTL + PNG
(`textured_obj`); `write_files` writes a set of them through temporary names.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from ..io import atomic_path

# GLB stores vertex colors as the COLOR_0 attribute, OBJ as "v x y z r g b" lines (the common
# extension MeshLab and Blender read), PLY as red/green/blue/alpha vertex properties.
MESH_FORMATS = ("glb", "obj", "ply")

# glTF is +Y up with the asset's front facing +Z; our world is z up with the front facing +x. The cyclic
# permutation (x, y, z) -> (y, z, x) is a proper rotation that maps one onto the other, so GLB files
# stand upright and face the viewer in Blender, three.js and <model-viewer>.
Z_UP_TO_GLTF = np.array([[0.0, 1.0, 0.0, 0.0],
                         [0.0, 0.0, 1.0, 0.0],
                         [1.0, 0.0, 0.0, 0.0],
                         [0.0, 0.0, 0.0, 1.0]])


def export_mesh(mesh: trimesh.Trimesh, out_dir: str | os.PathLike, stem: str = "mesh",
                formats=MESH_FORMATS, gltf_y_up: bool = True) -> dict[str, Path]:
    """Write `out_dir/stem.<format>` for each format; returns {format: path}.

    OBJ and PLY keep our z-up world coordinates (those formats have no up axis); GLB is rotated to
    glTF's y up with `Z_UP_TO_GLTF` unless `gltf_y_up=False`.
    """
    formats = [formats] if isinstance(formats, str) else list(formats)
    unknown = [f for f in formats if f not in MESH_FORMATS]
    if unknown:
        raise ValueError(f"unknown mesh format(s) {unknown}; allowed: {', '.join(MESH_FORMATS)}")
    paths = write_files(out_dir, {f"{stem}.{fmt}": mesh_file_bytes(mesh, fmt, gltf_y_up) for fmt in formats})
    return {path.suffix[1:]: path for path in paths.values()}


def mesh_file_bytes(mesh: trimesh.Trimesh, fmt: str, gltf_y_up: bool = True) -> bytes | str:
    """One format's file content of a vertex-coloured mesh (GLB rotated to y up unless `gltf_y_up=False`)."""
    out = mesh.copy().apply_transform(Z_UP_TO_GLTF) if fmt == "glb" and gltf_y_up else mesh
    return out.export(file_type=fmt)


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) floats in [0, 1] or uint8 -> PNG bytes (8-bit RGB)."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array[..., :3])).save(buffer, format="PNG")
    return buffer.getvalue()


def textured_glb(vertices: np.ndarray, faces: np.ndarray, normals: np.ndarray, uv: np.ndarray, png: bytes,
                 roughness: float, gltf_y_up: bool = True) -> bytes:
    """A GLB holding one mesh with NORMAL and TEXCOORD_0, and one glTF 2.0 metallic-roughness
    material (section 3.9.2): the PNG embedded as its baseColorTexture, metallicFactor 0 (a
    dielectric: the NeRF's albedo is a diffuse colour) and `roughness`.

    `uv` is in glTF's convention (v down the image), `normals` per vertex of this (seam-cut) mesh.
    """
    rotation = Z_UP_TO_GLTF[:3, :3] if gltf_y_up else np.eye(3)
    material = trimesh.visual.material.PBRMaterial(name="albedo", baseColorTexture=Image.open(io.BytesIO(png)),
                                                   metallicFactor=0.0, roughnessFactor=float(roughness),
                                                   doubleSided=False)
    # trimesh holds OBJ-style coordinates (v up) and flips v when it writes glTF.
    visual = trimesh.visual.TextureVisuals(uv=np.stack([uv[:, 0], 1.0 - uv[:, 1]], -1), material=material)
    mesh = trimesh.Trimesh(np.asarray(vertices) @ rotation.T, faces, vertex_normals=np.asarray(normals) @ rotation.T,
                           visual=visual, process=False)
    return mesh.export(file_type="glb", include_normals=True)


def textured_obj(vertices: np.ndarray, faces: np.ndarray, normals: np.ndarray, uv: np.ndarray, uv_faces: np.ndarray,
                 stem: str, roughness: float) -> tuple[str, str]:
    """OBJ and MTL text of a textured mesh (the PNG is written beside them as `stem`.png).

    OBJ indexes positions, texture coordinates and normals separately (`f v/vt/vn`), so the
    positions stay shared across UV seams and the mesh stays closed in Blender or MeshLab; `vt`
    flips v (OBJ's origin is the image's bottom-left corner). The MTL names the PNG as map_Kd, with
    the PBR extension lines Pr (roughness) and Pm (metallic) that Blender's importer reads.
    """
    lines = ["# sds3d textured mesh", f"mtllib {stem}.mtl", "o mesh"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in np.asarray(vertices)]
    lines += [f"vt {u:.6f} {1.0 - v:.6f}" for u, v in np.asarray(uv)]
    lines += [f"vn {x:.5f} {y:.5f} {z:.5f}" for x, y, z in np.asarray(normals)]
    lines += ["usemtl albedo", "s 1"]
    f, t = np.asarray(faces) + 1, np.asarray(uv_faces) + 1
    lines += [f"f {a}/{ta}/{a} {b}/{tb}/{b} {c}/{tc}/{c}" for (a, b, c), (ta, tb, tc) in zip(f.tolist(), t.tolist())]
    mtl = "\n".join(["# sds3d textured mesh", "newmtl albedo", "Ka 1.000000 1.000000 1.000000",
                     "Kd 1.000000 1.000000 1.000000", "Ks 0.000000 0.000000 0.000000", "d 1.0", "illum 1",
                     f"Pr {float(roughness):.6f}", "Pm 0.000000", f"map_Kd {stem}.png"]) + "\n"
    return "\n".join(lines) + "\n", mtl


def write_files(out_dir: str | os.PathLike, contents: dict[str, bytes | str]) -> dict[str, Path]:
    """Write every {file name: content} into `out_dir`: all to temporary names first, then each moved
    into place (`io.atomic_path`). Contents are made in memory before, so a failure anywhere leaves
    no partial or temporary file, and the set is renamed only once every file is whole on disk."""
    out_dir = Path(out_dir)
    paths = {name: out_dir / name for name in contents}
    with contextlib.ExitStack() as stack:
        for name, data in contents.items():
            tmp = stack.enter_context(atomic_path(paths[name]))
            tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return paths
