"""The embedded teacher: tiny training runs (loss goes down, resumption is exact), saving and
loading (shape/range of samples, clear errors on damaged files), the world dataset and captions."""

import json

import pytest
import torch

from sds3d.world.dataset import CaptionTable, RenderSpec, scene_phrasings, world_renders
from sds3d.diffusion.protocol import Teacher
from sds3d.diffusion.solvers import ddim_sample, ddim_timesteps
from sds3d.teachers.embedded import ASSET_DIR, EmbeddedTeacher, TeacherWeightsError
from sds3d.teachers.unet import LeanUNet, NetConfig
from sds3d.diffusion.schedule import make_schedule
from sds3d.training.teacher import TeacherTrainer, TrainConfig
from sds3d.training.loop import learning_rate
from sds3d.diffusion.schedule import min_snr_weights
from sds3d.world.scenes import Scene, held_out_combinations
from tiny_teachers import TINY_NET, HashText




def tiny_config(**kw):
    base = dict(network=TINY_NET, batch_size=8, lr=2e-3, warmup_steps=2, precision="fp32", eval_every=0,
                log_every=5, checkpoint_every=1000)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def tiny_renders(tmp_path_factory):
    scenes = [Scene("cube", "red"), Scene("sphere", "blue"), Scene("sphere", "red")]  # red sphere is held out
    return world_renders(RenderSpec(resolution=16, views_per_scene=8, seed=0), scenes=scenes,
                         cache_dir=tmp_path_factory.mktemp("cache"))


def test_dataset_is_deterministic_and_splits_held_out_pairs(tiny_renders, tmp_path):
    again = world_renders(RenderSpec(resolution=16, views_per_scene=8, seed=0),
                          scenes=[Scene("cube", "red"), Scene("sphere", "blue"), Scene("sphere", "red")], use_cache=False)
    assert torch.equal(again.images, tiny_renders.images)
    assert tiny_renders.images.dtype == torch.uint8 and tiny_renders.images.shape == (24, 3, 16, 16)
    assert ("red", "sphere") in held_out_combinations()
    held = tiny_renders.indices("held_out")
    assert held.numel() == 8 and all(tiny_renders.scene(i) == Scene("sphere", "red") for i in held.tolist())
    assert tiny_renders.indices("train").numel() == 16
    # The cache returns the same renders from disk.
    cached = world_renders(RenderSpec(resolution=16, views_per_scene=8, seed=0), scenes=[Scene("cube", "red")], cache_dir=tmp_path)
    assert torch.equal(cached.images, world_renders(RenderSpec(resolution=16, views_per_scene=8, seed=0),
                                                    scenes=[Scene("cube", "red")], cache_dir=tmp_path).images)


def test_captions_cover_paraphrases_and_views():
    table = CaptionTable([Scene("cube", "red"), Scene("snowman", "white")])
    assert table.texts[0] == ""
    assert "a red cube, front view" in table.index and "a snowman, side view" in table.index
    assert "a red box" in scene_phrasings("cube", "red") and "a cube" not in scene_phrasings("cube", "red")
    assert "a cube" in scene_phrasings("cube", "gray")
    g = torch.Generator().manual_seed(0)
    drawn = [table.texts[table.sample(1, 0, 0, g)] for _ in range(200)]  # category 1 = cube, colour 0 = red
    assert all("red" in d and (d.endswith("front view") or "view" not in d) for d in drawn)
    assert 0.6 < sum(d.endswith("front view") for d in drawn) / 200 < 0.9
    assert drawn.count("a red cube, front view") + drawn.count("a red cube") > 50  # canonical captions are common


def test_schedule_helpers():
    sched = make_schedule("cosine")
    t = torch.tensor([0, 500, 999])
    w = min_snr_weights(sched, t, "v_prediction", 5.0)
    assert torch.all(w > 0) and torch.all(w <= 1)
    assert ddim_timesteps(1000, 4) == [999, 749, 499, 249]
    cfg = TrainConfig(warmup_steps=10, total_steps=110, lr=1.0, lr_min_ratio=0.1)
    assert learning_rate(cfg, 0) == pytest.approx(0.1) and learning_rate(cfg, 9) == pytest.approx(1.0)
    assert learning_rate(cfg, 110) == pytest.approx(0.1) and learning_rate(cfg, 500) == pytest.approx(0.1)


