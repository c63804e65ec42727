"""benchmarks/quality.py (issue 17): the fixed list, the summary's arithmetic on a hand-made batch
folder (numbers worked out by hand below), and one tiny end-to-end run with the smoke preset."""

import importlib.util
import json
import re
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from sds3d.io import save_image
from sds3d.pipelines.batch import write_manifest
from sds3d.pipelines.prompt_file import read_prompt_file
from sds3d.world.captions import bare_caption
from sds3d.world.prompts import _exact_table, known_phrasings, normalize_prompt, resolve_prompt
from sds3d.world.scenes import CATEGORIES, COMPOSITES, DEFAULT_COLORS, PRIMITIVES, held_out_combinations, make_scene

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the list ------------------------------------------------------------------------------------

def test_single_is_every_category_once_in_a_real_colour(quality):
    scenes = [resolve_prompt(p) for p in quality.group_prompts("single")]
    assert [s.category for s in scenes] == list(CATEGORIES)
    for scene in scenes:
        if scene.category in COMPOSITES:
            assert scene.color == DEFAULT_COLORS[scene.category]
    primitive_colors = [s.color for s in scenes if s.category in PRIMITIVES]
    assert len(set(primitive_colors)) == len(PRIMITIVES) and "gray" not in primitive_colors
    held = set(held_out_combinations())
    assert not [s for s in scenes if (s.color, s.category) in held]  # held-out pairs measure something else


def test_paraphrases_are_held_out_and_resolve_to_single_scenes(quality):
    paraphrases = quality.group_prompts("paraphrase")
    assert len(paraphrases) == 8 == len(set(paraphrases))
    known = {text for text, _ in known_phrasings()}
    single = {resolve_prompt(p): p for p in quality.group_prompts("single")}
    for prompt in paraphrases:
        assert prompt not in known and normalize_prompt(prompt) not in _exact_table(), prompt
        scene = resolve_prompt(prompt)
        assert scene in single, (prompt, scene)
        assert quality.canonical_caption(prompt) == (single[scene], None)  # the canonical prompt is the single one


def test_fronted_is_every_composite_with_a_front_only_part(quality):
    # The world's composites with parts that only face the front (nose and eyes, door, cap spots, the
    # lollipop's swirl, window); the pine tree, table and dumbbell look the same from behind.
    expected = ["snowman", "house", "mushroom", "lollipop", "rocket"]
    assert quality.fronted_categories() == expected
    prompts = quality.group_prompts("fronted")
    assert prompts == [bare_caption(c) for c in expected]
    assert [resolve_prompt(p) for p in prompts] == [make_scene(c) for c in expected]


def test_multi_prompts_and_unsupported_ones_are_reported(quality):
    multi = quality.group_prompts("multi")
    assert len(multi) == 6 == len(set(multi))
    nouns = re.compile(r"\b(" + "|".join(CATEGORIES) + r")\b")
    for prompt in multi:
        assert len(nouns.findall(prompt)) == 2 and re.search(r"on top of|next to|in front of", prompt), prompt
    # the world builds them; the shipped embedded teacher makes them object by object (layout), the
    # oracle as a whole; learnt as a whole they need a teacher trained on them
    for entry in quality.benchmark_list(1, ("multi",), sets={"composition_guidance": "whole"}):
        assert entry["canonical"] is None and "two-object scene" in entry["unsupported"], entry
    for teacher in ("embedded", "oracle"):
        for entry in quality.benchmark_list(1, ("multi",), teacher=teacher):
            assert entry["canonical"] == resolve_prompt(entry["prompt"]).caption and entry["unsupported"] is None


def test_benchmark_list_and_prompt_files(quality, tmp_path):
    entries = quality.benchmark_list(2)
    sizes = {g: len(quality.group_prompts(g)) for g in quality.GROUPS}
    assert sizes == {"single": 15, "paraphrase": 8, "fronted": 5, "multi": 6}
    assert len(entries) == 2 * 34
    single = [(e["prompt"], e["seed"]) for e in entries if e["group"] == "single"]
    assert single == [(p, s) for s in (0, 1) for p in quality.group_prompts("single")]  # seed-major
    for group in quality.GROUPS:
        supported = [e for e in entries if e["group"] == group and not e["unsupported"]]
        if not supported:
            continue
        path = tmp_path / f"{group}.txt"
        path.write_text(quality.prompt_file_text(entries, group))
        assert [(line.prompt, line.overrides) for line in read_prompt_file(path)] == \
            [(e["prompt"], {"seed": e["seed"]}) for e in supported]


