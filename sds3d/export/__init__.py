"""Exports: meshes from density fields, mesh files, turntable videos and images."""

from .files import MESH_FORMATS, export_mesh
from .mesh import DEFAULT_THRESHOLD, auto_threshold, density_grid, extract_mesh, remove_small_components
from ..io import image_grid, save_image
from .video import write_turntable

__all__ = [
    "DEFAULT_THRESHOLD",
    "MESH_FORMATS",
    "auto_threshold",
    "density_grid",
    "export_mesh",
    "extract_mesh",
    "image_grid",
    "remove_small_components",
    "save_image",
    "write_turntable",
]