def test_tiny_training_lowers_the_loss(tiny_renders, tmp_path):
    torch.set_num_threads(1)
    trainer = TeacherTrainer(tmp_path / "run", tiny_config(), log=lambda *a: None, renders=tiny_renders,
                             text_encoder=HashText())
    before = trainer.validation_loss()
    trainer.train(max_steps=40)
    after = trainer.validation_loss()
    assert after < 0.8 * before, (before, after)
    rows = (tmp_path / "run" / "loss.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) == 1 + 40 // 5
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_resume_is_exact(tiny_renders, tmp_path):
    torch.set_num_threads(1)
    quiet = lambda *a: None
    straight = TeacherTrainer(tmp_path / "a", tiny_config(), quiet, tiny_renders, HashText())
    straight.train(max_steps=8)
    first = TeacherTrainer(tmp_path / "b", tiny_config(), quiet, tiny_renders, HashText())
    first.train(max_steps=5)
    resumed = TeacherTrainer(tmp_path / "b", None, quiet, tiny_renders, HashText())
    assert resumed.step == 5
    resumed.train(max_steps=8)
    for name in ("model", "ema"):
        a, b = straight.state()[name], resumed.state()[name]
        assert all(torch.equal(a[k], b[k]) for k in a), name
    opt_a, opt_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_a[k]["exp_avg_sq"], opt_b[k]["exp_avg_sq"]) for k in opt_a)
    # The loss log of the resumed run matches the uninterrupted one row for row (timings aside).
    strip = lambda path: [r.split(",")[:4] for r in path.read_text().splitlines()]
    assert strip(tmp_path / "a" / "loss.csv") == strip(tmp_path / "b" / "loss.csv")


def test_resume_refuses_changed_architecture(tiny_renders, tmp_path):
    TeacherTrainer(tmp_path / "run", tiny_config(), lambda *a: None, tiny_renders, HashText()).train(max_steps=1)
    with pytest.raises(RuntimeError, match="network"):
        TeacherTrainer(tmp_path / "run", tiny_config(network=NetConfig(resolution=16, channels=(8, 16), attention_levels=(),
                                                                       emb_dim=32)),
                       lambda *a: None, tiny_renders, HashText())


def _tiny_teacher(prediction_type="v_prediction", network=TINY_NET):
    torch.manual_seed(0)
    net = LeanUNet(network)
    for p in net.parameters():  # non-zero outputs, so sampling exercises the whole path
        p.data.add_(0.01 * torch.randn_like(p))
    return EmbeddedTeacher(net, make_schedule("cosine"), prediction_type, text_encoder=HashText(),
                           meta={"schedule": "cosine"})


def test_saved_teacher_loads_and_samples(tmp_path):
    teacher = _tiny_teacher()
    teacher.save(tmp_path / "t", prompt_table=["a red cube"])
    loaded = EmbeddedTeacher.load(tmp_path / "t", text_encoder=HashText())
    assert isinstance(loaded, Teacher)
    assert loaded.resolution == 16 and loaded.channels == 3 and loaded.prediction_type == "v_prediction"
    cond = loaded.encode_prompt(["a red cube", "a blue sphere, side view"])
    assert cond.cond.shape == (2, 384) and torch.equal(cond.uncond[0], cond.uncond[1])
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([100, 700])
    # fp16 storage: the loaded teacher predicts what the saved one did, to fp16 precision.
    assert torch.allclose(loaded.predict_eps(x, t, cond, 3.0), teacher.predict_eps(x, t, cond, 3.0), atol=2e-2)
    # CFG is uncond + s (cond - uncond), cond and uncond batched in one forward.
    e_c, e_u = loaded.predict_eps(x, t, cond, 1.0), loaded.predict_eps(x, t, loaded.encode_prompt(["", ""]), 1.0)
    assert torch.allclose(loaded.predict_eps(x, t, cond, 4.0), e_u + 4.0 * (e_c - e_u), atol=1e-4)
    images = ddim_sample(loaded, cond, steps=3, guidance=3.0, generator=torch.Generator().manual_seed(0),
                         clip_x0=True).images
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1 and torch.isfinite(images).all()
    assert loaded.encode(torch.rand(1, 3, 40, 40)).shape == (1, 3, 16, 16)
    # The prompt table is read back: no text encoder needed for its prompts.
    table_only = EmbeddedTeacher.load(tmp_path / "t")
    assert torch.allclose(table_only.encode_prompt(["a red cube"]).cond, HashText().embed(["a red cube"]))


CAMERA_NET = NetConfig(**{**TINY_NET.to_dict(), "camera_dim": 3})


def test_camera_conditioned_network_and_teacher(tmp_path):
    """A camera-conditioned LeanUNet depends on the camera direction, treats None as the zero
    'no camera' vector; the teacher feeds cond.extra["camera_dirs"] to both CFG branches and a
    saved one loads back with its camera embedding. A text-only network ignores cameras."""
    from sds3d.geometry.cameras import unit_directions
    from sds3d.diffusion.protocol import cfg_combine

    teacher = _tiny_teacher(network=CAMERA_NET)
    net = teacher.network
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([300, 600])
    text = HashText().embed(["a red cube", "a red cube"])
    front, back = unit_directions(torch.tensor([10.0, 10.0]), torch.tensor([0.0, 180.0])).chunk(2)
    cameras = torch.cat([front, front])
    assert (net(x, t, text, cameras) - net(x, t, text, torch.cat([back, back]))).abs().max() > 1e-3
    torch.testing.assert_close(net(x, t, text, None), net(x, t, text, torch.zeros(2, 3)))

    cond = teacher.encode_prompt(["a red cube", "a red cube"])
    cond.extra["camera_dirs"] = cameras
    uncond_text = HashText().embed(["", ""])
    by_hand = cfg_combine(net(x, t, uncond_text, cameras), net(x, t, text, cameras), 3.0)
    torch.testing.assert_close(teacher.predict(x, t, cond, 3.0), by_hand, atol=1e-5, rtol=1e-5)

    folder = teacher.save(tmp_path / "t")
    loaded = EmbeddedTeacher.load(folder, text_encoder=HashText())
    assert loaded.network.config.camera_dim == 3
    torch.testing.assert_close(loaded.predict(x, t, cond, 3.0), teacher.predict(x, t, cond, 3.0), atol=2e-2, rtol=0)

    text_only = _tiny_teacher().network
    torch.testing.assert_close(text_only(x, t, text, cameras), text_only(x, t, text))


