"""Mesh extraction, mesh files, turntables and images, checked against analytic shapes."""

import math
import os

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import trimesh

from sds3d.export import export_mesh, extract_mesh, save_image, write_turntable
from sds3d.io import atomic_path

R0 = 0.53  # chosen off the grid points, so no sample sits exactly on the level set
RES = 64
CELL = 2.0 / (RES - 1)
BLOB_CENTER = torch.tensor([0.8, 0.8, -0.8])
BLOB_RADIUS = 0.08
RED = np.array([255, 0, 0, 255])
BLUE = np.array([0, 0, 255, 255])


def sphere_density(points):
    """50 inside, 0 outside, 25 exactly at |x| = R0: the default threshold's level set is the sphere."""
    return 50.0 * torch.sigmoid(50.0 * (R0 - points.norm(dim=-1)))


def sphere_and_floater_density(points):
    """The sphere plus a small floater in a corner, the kind cleanup must remove."""
    floater = 50.0 * torch.sigmoid(50.0 * (BLOB_RADIUS - (points - BLOB_CENTER).norm(dim=-1)))
    return sphere_density(points) + floater


def red_blue(points):
    """+x half red, -x half blue."""
    right = (points[:, 0] > 0).float()
    return torch.stack([right, torch.zeros_like(right), 1.0 - right], -1)


@pytest.fixture(scope="module")
def sphere_mesh():
    return extract_mesh(sphere_and_floater_density, red_blue, resolution=RES)


def test_sphere_mesh_geometry(sphere_mesh):
    mesh = sphere_mesh
    assert mesh.is_watertight and mesh.is_winding_consistent
    radii = np.linalg.norm(mesh.vertices, axis=1)
    assert np.all(np.abs(radii - R0) < CELL)  # also: the floater at radius 1.39 is gone
    assert mesh.volume == pytest.approx(4.0 / 3.0 * math.pi * R0**3, rel=0.02)
    # Normals point outwards: along the position vector on a sphere centred at the origin.
    assert np.all(np.einsum("ij,ij->i", mesh.vertex_normals, mesh.vertices / radii[:, None]) > 0.9)
    assert len(mesh.split(only_watertight=False)) == 1


def test_sphere_mesh_colors(sphere_mesh):
    colors = np.asarray(sphere_mesh.visual.vertex_colors)
    assert colors.dtype == np.uint8 and colors.shape == (len(sphere_mesh.vertices), 4)
    x = sphere_mesh.vertices[:, 0]
    assert (x > 0).sum() > 100 and (x < 0).sum() > 100
    assert np.all(colors[x > 0] == RED)
    assert np.all(colors[x < 0] == BLUE)


def test_floater_is_there_without_cleanup():
    mesh = extract_mesh(sphere_and_floater_density, None, resolution=RES, min_component_fraction=0.0)
    parts = sorted(mesh.split(only_watertight=False), key=lambda m: len(m.faces))
    assert len(parts) == 2
    assert np.linalg.norm(parts[0].centroid - BLOB_CENTER.numpy()) < CELL
    assert parts[0].volume == pytest.approx(4.0 / 3.0 * math.pi * BLOB_RADIUS**3, rel=0.25)


def test_auto_threshold_finds_the_sphere():
    # A field 10x weaker never reaches density 25; "auto" still finds the sphere (the level where it
    # changes from empty to filled), within a couple of cells of R0.
    weak = lambda p: 0.1 * sphere_density(p)
    with pytest.raises(ValueError):
        extract_mesh(weak, None, resolution=RES)
    mesh = extract_mesh(weak, None, resolution=RES, threshold="auto")
    assert mesh.is_watertight
    assert abs(np.linalg.norm(mesh.vertices, axis=1).mean() - R0) < 2 * CELL


def test_geometry_touching_the_box_is_capped():
    # A cylinder along z longer than the box: marching cubes alone would leave it open at z = +-1.
    cylinder = lambda p: 50.0 * torch.sigmoid(50.0 * (0.4 - p[:, :2].norm(dim=-1)))
    mesh = extract_mesh(cylinder, None, resolution=RES)
    assert mesh.is_watertight
    assert np.allclose(mesh.bounds[:, 2], [-1.0, 1.0])
    assert mesh.volume == pytest.approx(math.pi * 0.4**2 * 2.0, rel=0.03)


def test_empty_field_error():
    with pytest.raises(ValueError, match=r"no surface at density threshold 25: the field is empty"):
        extract_mesh(lambda p: torch.zeros(p.shape[0]), None, resolution=16)


