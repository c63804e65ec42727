"""The claims the shipped teacher's model card makes are ones the code reproduces.

- The shipped teacher still draws what it is asked: DDIM samples of a handful of world prompts are
  named correctly by the world classifier (trained on real renders, so an independent judge), and
  the prompt each sample was drawn for explains it far better than another prompt does.
- MODEL_CARD.md is exactly what `write_model_card` makes of the shipped config.json + eval.json
  (a hand edit fails), eval.json evaluated these very weights (sha256 of the file), and `sds3d
  teacher eval` writes eval.json and the card quoting its command.
- `sds3d teacher export` refuses an occupied folder and writes one that `load_teacher` loads and
  `sds3d generate --teacher DIR` runs with.
"""

import hashlib
import json
import os
import shutil

import pytest
import torch
import yaml

from sds3d.cli import main
from sds3d.diffusion.solvers import ddim_sample
from sds3d.eval.classifier import prompt_accuracy
from sds3d.teachers import load_teacher
from sds3d.teachers.embedded import ASSET_DIR, EMBEDDED_DDIM, EmbeddedTeacher
from sds3d.teachers.unet import NetConfig
from sds3d.training.teacher import TeacherTrainer, export_teacher, write_model_card
from sds3d.world.dataset import RenderSpec, world_renders
from sds3d.world.prompts import resolve_prompt, world_txt_prompts
from sds3d.world.scenes import Scene

from test_embedded_teacher import HashText, tiny_config

SHIPPED = (ASSET_DIR / "model.safetensors").exists() and (ASSET_DIR / "eval.json").exists()
needs_shipped = pytest.mark.skipif(not SHIPPED, reason="no shipped teacher weights / eval.json")

# Eight prompts of prompts/world.txt: seven categories, eight colours, the last two held-out
# (colour, primitive) pairs the teacher never saw in training. (Not "a snowman": the classifier
# calls its white gray about half the time, also on the DDIM-50 samples of the full evaluation.)
FAST_PROMPTS = ["a red cube", "a blue sphere", "an orange cylinder", "a yellow cone", "a red house", "a purple mushroom",
                "a green cube", "a black capsule"]


@needs_shipped
def test_shipped_teacher_draws_what_it_is_asked():
    """8 prompts x 2 samples, DDIM-10 with the card's sampler settings (trailing timesteps, clamped
    x0, guidance 3, bf16 autocast; the card's full evaluation uses 50 steps and scores category
    100%). Two independent judges: the world classifier (trained on real renders) names the
    prompt's category and colour, and every sample lies near a real render of its scene (per-pixel
    RMSE to the nearest of 32 fresh views). Measured at 10 steps: 16/16 category and colour,
    nearest-view RMSE median 0.072. A linear schedule in place of the cosine one gives category
    0.56 and RMSE 0.23; treating the v-prediction output as eps gives RMSE 0.107."""
    assert set(FAST_PROMPTS) <= set(world_txt_prompts())
    from sds3d.precision import resolve_precision

    teacher = EmbeddedTeacher.load(autocast_bf16=resolve_precision("auto", "cpu", warn=False) == "bf16")
    prompts = [p for p in FAST_PROMPTS for _ in range(2)]
    images = ddim_sample(teacher, teacher.encode_prompt(prompts), 10, 3.0,
                         torch.Generator().manual_seed(0), **EMBEDDED_DDIM).images
    assert images.shape == (16, 3, 32, 32)
    right = prompt_accuracy(images, prompts)
    assert right["category"] >= 0.8 and right["both"] >= 0.8, right
    # Conditioning, not luck: scored against the next prompt's scene instead, the same images fail.
    wrong = prompt_accuracy(images, prompts[2:] + prompts[:2])
    assert wrong["category"] <= 0.25 and wrong["both"] <= 0.25, wrong

    scenes = [resolve_prompt(p) for p in FAST_PROMPTS]
    real = world_renders(RenderSpec(resolution=32, views_per_scene=32, seed=4), scenes=scenes)
    views = real.float_images().reshape(len(scenes), 32, 3, 32, 32)  # renders come scene by scene
    assert all(real.scene(32 * k) == scene and real.scene(32 * k + 31) == scene for k, scene in enumerate(scenes))
    rmse = (views.repeat_interleave(2, dim=0) - images[:, None]).pow(2).mean(dim=(2, 3, 4)).sqrt().min(dim=1).values
    assert rmse.median() <= 0.09, rmse