def test_camera_conditioned_training_lowers_the_loss_and_resumes_exactly(tiny_renders, tmp_path):
    torch.set_num_threads(1)
    quiet = lambda *a: None
    config = tiny_config(network=CAMERA_NET)
    trainer = TeacherTrainer(tmp_path / "a", config, quiet, tiny_renders, HashText())
    x0, text, camera = trainer.batch(0, torch.Generator().manual_seed(0))
    norms = camera.norm(dim=-1)
    assert camera.shape == (8, 3) and torch.all(((norms - 1).abs() < 1e-5) | (norms == 0))
    before = trainer.validation_loss()
    trainer.train(max_steps=30)
    assert trainer.validation_loss() < 0.8 * before
    first = TeacherTrainer(tmp_path / "b", config, quiet, tiny_renders, HashText())
    first.train(max_steps=20)
    resumed = TeacherTrainer(tmp_path / "b", None, quiet, tiny_renders, HashText())
    resumed.train(max_steps=30)
    a, b = trainer.state()["model"], resumed.state()["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "config"])
def test_damaged_teacher_files_give_one_line_errors(tmp_path, damage):
    folder = _tiny_teacher().save(tmp_path / "t")
    weights = folder / "model.safetensors"
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "missing":
        weights.unlink()
    else:
        (folder / "config.json").write_text("{not json")
    with pytest.raises(TeacherWeightsError) as info:
        EmbeddedTeacher.load(folder, text_encoder=HashText())
    message = str(info.value)
    assert "\n" not in message
    assert ("config.json" if damage == "config" else "model.safetensors") in message
    assert "reinstall" in message


def test_truncated_weights_without_checksum_still_clear(tmp_path):
    folder = _tiny_teacher().save(tmp_path / "t")
    meta = json.loads((folder / "config.json").read_text())
    meta.pop("weights_sha256")
    (folder / "config.json").write_text(json.dumps(meta))
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(TeacherWeightsError, match="corrupted"):
        EmbeddedTeacher.load(folder, text_encoder=HashText())


@pytest.mark.skipif(not (ASSET_DIR / "model.safetensors").exists(), reason="no shipped teacher weights yet")
def test_shipped_teacher_samples():
    teacher = EmbeddedTeacher.load()
    assert (ASSET_DIR / "model.safetensors").stat().st_size <= 30 * 2 ** 20
    assert (ASSET_DIR / "MODEL_CARD.md").exists()
    cond = teacher.encode_prompt(["a red cube", "a snowman, front view"])
    images = ddim_sample(teacher, cond, steps=4, guidance=3.0, generator=torch.Generator().manual_seed(0),
                         clip_x0=True).images
    r = teacher.resolution
    assert images.shape == (2, 3, r, r) and images.min() >= 0 and images.max() <= 1


def test_fine_tuning_starts_from_an_exported_teacher(tiny_renders, tmp_path):
    """`init_from`: a new run's network and EMA are the exported teacher's weights (as its folder
    stores them), so it starts at that teacher's loss, not a random network's; a folder whose network
    differs from the run's is refused before anything is written."""
    from sds3d.settings import ConfigError
    from sds3d.teachers.embedded import load_network
    from sds3d.training.teacher import export_teacher

    torch.set_num_threads(1)
    quiet = lambda *a: None
    trained = TeacherTrainer(tmp_path / "a", tiny_config(ema_decay=0.5), quiet, tiny_renders, HashText())
    trained.train(max_steps=30)
    folder = export_teacher(tmp_path / "a", tmp_path / "exported", renders=tiny_renders, text_encoder=HashText())
    stored, _, _ = load_network(folder)
    fresh = TeacherTrainer(tmp_path / "fresh", tiny_config(), quiet, tiny_renders, HashText())
    tuned = TeacherTrainer(tmp_path / "tuned", tiny_config(init_from=str(folder)), quiet, tiny_renders, HashText())
    for net in (tuned.model, tuned.ema):
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), stored.state_dict().values()))
    assert tuned.validation_loss() < 0.8 * fresh.validation_loss()
    with pytest.raises(ConfigError, match="init_from.*network"):
        TeacherTrainer(tmp_path / "other", tiny_config(init_from=str(folder), network=NetConfig(
            resolution=16, channels=(8, 16), attention_levels=(), emb_dim=32)), quiet, tiny_renders, HashText())
    assert not (tmp_path / "other").exists()
