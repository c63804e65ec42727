"""Tests of the procedural world against independent references: analytic projections,
ray-sphere intersections, closed-form volumes, brute-force distances."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sds3d.geometry.views import VIEW_NAMES
from sds3d.geometry.cameras import Camera, camera_rays, spherical_cameras
from sds3d.geometry.shading import light_direction
from sds3d.world import (CATEGORIES, COLORS, COMPOSITES, PRIMITIVES, EmptyPromptError, Scene,
                         UnknownPromptError, all_scenes, caption, ground_truth_mesh, held_out_combinations,
                         make_scene, paraphrases, render_scene, resolve_prompt, split_view, strip_view, with_view,
                         world_prompts)
from sds3d.world import sdf as S

REPO = Path(__file__).resolve().parents[1]


def _pixel_offsets(camera: Camera):
    """Tangent-plane pixel-centre coordinates (u right, v up) of the pinhole model."""
    h, w = camera.height, camera.width
    f = 0.5 * h / math.tan(0.5 * float(camera.fovy[0]))
    j = torch.arange(w, dtype=torch.float64) + 0.5
    i = torch.arange(h, dtype=torch.float64) + 0.5
    ii, jj = torch.meshgrid(i, j, indexing="ij")
    return (jj - 0.5 * w) / f, -(ii - 0.5 * h) / f, f


# --- SDF primitives ------------------------------------------------------------------------

PRIMITIVE_CASES = {
    # name: (distance fn, closed-form volume)
    "sphere": (lambda p: S.sphere(p, 0.6), 4 / 3 * math.pi * 0.6 ** 3),
    "box": (lambda p: S.box(p, (0.5, 0.3, 0.2)), 8 * 0.5 * 0.3 * 0.2),
    "cylinder": (lambda p: S.cylinder(p, 0.4, 0.5), math.pi * 0.4 ** 2 * 1.0),
    "cone": (lambda p: S.cone(p, 0.5, 0.9), math.pi * 0.5 ** 2 * 0.9 / 3),
    "torus": (lambda p: S.torus(p, 0.45, 0.18), 2 * math.pi ** 2 * 0.45 * 0.18 ** 2),
    "pyramid": (lambda p: S.pyramid(p, 0.45, 0.8), 0.9 ** 2 * 0.8 / 3),
    "capsule": (lambda p: S.capsule(p, 0.3, 0.35), math.pi * 0.3 ** 2 * 0.7 + 4 / 3 * math.pi * 0.3 ** 3),
}


@pytest.mark.parametrize("name", PRIMITIVE_CASES)
def test_primitive_volume_matches_closed_form(name):
    # Signs right everywhere <=> the inside region has the shape's volume.
    fn, volume = PRIMITIVE_CASES[name]
    n = 100
    axis = (torch.arange(n) + 0.5) / n * 2 - 1
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    measured = (fn(grid) < 0).float().mean().item() * 8.0
    assert measured == pytest.approx(volume, rel=0.03)


@pytest.mark.parametrize("name", PRIMITIVE_CASES)
def test_primitive_is_1_lipschitz(name):
    fn, _ = PRIMITIVE_CASES[name]
    g = torch.Generator().manual_seed(1)
    a = torch.rand(20000, 3, generator=g) * 2 - 1
    b = a + 0.05 * torch.randn(20000, 3, generator=g)
    ratio = (fn(a) - fn(b)).abs() / (a - b).norm(dim=-1)
    assert ratio.max().item() <= 1.0 + 1e-3


def _cone_surface(r, h, n, g):
    u, th = torch.rand(n, generator=g), torch.rand(n, generator=g) * 2 * math.pi
    side = torch.stack([r * (1 - u) * torch.cos(th), r * (1 - u) * torch.sin(th), h * u], -1)
    rad, th2 = r * torch.rand(n, generator=g).sqrt(), torch.rand(n, generator=g) * 2 * math.pi
    base = torch.stack([rad * torch.cos(th2), rad * torch.sin(th2), torch.zeros(n)], -1)
    return torch.cat([side, base])


def _pyramid_surface(b, h, n, g):
    faces = []
    for k in range(4):
        u, v = torch.rand(n, generator=g), torch.rand(n, generator=g) * 2 - 1
        face = torch.stack([b * (1 - u), v * b * (1 - u), h * u], -1)
        c, s = math.cos(k * math.pi / 2), math.sin(k * math.pi / 2)
        faces.append(torch.stack([c * face[:, 0] - s * face[:, 1], s * face[:, 0] + c * face[:, 1], face[:, 2]], -1))
    base = torch.stack([(torch.rand(n, generator=g) * 2 - 1) * b, (torch.rand(n, generator=g) * 2 - 1) * b, torch.zeros(n)], -1)
    return torch.cat(faces + [base])


@pytest.mark.parametrize("name", ["cone", "pyramid"])
def test_primitive_distance_matches_brute_force(name):
    # |sdf| = distance to the nearest of many points sampled on the analytic surface.
    g = torch.Generator().manual_seed(2)
    fn, surface = {"cone": (PRIMITIVE_CASES["cone"][0], _cone_surface(0.5, 0.9, 60000, g)),
                   "pyramid": (PRIMITIVE_CASES["pyramid"][0], _pyramid_surface(0.45, 0.8, 40000, g))}[name]
    queries = torch.rand(400, 3, generator=g) * 2 - 1
    reference = torch.cdist(queries, surface).amin(1)
    assert (fn(queries).abs() - reference).abs().max().item() < 5e-3


def test_transforms_move_shapes_as_documented():
    p = torch.tensor([[0.0, 0.0, 0.5], [0.5, 0.0, 0.0]])
    # A cone along +z turned by rotate_y(90) points along +x: its apex at x = height.
    apex = torch.tensor([[0.9, 0.0, 0.0]])
    assert S.cone(S.rotate_y(apex, 90.0), 0.5, 0.9).abs().item() < 1e-5
    assert S.sphere(S.translate(p, (0.0, 0.0, 0.5)), 0.1)[0].item() == pytest.approx(-0.1)
    assert S.capsule(S.rotate_x(torch.tensor([[0.0, 0.7, 0.0]]), -90.0), 0.1, 0.6).item() == pytest.approx(0.0, abs=1e-6)
    assert S.box(S.rotate_z(torch.tensor([[0.0, 0.5, 0.0]]), 90.0), (0.5, 0.1, 0.1)).item() == pytest.approx(0.0, abs=1e-6)
    assert S.scale(lambda q: S.sphere(q, 0.5), torch.tensor([[2.0, 0.0, 0.0]]), 2.0).item() == pytest.approx(1.0)


# --- scenes --------------------------------------------------------------------------------

def test_scene_catalogue():
    assert PRIMITIVES == ("sphere", "cube", "cylinder", "cone", "torus", "pyramid", "capsule")
    assert len(COMPOSITES) >= 8
    assert set(COLORS) == {"red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "black", "brown", "gray"}
    for rgb in COLORS.values():
        assert all(0.0 <= c <= 1.0 for c in rgb)
    assert 0.02 < max(COLORS["black"]) and min(COLORS["white"]) < 0.98
    assert make_scene("snowman") == Scene("snowman", "white")
    assert make_scene("cube", "red").caption == "a red cube"
    assert make_scene("cube", "orange").caption == "an orange cube"
    assert len(all_scenes()) == len(CATEGORIES) * len(COLORS) == len(set(all_scenes()))
    with pytest.raises(ValueError):
        make_scene("giraffe")
    with pytest.raises(ValueError):
        make_scene("cube", "mauve")


def test_every_scene_fits_inside_the_box():
    # Sample the SDF on the faces of [-1, 1]^3: every face point is outside with a margin.
    t = torch.linspace(-1, 1, 41)
    a, b = torch.meshgrid(t, t, indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    faces = []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            cols = [a, b]
            cols.insert(axis, torch.full_like(a, sign))
            faces.append(torch.stack(cols, -1))
    faces = torch.cat(faces)
    for scene in all_scenes():
        assert scene.sdf(faces)[0].min().item() > 0.1, scene


def test_albedo_is_the_nearest_parts_color():
    snowman = make_scene("snowman", "blue")
    d, albedo = snowman.sdf(torch.tensor([[0.0, 0.0, -0.38], [0.39, 0.0, 0.43], [0.0, 0.0, 0.44]]))
    assert d[0] < 0
    assert torch.allclose(albedo[0], torch.tensor(COLORS["blue"]))  # body: main colour
    assert torch.allclose(albedo[1], torch.tensor(COLORS["orange"]))  # carrot nose: fixed
    assert torch.allclose(albedo[2], torch.tensor(COLORS["blue"]))


def test_held_out_combinations_are_a_fixed_tenth():
    held = held_out_combinations()
    assert held == held_out_combinations()
    total = len(COLORS) * len(PRIMITIVES)
    assert 0.07 * total <= len(held) <= 0.13 * total
    assert all(c in COLORS and p in PRIMITIVES for c, p in held)
    kept = {(c, p) for c in COLORS for p in PRIMITIVES} - set(held)
    assert {c for c, _ in kept} == set(COLORS) and {p for _, p in kept} == set(PRIMITIVES)


# --- rendering -----------------------------------------------------------------------------

def test_sphere_render_matches_analytic_projection():
    r, d = 0.6, 2.5
    cam = spherical_cameras(20.0, 30.0, d, 45.0, 64)
    out = render_scene(make_scene("sphere", "green"), cam)
    origins, dirs = (x.double() for x in camera_rays(cam))
    centre_dir = -origins / origins.norm(dim=-1, keepdim=True)
    angle = torch.acos((dirs * centre_dir).sum(-1).clamp(-1, 1))[0]
    alpha = math.asin(r / d)
    disk = angle < alpha
    pixel_angle = float(cam.fovy[0]) / cam.height
    boundary = (angle - alpha).abs() < 1.0 * pixel_angle
    mask = out["mask"][0, 0] > 0.5
    assert ((mask != disk) & ~boundary).sum() == 0
    assert (mask != disk).sum() <= 0.1 * boundary.sum()
    assert disk.sum() > 300

    # Depth and normals against the ray-sphere intersection.
    o, v = origins[0], dirs[0]
    b = (o * v).sum(-1)
    c = (o * o).sum(-1) - r * r
    t = -b - torch.sqrt((b * b - c).clamp_min(0))
    inner = disk & ~boundary
    depth = out["depth"][0, 0].double()
    assert (depth[inner] - t[inner]).abs().max() < 2e-3
    normal_ref = (o + t[..., None] * v) / r
    normal = out["normal"][0].permute(1, 2, 0).double()
    assert ((normal[inner] * normal_ref[inner]).sum(-1)).min() > 0.999
    # Misses: zeros and plain background.
    miss = ~mask
    assert (depth[miss] == 0).all() and (normal[miss] == 0).all()
    assert (out["rgb"][0].permute(1, 2, 0)[miss] == 1.0).all()


def test_sphere_centre_pixel_depth_is_d_minus_r():
    # Odd size: the centre pixel's ray goes through the sphere's centre.
    cam = spherical_cameras(35.0, -70.0, 2.2, 40.0, 33)
    out = render_scene(make_scene("sphere"), cam)
    assert out["depth"][0, 0, 16, 16].item() == pytest.approx(2.2 - 0.6, abs=1e-3)
    eye = cam.c2w[0, :3, 3]
    assert torch.allclose(out["normal"][0, :, 16, 16], eye / eye.norm(), atol=1e-3)


def test_rgb_is_lambertian_with_the_shared_light():
    cam = spherical_cameras(10.0, 0.0, 2.5, 45.0, 32)
    out = render_scene(make_scene("sphere", "red"), cam, ambient=0.3, background=(0.0, 0.0, 1.0))
    n = out["normal"][0].permute(1, 2, 0)
    cos = (n * light_direction(cam)[0]).sum(-1).clamp_min(0)
    expected = torch.tensor(COLORS["red"]) * (0.3 + 0.7 * cos)[..., None]
    mask = out["mask"][0, 0] > 0.5
    assert torch.allclose(out["rgb"][0].permute(1, 2, 0)[mask], expected[mask], atol=1e-5)
    assert torch.allclose(out["rgb"][0].permute(1, 2, 0)[~mask], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(out["albedo"][0].permute(1, 2, 0)[mask], torch.tensor(COLORS["red"]))


def test_render_outputs_shapes_and_ranges():
    cam = spherical_cameras([0.0, 30.0, 70.0], [0.0, 120.0, -60.0], 2.7, 45.0, 24)
    out = render_scene(make_scene("rocket"), cam)
    shapes = {"rgb": (3, 3, 24, 24), "albedo": (3, 3, 24, 24), "mask": (3, 1, 24, 24),
              "depth": (3, 1, 24, 24), "normal": (3, 3, 24, 24)}
    for key, shape in shapes.items():
        assert out[key].shape == shape and out[key].dtype == torch.float32, key
    for key in ("rgb", "albedo", "mask"):
        assert out[key].min() >= 0 and out[key].max() <= 1
    assert set(out["mask"].unique().tolist()) <= {0.0, 1.0}
    hit = out["mask"][:, 0] > 0
    assert torch.allclose(out["normal"].norm(dim=1)[hit], torch.ones(int(hit.sum())), atol=1e-4)
    # A camera given only by c2w (no angles) renders the same.
    bare = Camera(cam.c2w, cam.fovy, 24, 24)
    assert torch.allclose(render_scene(make_scene("rocket"), bare)["rgb"], out["rgb"], atol=1e-4)


def test_cube_silhouette_from_the_front_is_the_analytic_square():
    d, h = 2.5, 0.45
    cam = spherical_cameras(0.0, 0.0, d, 45.0, 64)
    out = render_scene(make_scene("cube", "blue"), cam)
    u, v, f = _pixel_offsets(cam)
    extent = torch.maximum(u.abs(), v.abs())
    half = h / (d - h)  # the front face (x = h) bounds the silhouette
    square = extent < half
    boundary = (extent - half).abs() < 1.0 / f
    mask = out["mask"][0, 0] > 0.5
    assert ((mask != square) & ~boundary).sum() == 0
    assert square.sum() > 400
    inner = square & ~boundary
    depth_ref = (d - h) * torch.sqrt(1 + u * u + v * v)
    assert (out["depth"][0, 0].double()[inner] - depth_ref[inner]).abs().max() < 2e-3
    assert torch.allclose(out["normal"][0, :, 32, 32], torch.tensor([1.0, 0.0, 0.0]), atol=1e-3)


def _color_pixels(image: torch.Tensor, name: str, tol: float = 1e-3) -> int:
    return int(((image - torch.tensor(COLORS[name])[:, None, None]).abs().amax(0) < tol).sum())


@pytest.mark.parametrize("category,accent", [("snowman", "orange"), ("house", "black")])
def test_front_accent_seen_from_front_only(category, accent):
    # The snowman's carrot nose and the house's door face +x.
    cam = spherical_cameras(5.0, [0.0, 180.0], 2.6, 45.0, 96)
    albedo = render_scene(make_scene(category), cam)["albedo"]
    assert _color_pixels(albedo[0], accent) >= 8
    assert _color_pixels(albedo[1], accent) == 0


def test_snowman_eyes_on_the_front():
    cam = spherical_cameras(5.0, [0.0, 180.0], 2.6, 45.0, 96)
    albedo = render_scene(make_scene("snowman", "green"), cam)["albedo"]
    assert _color_pixels(albedo[0], "black") >= 6 and _color_pixels(albedo[1], "black") == 0
    assert _color_pixels(albedo[1], "green") > 300  # the main colour paints the body


# --- meshes --------------------------------------------------------------------------------

def test_sphere_mesh_volume_and_watertight():
    mesh = ground_truth_mesh(make_scene("sphere", "yellow"), resolution=96)
    assert mesh.is_watertight
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * 0.6 ** 3, rel=0.01)
    assert ((mesh.face_normals * mesh.triangles_center).sum(1) > 0).all()  # faces point outwards
    radii = torch.from_numpy(mesh.vertices).norm(dim=-1)
    assert (radii - 0.6).abs().max() < 0.01  # world coordinates, centred
    expected = [round(c * 255) for c in COLORS["yellow"]]
    assert (mesh.visual.vertex_colors[:, :3] == expected).all()


def test_composite_mesh_is_watertight():
    mesh = ground_truth_mesh(make_scene("house"), resolution=64)
    assert mesh.is_watertight and mesh.volume > 0
    assert mesh.bounds[0].min() > -0.9 and mesh.bounds[1].max() < 0.9


# --- captions ------------------------------------------------------------------------------

def test_captions_and_paraphrases():
    assert caption("cube", "red") == "a red cube"
    assert caption("snowman", "blue") == "a blue snowman"
    para = paraphrases("sphere", "green")
    assert para[0] == "a green sphere" and para == paraphrases("sphere", "green")
    assert {"a ball that is green", "a green colored ball", "a sphere painted green"} <= set(para)
    assert "a snowman" in paraphrases("snowman", "white") and "a snowman" not in paraphrases("snowman", "red")


@pytest.mark.parametrize("view", VIEW_NAMES)
def test_view_suffix_round_trip(view):
    for prompt in ("a red cube", "a snowman", "an orange torus"):
        viewed = with_view(prompt, view)
        assert viewed == f"{prompt}, {view} view"
        assert strip_view(viewed) == prompt
        assert split_view(viewed) == (prompt, view)
        assert split_view(prompt) == (prompt, None)
        assert with_view(viewed, view) == viewed  # no double suffix
    assert with_view("a red cube", "overhead") == "a red cube, overhead view"
    assert split_view("A red cube, Top View ") == ("A red cube", "overhead")
    assert strip_view("a side table") == "a side table"  # only a trailing '<view> view' is a suffix


# --- prompts -------------------------------------------------------------------------------

def test_world_prompt_file_is_complete_and_exact():
    lines = [l.strip() for l in (REPO / "prompts" / "world.txt").read_text().splitlines()]
    prompts = [l for l in lines if l and not l.startswith("#")]
    assert {caption(p, c) for p in PRIMITIVES for c in COLORS} <= set(prompts)
    assert {f"a {c}" for c in COMPOSITES} <= set(prompts)
    assert set(prompts) <= set(world_prompts())


def test_exact_prompts_resolve_without_loading_the_embedding_model():
    code = (
        "import sys\n"
        "from sds3d.world import resolve_prompt, world_prompts, make_scene\n"
        "from sds3d.world.prompts import embedding_model_loaded\n"
        "for p in world_prompts():\n"
        "    resolve_prompt(p); resolve_prompt(p.upper() + ', side view')\n"
        "assert resolve_prompt('a ball that is green') == make_scene('sphere', 'green')\n"
        "assert resolve_prompt('a crimson box') == make_scene('cube', 'red')\n"
        "assert not embedding_model_loaded() and 'sentence_transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


@pytest.mark.parametrize("prompt,category,color", [
    ("a red cube", "cube", "red"),
    ("A Red Cube, front view.", "cube", "red"),
    ("an orange torus, overhead view", "torus", "orange"),
    ("a snowman", "snowman", "white"),
    ("a blue snowman, back view", "snowman", "blue"),
    ("a green ball", "sphere", "green"),
    ("an orb that is pink", "sphere", "pink"),
    ("a grey block", "cube", "gray"),
    ("a fir tree", "pine tree", "green"),
    ("a christmas tree", "pine tree", "green"),
    ("a purple donut", "torus", "purple"),
    ("a cube painted red", "cube", "red"),
    ("a crimson box", "cube", "red"),
    ("a navy blue pill", "capsule", "blue"),
    ("a DSLR photo of a blue lollipop", "lollipop", "blue"),
])
def test_exact_and_synonym_prompts(prompt, category, color):
    assert resolve_prompt(prompt) == Scene(category, color)


@pytest.mark.parametrize("prompt,category,color", [
    ("a big green ball", "sphere", "green"),
    ("red cube please", "cube", "red"),
    ("a frosty snowman", "snowman", "white"),
    ("a snowman with a carrot nose", "snowman", "white"),
    ("a toy rocket", "rocket", "white"),
    ("a small yellow house", "house", "yellow"),
    ("an evergreen", "pine tree", "green"),
    ("a gym dumbbell, side view", "dumbbell", "black"),
    ("a shiny blue lollipop", "lollipop", "blue"),
])
def test_paraphrases_resolve_through_minilm(prompt, category, color):
    from sds3d.world.prompts import _exact_table, embedding_model_loaded, normalize_prompt

    assert normalize_prompt(prompt) not in _exact_table()  # really not exact
    assert resolve_prompt(prompt) == Scene(category, color)
    assert embedding_model_loaded()


@pytest.mark.parametrize("prompt", ["a photograph of a giraffe", "asdf qwerty", "a sports car", "a cat sitting on a mat", "red"])
def test_unknown_prompts_raise_one_line_with_nearest_known(prompt):
    with pytest.raises(UnknownPromptError) as info:
        resolve_prompt(prompt)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"unknown prompt '{prompt}': the embedded world knows e.g. ")
    assert message.endswith("(nearest known prompts; see prompts/world.txt)")
    named = message.split("e.g. ")[1].split(" (nearest")[0]
    examples = [e.strip().strip("'") for e in named.split(",")]
    assert len(examples) == 3 and set(examples) <= set(world_prompts())
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t", ", front view"])
def test_empty_prompts_raise_one_line(prompt):
    with pytest.raises(EmptyPromptError) as info:
        resolve_prompt(prompt)
    assert "\n" not in str(info.value) and "prompt" in str(info.value)
    assert isinstance(info.value, ValueError)
