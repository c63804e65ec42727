"""Ground-truth meshes of world scenes, for geometry metrics and exports."""

from __future__ import annotations

import numpy as np
import torch

from .scenes import Scene

CHUNK = 262144  # SDF points per call: bounds memory at high resolutions


@torch.no_grad()
def sdf_grid(scene: Scene, resolution: int = 128, radius: float = 1.0) -> torch.Tensor:
    """SDF sampled on a resolution^3 grid over [-radius, radius]^3, indexed [x, y, z]."""
    axis = torch.linspace(-radius, radius, resolution)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    values = torch.cat([scene.distance(chunk) for chunk in points.split(CHUNK)])
    return values.reshape(resolution, resolution, resolution)


@torch.no_grad()
def ground_truth_mesh(scene: Scene, resolution: int = 128, radius: float = 1.0):
    """Marching-cubes mesh of the scene's zero level set, in world coordinates, outward
    faces, with per-vertex colours from the albedo of the nearest part."""
    import trimesh
    from skimage.measure import marching_cubes

    volume = sdf_grid(scene, resolution, radius).numpy()
    spacing = 2.0 * radius / (resolution - 1)
    # With values growing outwards, skimage's 'descent' winding gives outward-facing triangles
    # (positive volume); the check below keeps it so if that convention ever changes.
    verts, faces, _, _ = marching_cubes(volume, level=0.0, spacing=(spacing,) * 3, gradient_direction="descent")
    verts = verts - radius
    albedo = torch.cat([scene.sdf(chunk)[1] for chunk in torch.from_numpy(verts.astype(np.float32)).split(CHUNK)])
    colors = np.concatenate([(albedo.numpy() * 255.0).round().astype(np.uint8),
                             np.full((len(verts), 1), 255, np.uint8)], axis=1)
    mesh = trimesh.Trimesh(vertices=verts, faces=faces, vertex_colors=colors, process=False)
    if mesh.volume < 0:  # guard against an orientation convention change in skimage
        mesh.invert()
    return mesh