# --- the summary on a hand-made batch folder -------------------------------------------------------

RED, GREEN, BLUE = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)


def _sheet(path: Path):
    """A contact sheet (2 rows x 8 views of 128 px): NeRF front red, NeRF back green, truth front blue."""
    cells = torch.zeros(16, 3, 128, 128)
    cells[0] = torch.tensor(RED)[:, None, None]
    cells[4] = torch.tensor(GREEN)[:, None, None]
    cells[8] = torch.tensor(BLUE)[:, None, None]
    save_image(path, cells, ncols=8)


def _entry(group, prompt, seed, canonical=None, unsupported=None):
    return {"group": group, "prompt": prompt, "seed": seed, "canonical": canonical or prompt, "unsupported": unsupported}


def _fake_batch(root: Path, group: str, rows: list[tuple]) -> None:
    """rows: (prompt, seed, state, metrics or None, seconds, attempts)."""
    folder = root / group
    folder.mkdir(parents=True)
    records = []
    for line, (prompt, seed, state, metrics, seconds, attempts) in enumerate(rows, start=1):
        run_dir = f"{line:03d}-{prompt.replace(' ', '-')}-{seed}"
        (folder / run_dir).mkdir()
        if state == "done":
            _sheet(folder / run_dir / "contact_sheet.png")
        records.append({"line": line, "prompt": prompt, "overrides": {"seed": seed}, "run_dir": run_dir, "state": state,
                        "attempts": attempts, "seconds": seconds, "metrics": metrics,
                        "error": "boom" if state == "failed" else None})
    write_manifest(folder, records)
    (folder / "batch.json").write_text(json.dumps({"preset": "cpu-fast", "settings": {"teacher": "embedded"},
                                                   "workers": 1, "threads": 2}))


def _m(iou, color, train, chamfer=0.01, speckle=0.002, front=None, back=None):
    metrics = {"iou_mean": iou, "color_error_mean": color, "chamfer": chamfer, "speckle": speckle,
               "train_seconds": train, "prompt_scene": "x", "accent_strength": None}
    if front is not None:
        metrics["accent_strength"] = {"front": front, "back": back, "pixels": 90}
    return metrics


@pytest.fixture
def fake(tmp_path):
    root = tmp_path / "runs"
    _fake_batch(root, "single", [
        ("a red cube", 0, "done", _m(0.95, 0.04, 50, chamfer=0.01, speckle=0.002), 70, 1),
        ("a red cube", 1, "done", _m(0.91, 0.05, 70, chamfer=0.03, speckle=0.004), 90, 2),
        ("a blue sphere", 0, "done", _m(0.80, 0.03, 40, chamfer=0.05, speckle=None), 60, 1),
        ("a blue sphere", 1, "failed", None, 5, 1),
    ])
    _fake_batch(root, "paraphrase", [
        ("a small crimson cube", 0, "done", _m(0.93, 0.05, 50), 70, 1),
        ("a small crimson cube", 1, "done", _m(0.95, 0.06, 50), 70, 1),
        ("a shiny blue ball", 0, "done", _m(0.78, 0.045, 50), 70, 1),
    ])
    _fake_batch(root, "fronted", [
        ("a snowman", 0, "done", _m(0.9, 0.02, 60, front=0.5, back=0.0), 80, 1),    # a face, none behind: passes
        ("a snowman", 1, "done", _m(0.9, 0.02, 60, front=0.6, back=0.2), 80, 1),    # a second face behind
        ("a house", 0, "done", _m(0.9, 0.02, 60, front=0.1, back=0.0), 80, 1),      # no door
    ])
    entries = [_entry("single", "a red cube", 0), _entry("single", "a red cube", 1),
               _entry("single", "a blue sphere", 0), _entry("single", "a blue sphere", 1),
               _entry("paraphrase", "a small crimson cube", 0, "a red cube"),
               _entry("paraphrase", "a small crimson cube", 1, "a red cube"),
               _entry("paraphrase", "a shiny blue ball", 0, "a blue sphere"),
               _entry("fronted", "a snowman", 0, "a white snowman"), _entry("fronted", "a snowman", 1, "a white snowman"),
               _entry("fronted", "a house", 0, "a yellow house"),
               _entry("multi", "a red cube on top of a blue sphere", 0, unsupported="cannot place objects")]
    entries[-1]["canonical"] = None
    return root, entries