@needs_shipped
def test_shipped_model_card_is_generated_from_config_and_eval(tmp_path):
    for name in ("config.json", "eval.json"):
        shutil.copy(ASSET_DIR / name, tmp_path / name)
    shutil.copy(ASSET_DIR / "model.safetensors", tmp_path / "model.safetensors")
    card = write_model_card(tmp_path).read_text()
    shipped = (ASSET_DIR / "MODEL_CARD.md").read_text()
    assert shipped == card, "sds3d/assets/teacher/MODEL_CARD.md was edited by hand: regenerate it with write_model_card"

    config = json.loads((ASSET_DIR / "config.json").read_text())
    record = json.loads((ASSET_DIR / "eval.json").read_text())
    # eval.json measured these weights: the checksum of the file itself, not of a copy in config.json.
    assert record["weights_sha256"] == hashlib.sha256((ASSET_DIR / "model.safetensors").read_bytes()).hexdigest()
    assert record["weights_sha256"] == config["weights_sha256"]
    # The card quotes the command and the figures of eval.json, which says how they were made.
    assert record["command"].split("sds3d ", 1)[1].startswith("teacher eval")
    assert f"`{record['command']}`" in shipped
    assert record["sampler"]["steps"] == 50 and record["samples"] == record["prompts"] * record["samples_per_prompt"]
    assert record["prompts"] == len(world_txt_prompts()) == record["metrics"]["n"] // record["samples_per_prompt"]
    for key in ("category", "color"):
        assert f"**{100 * record['metrics'][key]:.1f}%**" in shipped
    assert f"**{record['metrics']['fd_world_samples_vs_real']:.2f}**" in shipped
    assert f"{config['training']['steps']} steps, {config['training']['train_minutes']} min" in shipped
    assert "not evaluated" not in shipped