def test_export_round_trip(sphere_mesh, tmp_path):
    paths = export_mesh(sphere_mesh, tmp_path / "out", stem="sphere")
    assert set(paths) == {"glb", "obj", "ply"}
    # Nothing else in the folder: the temporary files were all renamed or removed.
    assert sorted(os.listdir(tmp_path / "out")) == ["sphere.glb", "sphere.obj", "sphere.ply"]
    for fmt, path in paths.items():
        loaded = trimesh.load(path, force="mesh")
        assert len(loaded.vertices) == len(sphere_mesh.vertices), fmt
        assert len(loaded.faces) == len(sphere_mesh.faces), fmt
        vertices = np.asarray(loaded.vertices)
        if fmt == "glb":  # stored y up, front along +z: (x, y, z) -> (y, z, x)
            vertices = vertices[:, [2, 0, 1]]
        np.testing.assert_allclose(np.sort(vertices, 0), np.sort(sphere_mesh.vertices, 0), atol=1e-5)
        assert loaded.visual.kind == "vertex", fmt
        colors = np.asarray(loaded.visual.vertex_colors)
        x = vertices[:, 0]
        assert np.all(colors[x > 0] == RED), fmt
        assert np.all(colors[x < 0] == BLUE), fmt


def test_glb_is_y_up(sphere_mesh, tmp_path):
    # Shift the sphere up (+z) and forward (+x): in the GLB that is +y and +z.
    mesh = sphere_mesh.copy()
    mesh.apply_translation([0.3, 0.0, 0.2])
    path = export_mesh(mesh, tmp_path, formats=("glb",))["glb"]
    center = trimesh.load(path, force="mesh").bounds.mean(0)
    np.testing.assert_allclose(center, [0.0, 0.2, 0.3], atol=CELL)


def test_unknown_format(sphere_mesh, tmp_path):
    with pytest.raises(ValueError, match=r"unknown mesh format.*'stl'.*allowed: glb, obj, ply"):
        export_mesh(sphere_mesh, tmp_path, formats=("glb", "stl"))
    assert os.listdir(tmp_path) == []


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer crashed")
    assert os.listdir(tmp_path) == ["file.bin"] and target.read_bytes() == b"old"


def azimuth_color(azimuth_deg):
    """An RGB color that turns once around a circle as the azimuth goes around."""
    a = math.radians(azimuth_deg)
    return torch.tensor([0.5 + 0.4 * math.cos(a), 0.5 + 0.4 * math.sin(a), 0.2])


def test_turntable(tmp_path):
    seen = []

    def render_fn(camera):
        assert camera.batch_size == 1 and camera.height == camera.width == 32
        azimuth = float(camera.azimuth_deg[0])
        seen.append(azimuth)
        rgb = azimuth_color(azimuth)[None, :, None, None].expand(1, 3, 32, 32)
        return {"rgb": rgb, "opacity": torch.ones(1, 1, 32, 32)}

    path = write_turntable(render_fn, tmp_path / "turn.mp4", n_frames=8, resolution=32, fps=8)
    assert os.listdir(tmp_path) == ["turn.mp4"]
    np.testing.assert_allclose(seen, np.arange(8) * 45.0)
    frames = imageio.mimread(path, format="FFMPEG")
    assert len(frames) == 8 and frames[0].shape == (32, 32, 3)
    expected = torch.stack([azimuth_color(45.0 * i) for i in range(8)]).numpy() * 255.0
    means = np.stack([f.reshape(-1, 3).mean(0) for f in frames])
    # Every frame is nearest to its own azimuth's color (H.264 shifts colors a little, not 90 levels).
    distances = np.linalg.norm(means[:, None] - expected[None], axis=-1)
    assert list(distances.argmin(1)) == list(range(8))
    assert distances.min(1).max() < 20.0


def test_save_image_grid(tmp_path):
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    batch = colors[:, :, None, None].expand(3, 3, 8, 10)
    path = save_image(tmp_path / "grid.png", batch)
    image = imageio.imread(path)
    assert image.shape == (16, 20, 3)  # 2 x 2 cells, the last one empty
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0)]):
        cell = image[r * 8 : (r + 1) * 8, c * 10 : (c + 1) * 10]
        assert np.all(cell == (colors[k].numpy() * 255).astype(np.uint8))
    assert np.all(image[8:, 10:] == 0)
    single = imageio.imread(save_image(tmp_path / "one.png", torch.full((3, 5, 7), 0.5)))
    assert single.shape == (5, 7, 3) and np.all(single == 128)
    assert sorted(os.listdir(tmp_path)) == ["grid.png", "one.png"]
