"""Mesh files: GLB, OBJ and PLY through trimesh, each keeping the vertex colors, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import trimesh

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
    out_dir = Path(out_dir)
    paths = {}
    for fmt in formats:
        out = mesh.copy().apply_transform(Z_UP_TO_GLTF) if fmt == "glb" and gltf_y_up else mesh
        data = out.export(file_type=fmt)
        data = data.encode("utf-8") if isinstance(data, str) else data
        path = out_dir / f"{stem}.{fmt}"
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        paths[fmt] = path
    return paths