@needs_shipped
def test_teacher_eval_refuses_the_shipped_folder_without_consent(capsys):
    before = (ASSET_DIR / "eval.json").read_bytes()
    assert main(["teacher", "eval"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--out" in err and "--write-into-teacher" in err and "\n" not in err
    assert (ASSET_DIR / "eval.json").read_bytes() == before


TINY_32 = NetConfig(resolution=32, channels=(16, 32), attention_levels=(1,), emb_dim=32, head_dim=16)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 32 px teacher trained for 6 steps on 3 scenes (the resolution generate and eval expect)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny")
    renders = world_renders(RenderSpec(resolution=32, views_per_scene=4, seed=0),
                            scenes=[Scene("cube", "red"), Scene("sphere", "blue"), Scene("snowman", "white")],
                            cache_dir=root / "cache")
    trainer = TeacherTrainer(root / "run", tiny_config(network=TINY_32), lambda *a: None, renders, HashText())
    trainer.train(max_steps=6)
    return root / "run", renders, trainer


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    run, renders, _ = tiny_run
    return export_teacher(run, tmp_path_factory.mktemp("export") / "teacher", log=lambda *a: None,
                          renders=renders, text_encoder=HashText())


def test_export_refuses_an_occupied_folder(tiny_run, tmp_path, capsys):
    run, _, _ = tiny_run
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    assert main(["teacher", "export", "--run", str(run), "--dest", str(dest)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(dest) in err and "already holds files" in err
    assert [p.name for p in dest.iterdir()] == ["notes.txt"] and (dest / "notes.txt").read_text() == "mine"


def test_exported_teacher_loads_and_generates(tiny_run, exported, tmp_path):
    _, _, trainer = tiny_run
    teacher = load_teacher(str(exported))
    assert isinstance(teacher, EmbeddedTeacher) and teacher.resolution == 32
    # The folder holds the run's EMA network: same prediction as the trainer's own, to fp16 precision.
    reference = trainer.teacher(use_ema=True)
    cond = reference.encode_prompt(["a red cube", "a snowman, front view"])
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([200, 800])
    torch.testing.assert_close(teacher.predict(x, t, cond, 3.0), reference.predict(x, t, cond, 3.0), atol=2e-2, rtol=0)
    # Its prompt table answers world prompts without MiniLM, with the run's own text embedding.
    torch.testing.assert_close(teacher.encode_prompt(["a red cube"]).cond, HashText().embed(["a red cube"]))

    config = json.loads((exported / "config.json").read_text())
    assert config["training"]["steps"] == 6
    card = (exported / "MODEL_CARD.md").read_text()
    assert card == write_model_card(exported).read_text()
    assert f"not evaluated yet: run `sds3d teacher eval --teacher {exported} --write-into-teacher`" in card
    assert "6 steps" in card

    out = tmp_path / "gen"
    assert main(["generate", "a red cube", "--teacher", str(exported), "--preset", "smoke", "--out", str(out),
                 "--no-eval", "--quiet"]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["teacher"] == str(exported) and config["steps"] == 20
    assert (out / "mesh.glb").stat().st_size > 0 and (out / "turntable.mp4").stat().st_size > 0


def test_teacher_eval_writes_eval_json_and_card_into_a_user_folder(exported, tmp_path, capfd):
    folder = tmp_path / "teacher"
    shutil.copytree(exported, folder)
    args = ["teacher", "eval", "--teacher", str(folder), "--samples-per-prompt", "1", "--steps", "2", "--seed", "3"]
    assert main(args) == 0
    printed = capfd.readouterr().out
    assert "sampled 117/117" in printed and "FD_world" in printed
    record = json.loads((folder / "eval.json").read_text())
    assert record["command"].endswith("sds3d " + " ".join(args[:4]) + " --samples-per-prompt 1 --steps 2 --guidance 3 --seed 3")
    assert record["seed"] == 3 and record["samples"] == 117 and record["sampler"]["steps"] == 2
    assert record["weights_sha256"] == json.loads((folder / "config.json").read_text())["weights_sha256"]
    assert record["machine"]["threads"] == torch.get_num_threads() and record["machine"]["torch"] == torch.__version__
    card = (folder / "MODEL_CARD.md").read_text()
    assert f"`{record['command']}`" in card and "not evaluated" not in card
    assert f"category **{100 * record['metrics']['category']:.1f}%**" in card
    assert not (folder / "eval_samples.png").exists()  # a sample grid goes only to a separate --out
    # Weights replaced after the evaluation: the card no longer quotes the stale figures.
    config = json.loads((folder / "config.json").read_text())
    config["weights_sha256"] = "0" * 64
    (folder / "config.json").write_text(json.dumps(config))
    assert "not evaluated yet" in write_model_card(folder).read_text()


def test_teacher_eval_refuses_to_write_a_card_into_another_teacher(exported, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(exported, other)
    before = (other / "MODEL_CARD.md").read_text()
    assert main(["teacher", "eval", "--teacher", str(exported), "--out", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out") and "another teacher" in err
    assert (other / "MODEL_CARD.md").read_text() == before and not (other / "eval.json").exists()
    with pytest.raises(SystemExit):  # argparse: --out and --write-into-teacher exclude each other
        main(["teacher", "eval", "--out", str(tmp_path / "x"), "--write-into-teacher"])
    assert main(["teacher", "eval", "--teacher", str(exported), "--steps", "0"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err


def test_teacher_eval_progress_reaches_a_pipe_while_it_runs(exported, tmp_path):
    """Progress lines are flushed: with stdout a pipe (block-buffered), the first one arrives while
    the evaluation is still running, not at exit."""
    import subprocess
    import sys

    folder = tmp_path / "teacher"
    shutil.copytree(exported, folder)
    proc = subprocess.Popen([sys.executable, "-m", "sds3d", "teacher", "eval", "--teacher", str(folder),
                             "--samples-per-prompt", "2", "--steps", "4", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})
    try:
        first = proc.stdout.readline()
        running = proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    assert first.startswith("teacher eval: 117 prompts x 2 samples = 234 images, DDIM-4"), first
    assert running, "the first progress line came only when the process ended"
    assert not (folder / "eval.json").exists()


@needs_shipped
def test_export_over_a_teacher_drops_the_eval_of_the_old_weights(tiny_run, exported, tmp_path):
    """--into-package replaces the shipped teacher in place: an eval.json of the replaced weights
    must not survive to be quoted by the new card; one of the same weights stays."""
    run, renders, _ = tiny_run
    folder = tmp_path / "teacher"
    shutil.copytree(exported, folder)
    sha = json.loads((folder / "config.json").read_text())["weights_sha256"]
    record = json.loads((ASSET_DIR / "eval.json").read_text())  # a complete eval.json, of other weights
    (folder / "eval.json").write_text(json.dumps(record))
    export_teacher(run, folder, allow_existing=True, log=lambda *a: None, renders=renders, text_encoder=HashText())
    assert not (folder / "eval.json").exists() and "not evaluated yet" in (folder / "MODEL_CARD.md").read_text()
    (folder / "eval.json").write_text(json.dumps({**record, "weights_sha256": sha}))
    export_teacher(run, folder, allow_existing=True, log=lambda *a: None, renders=renders, text_encoder=HashText())
    assert json.loads((folder / "eval.json").read_text())["weights_sha256"] == sha
    assert f"`{record['command']}`" in (folder / "MODEL_CARD.md").read_text()
