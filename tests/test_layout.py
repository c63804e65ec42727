"""Layout-guided two-object runs (pipelines/layout.py, NeRFField regions).

References: the world's own sphere-traced renderer (a placed object seen from the moved cameras is
the object alone seen from the original ones), torch autograd (the blob's gradient), the world's
layout (boxes), and for the slow end-to-end run the world's ground truth of each object."""

import pytest
import torch

from sds3d.config import make_config
from sds3d.geometry.cameras import concat_cameras, orbit_cameras, sample_cameras
from sds3d.nerf.field import NeRFField
from sds3d.pipelines.layout import layout_regions, object_cameras, region_of_image, region_tensors
from sds3d.pipelines.text_to_3d import TextTo3D, check_run, composition_layout
from sds3d.world.compositions import Composition
from sds3d.world.render import render_scene
from sds3d.world.scenes import Scene

RED_ON_BLUE = Composition(Scene("cube", "red"), "on top of", Scene("sphere", "blue"))
CONE_BESIDE_SNOWMAN = Composition(Scene("cone", "orange"), "next to", Scene("snowman", "white"))


@pytest.mark.parametrize("composition", [RED_ON_BLUE, CONE_BESIDE_SNOWMAN])
def test_object_cameras_see_the_placed_object_as_the_object_alone(composition):
    cameras = sample_cameras(3, 40, generator=torch.Generator().manual_seed(0))
    for placed, region in zip(composition.objects, layout_regions(composition)):
        alone = render_scene(placed.scene, cameras)
        moved = render_scene(placed, object_cameras(cameras, region))
        assert alone["mask"].mean() > 0.05  # the object is in view
        mismatch = (alone["mask"] != moved["mask"]).float().mean()
        assert mismatch < 0.01, (placed.caption, float(mismatch))
        assert (alone["rgb"] - moved["rgb"]).abs().mean() < 0.01
    # and the original cameras do not: the placed object is smaller and off centre
    assert (render_scene(placed, cameras)["mask"] != alone["mask"]).float().mean() > 0.05


def test_regions_hold_the_world_layout():
    regions = layout_regions(RED_ON_BLUE)
    assert [r.caption for r in regions] == ["a red cube", "a blue sphere"]
    for placed, region in zip(RED_ON_BLUE.objects, regions):
        lo, hi = placed.bounds()
        assert torch.all(torch.tensor(region.lo) < lo) and torch.all(torch.tensor(region.hi) > hi)
        assert region.centre == tuple(placed.offset) and region.scale == placed.factor
    # on top of: the cube's region above the sphere's
    assert regions[0].centre[2] > regions[1].centre[2]


def field_with_regions():
    regions = layout_regions(RED_ON_BLUE)
    return NeRFField(n_levels=4, log2_hashmap_size=12, max_resolution=64, regions=region_tensors(regions)), regions


def test_density_lives_in_the_regions_and_only_region_keeps_one():
    field, regions = field_with_regions()
    centres = torch.tensor([r.centre for r in regions])
    outside = torch.tensor([[0.9, 0.9, 0.9], [-0.9, 0.0, 0.0]])  # inside the scene box, outside both regions
    with torch.no_grad():
        assert torch.all(field.density(centres) > 0)
        assert torch.all(field.density(outside) == 0)
        with field.only_region(0):
            d = field.density(centres)
        assert d[0] > 0 and d[1] == 0
        assert torch.equal(field.density(centres), field.density(centres))  # the block restored the union
    with pytest.raises(ValueError, match="region 2 does not exist"):
        with field.only_region(2):
            pass