def test_summary_math_on_a_hand_made_batch(quality, fake):
    root, entries = fake
    runs = quality.collect_runs(entries, root)
    assert [r["state"] for r in runs] == ["done"] * 3 + ["failed"] + ["done"] * 6 + ["unsupported"]
    s = quality.summarize_runs(runs)
    single = s["groups"]["single"]
    assert (single["runs"], single["done"]) == (4, 3)
    assert single["means"]["iou"] == pytest.approx((0.95 + 0.91 + 0.80) / 3)
    assert single["means"]["color_error"] == pytest.approx(0.04)
    assert single["means"]["chamfer"] == pytest.approx(0.03)
    assert single["means"]["speckle"] == pytest.approx(0.003)  # the run without a flat region is left out
    assert single["means"]["train_seconds"] == pytest.approx(160 / 3)
    assert single["means"]["run_seconds"] == pytest.approx(220 / 3)

    para = s["groups"]["paraphrase"]
    pairs = {(p["prompt"], p["seed"]): (p["delta_iou"], p["delta_color_error"]) for p in para["pairs"]}
    assert pairs == {("a small crimson cube", 0): (pytest.approx(-0.02), pytest.approx(0.01)),
                     ("a small crimson cube", 1): (pytest.approx(0.04), pytest.approx(0.01)),
                     ("a shiny blue ball", 0): (pytest.approx(-0.02), pytest.approx(0.015))}
    assert para["max_abs_delta_iou"] == pytest.approx(0.04)
    assert para["max_abs_delta_color_error"] == pytest.approx(0.015)

    fronted = s["groups"]["fronted"]
    assert fronted["janus_rate"] == pytest.approx(2 / 3)
    assert (fronted["janus_failures"], fronted["no_face"], fronted["two_faced"]) == (2, 1, 1)
    assert fronted["means"]["accent_front"] == pytest.approx(0.4)

    multi = s["groups"]["multi"]
    assert (multi["runs"], multi["done"], multi["means"]["iou"]) == (0, 0, None)
    assert multi["unsupported"] == [{"prompt": "a red cube on top of a blue sphere", "error": "cannot place objects"}]

    targets = {t["key"]: (t["value"], t["met"]) for t in s["targets"]}
    assert targets["single_iou"] == (pytest.approx(0.886667, abs=1e-6), False)
    assert targets["single_color"] == (pytest.approx(0.04), True)
    assert targets["paraphrase_iou"] == (pytest.approx(0.04), False)
    assert targets["paraphrase_color"] == (pytest.approx(0.015), True)
    assert targets["fronted_janus"] == (pytest.approx(2 / 3), False)
    assert targets["multi_iou"] == (None, None)
    assert targets["red_cube_seconds"] == (70, False)
    assert targets["red_cube_iou"] == (pytest.approx(0.91), False)
    assert (s["runs_total"], s["runs_done"], s["partial"]) == (10, 9, True)


def test_results_files_from_a_hand_made_batch(quality, fake, tmp_path):
    root, entries = fake
    out = tmp_path / "results"
    text = quality.write_results(entries, root, out, "python benchmarks/quality.py --summarize-only", seeds=2)
    report = json.loads((out / "quality.json").read_text())
    assert report["summary"]["runs_done"] == 9 and report["settings"]["single"]["preset"] == "cpu-fast"
    assert (out / "quality.md").read_text() == text
    assert "partial: 9 of 10 runs done" in text
    assert "'a red cube on top of a blue sphere': not supported yet: cannot place objects" in text
    assert "| single | a red cube | 1 | a red cube | done | 0.910 | 0.050 | 0.0300 | 0.0040 | - | - | 70* | 90 |" in text

    # quality.png: per prompt [truth front, seed 0 front, seed 0 back, seed 1 front, seed 1 back], 2 prompts a row
    png = out / "quality.png"
    assert png.stat().st_size < 1_000_000
    image = imageio.imread(png)[..., :3].astype(float) / 255
    tile = quality.TILE
    assert image.shape == (3 * tile, 10 * tile, 3)  # 6 prompts, 2 a row

    def colour(index):
        row, col = divmod(index, 10)
        return image[row * tile + tile // 2, col * tile + tile // 2]

    expected = [BLUE, RED, GREEN, RED, GREEN,              # a red cube, both seeds done
                BLUE, RED, GREEN, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)]  # a blue sphere, seed 1 failed
    for index, rgb in enumerate(expected):
        np.testing.assert_allclose(colour(index), rgb, atol=1 / 255 + 1e-6, err_msg=str(index))


