"""Exports: meshes from density fields (plain or textured), mesh files, turntable videos and images."""

from .files import MESH_FORMATS, export_mesh
from .mesh import (DEFAULT_THRESHOLD, auto_threshold, decimate, density_grid, extract_mesh, remove_small_components,
                   silhouette_threshold)
from ..io import image_grid, save_image
from .raster import render_mesh
from .textured import (MIN_FACES, TEXTURE_MODES, TEXTURE_SIZES, MeshExport, build_textured_mesh, check_export_options,
                       export_textured_mesh, mesh_agreement)
from .validate import find_validator, validate_gltf
from .video import write_turntable

__all__ = [
    "DEFAULT_THRESHOLD",
    "MESH_FORMATS",
    "MIN_FACES",
    "MeshExport",
    "TEXTURE_MODES",
    "TEXTURE_SIZES",
    "auto_threshold",
    "build_textured_mesh",
    "check_export_options",
    "decimate",
    "density_grid",
    "export_mesh",
    "export_textured_mesh",
    "extract_mesh",
    "find_validator",
    "image_grid",
    "mesh_agreement",
    "remove_small_components",
    "render_mesh",
    "save_image",
    "silhouette_threshold",
    "validate_gltf",
    "write_turntable",
]