def test_each_region_starts_from_the_single_object_blob_scaled_into_it():
    field, regions = field_with_regions()
    direction = torch.nn.functional.normalize(torch.tensor([0.3, -0.5, 0.8]), dim=0)
    for region in regions:
        d = 0.1 * region.scale
        x = torch.tensor(region.centre) + d * direction
        expected = field.blob_density * (1 - d / (field.blob_radius * region.scale))
        assert float(field.blob(x[None])) == pytest.approx(expected, rel=1e-5)
    x = (torch.rand(64, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(field.blob(x).sum(), x)
    assert torch.allclose(field.blob_gradient(x.detach()), grad, atol=1e-5)
    plain = NeRFField(n_levels=4, log2_hashmap_size=12, max_resolution=64)
    (grad,) = torch.autograd.grad(plain.blob(x).sum(), x)
    assert torch.allclose(plain.blob_gradient(x.detach()), grad, atol=1e-5)


def test_images_take_the_objects_in_turn():
    seen = [region_of_image(step, i, 2, 2) for step in range(3) for i in range(2)]
    assert seen == [0, 1, 0, 1, 0, 1]
    seen = [region_of_image(step, 0, 1, 2) for step in range(4)]
    assert seen == [0, 1, 0, 1]
    cams = orbit_cameras(2, 16)
    both = concat_cameras([cams[0], cams[1]])
    assert torch.equal(both.c2w, cams.c2w) and torch.equal(both.azimuth_deg, cams.azimuth_deg)


def test_the_embedded_teacher_learns_two_objects_by_layout():
    prompt = "a crimson block on a navy ball"
    config = make_config("smoke", prompt=prompt)
    assert [r.caption for r in composition_layout(config)] == ["a red cube", "a blue sphere"]
    check_run(config)  # single objects are all the layout asks of the teacher
    assert composition_layout(make_config("smoke", prompt="a red cube")) is None
    assert composition_layout(make_config("smoke", prompt=prompt, teacher="oracle")) is None  # auto: whole
    assert composition_layout(make_config("smoke", prompt=prompt, teacher="oracle",
                                          explicit={"composition_guidance": "layout"})) is not None
    whole = make_config("smoke", prompt=prompt, explicit={"composition_guidance": "whole"})
    with pytest.raises(ValueError) as info:
        check_run(whole)
    message = str(info.value)
    assert "\n" not in message and "composition_guidance=layout" in message and "two-object" in message, message


def test_a_layout_run_shows_the_teacher_each_object_alone(tmp_path):
    """Every training image's prompt is one object's caption with its view, the objects in turn (what
    each render shows is `only_region`'s, tested above), and the layout is saved with the field."""
    from sds3d.teachers import load_teacher

    teacher = load_teacher("embedded")
    prompts = []
    encode = teacher.encode_prompt

    def recording(texts, negative=None):
        prompts.append(list(texts))
        return encode(texts, negative=negative)

    teacher.encode_prompt = recording
    config = make_config("smoke", prompt="a red cube on top of a blue sphere", steps=4, batch_size=2,
                         preview_every=4, checkpoint_every=4)
    run = TextTo3D(config, tmp_path / "run", teacher=teacher)
    run.train(show_progress=False)
    step_prompts = [p for p in prompts if len(p) == config.batch_size]
    assert len(step_prompts) == config.steps
    for batch in step_prompts:
        assert batch[0].startswith("a red cube, ") and batch[0].endswith(" view"), batch
        assert batch[1].startswith("a blue sphere, ") and batch[1].endswith(" view"), batch
    assert run.field.region_lo.shape == (2, 3)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert "region_lo" in state["field"]  # the layout is saved with the field: a resume keeps it


@pytest.mark.slow
def test_layout_run_gets_each_objects_colour_and_shape_right(tmp_path):
    """cpu-fast with the shipped (single-object) embedded teacher, scored against the world's truth."""
    from sds3d.pipelines.text_to_3d import generate

    config = make_config("cpu-fast", prompt="a red cube on top of a blue sphere")
    metrics = generate(config, out=tmp_path / "run", show_progress=False).metrics
    assert metrics["iou_mean"] >= 0.8, metrics["iou_mean"]
    for obj in metrics["objects"]:
        assert obj["color_right"] and obj["iou"] >= 0.7, obj