def test_baseline_comparison_pairs_runs_by_group_prompt_and_seed(quality, fake, tmp_path):
    """--baseline: means over the runs done in both, by hand. The baseline holds 'a red cube' seed 0
    (IoU 0.85, speckle 0.004), seed 1 (0.81, 0.008) and 'a blue sphere' seed 1, which failed here; so
    single pairs the two cube runs: IoU 0.83 -> 0.93, speckle 0.006 -> 0.003 (ratio 0.5)."""
    root, entries = fake
    base = tmp_path / "base"
    quality.write_results(entries, root, base, "python benchmarks/quality.py --summarize-only", seeds=2)
    report = json.loads((base / "quality.json").read_text())
    by_key = {(r["group"], r["prompt"], r["seed"]): r for r in report["runs"]}
    by_key["single", "a red cube", 0].update(iou=0.85, speckle=0.004)
    by_key["single", "a red cube", 1].update(iou=0.81, speckle=0.008)
    by_key["single", "a blue sphere", 0]["state"] = "failed"
    (base / "quality.json").write_text(json.dumps(report))

    baseline = quality.read_baseline(base / "quality.json")
    text = quality.write_results(entries, root, tmp_path / "after", "python benchmarks/quality.py --summarize-only",
                                 seeds=2, baselines=[baseline])
    single = json.loads((tmp_path / "after" / "quality.json").read_text())["baselines"][0]["groups"]["single"]
    assert single["runs"] == 2
    assert (single["iou"]["before"], single["iou"]["after"]) == (pytest.approx(0.83), pytest.approx(0.93))
    assert (single["speckle"]["before"], single["speckle"]["after"]) == (pytest.approx(0.006), pytest.approx(0.003))
    assert single["speckle"]["ratio"] == pytest.approx(0.5)
    assert "| single | 2 | 0.830 -> 0.930 (1.12) | 0.045 -> 0.045 (1.00) | 0.0060 -> 0.0030 (0.50) |" in text
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json is not a quality.json"):
        quality.read_baseline(tmp_path / "bad.json")


# --- end to end ---------------------------------------------------------------------------------

def test_end_to_end_smoke_run_resume_and_mistakes(quality, tmp_path, capsys):
    out, runs = tmp_path / "results", tmp_path / "runs"
    common = ["--only", "single", "--limit", "1", "--seeds", "1", "--out", str(out), "--batch-dir", str(runs)]
    assert quality.main([*common, "--preset", "smoke", "--set", "steps=4"]) == 0
    report = json.loads((out / "quality.json").read_text())
    done = [r for r in report["runs"] if r["state"] == "done"]
    assert len(done) == 1 and done[0]["prompt"] == quality.group_prompts("single")[0]
    metrics = json.loads((runs / done[0]["run_dir"] / "metrics.json").read_text())
    assert isinstance(done[0]["iou"], float) and 0.0 <= done[0]["iou"] <= 1.0
    assert done[0]["iou"] == metrics["iou_mean"] and done[0]["train_seconds"] == metrics["train_seconds"]
    assert report["settings"]["single"]["settings"] == {"teacher": "embedded", "steps": 4}
    assert report["summary"]["partial"] and report["summary"]["runs_done"] == 1
    assert "partial: 1 of " in (out / "quality.md").read_text()
    capsys.readouterr()

    # --resume: the done line is skipped, nothing runs again
    assert quality.main([*common, "--resume"]) == 0
    assert "1 line(s), 0 to run" in capsys.readouterr().out
    again = json.loads((out / "quality.json").read_text())
    assert [r["iou"] for r in again["runs"] if r["state"] == "done"] == [done[0]["iou"]]

    # user mistakes: one error line each, nothing run
    for argv, words in [(["--seeds", "0"], "--seeds must be at least 1"),
                        (["--limit", "0"], "--limit must be at least 1"),
                        (["--preset", "turbo"], "unknown preset 'turbo'"),
                        (["--resume", "--set", "steps=8"], "--set applies to a new benchmark"),
                        ([], "exists: add --resume")]:
        assert quality.main([*common, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
