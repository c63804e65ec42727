"""Ground-truth quality of `generate` on a fixed list of prompts (issue 17): one command, one table.

    python benchmarks/quality.py                       # the whole list, cpu-fast, seeds 0 and 1
    python benchmarks/quality.py --resume              # finish an interrupted benchmark
    python benchmarks/quality.py --only single         # one group (repeatable)
    python benchmarks/quality.py --summarize-only      # rewrite json/md/png from the runs on disk

The world gives every prompt a true answer (`sds3d.world`), so quality is measured, not judged:
silhouette IoU, albedo colour error, speckle and the Janus figure of `sds3d.eval.ground_truth`, the
mesh's Chamfer distance, and the seconds of training per asset.

The list (fixed here; `benchmark_list`), every prompt with seeds 0 .. --seeds - 1:

- single: every category of `sds3d.world.scenes.CATEGORIES` in one colour, by its canonical
  caption: the composites in their default colour (DEFAULT_COLORS), the seven primitives, whose
  default is gray, in seven different real colours (SINGLE_COLORS) so that colour error means
  something. None of them is a (colour, primitive) pair held out of teacher training.
- paraphrase: 8 phrasings that are not among the world's exact phrasings (`known_phrasings`,
  compared after `normalize_prompt`, i.e. they resolve through the sentence embedding, not the
  table) and that each resolve to a scene of `single`: shade and shape synonyms, word order,
  articles, adjectives that do not change the scene. The paraphrase gap is paraphrase minus its
  canonical `single` prompt, same seed (so it needs the `single` runs of the same seeds).
- fronted: every composite with a front-only part (`sds3d.eval.ground_truth.front_only_pixels`
  finds pixels for it in its default colour: today snowman, house, mushroom, lollipop, rocket), by
  its bare name ("a snowman"), the phrasing a user types; computed here, not hard-coded.
  Janus rule: a run fails when its accent strength is below 0.3 in front (no face) or above 0.05
  behind (a second face); the Janus rate is the share of failing runs.
- multi: 6 two-object scenes with spatial relations (T3Bench's multiple-object set is the anchor).
  The shipped embedded teacher makes them object by object in the world's layout
  (`composition_guidance` auto: sds3d/pipelines/layout.py). A prompt the world refuses
  (UnsupportedPromptError) or the teacher cannot make (`check_run`, e.g. with
  `--set composition_guidance=whole`, which needs a teacher trained on whole two-object scenes) is
  reported as not supported instead of being run.

Runs: `sds3d batch` (sds3d/pipelines/batch.py), one batch folder per group under --batch-dir
(default outputs/quality/<group>/, its prompt file beside it as <group>.txt, `PROMPT | seed=S`
lines, seed-major so that a partial benchmark covers every prompt once first), --workers at a time
(default 1, so that the timings mean something), --preset (default cpu-fast), --teacher (default
embedded) and --set items for every line (recorded in each batch.json and in the md header). A
resumed benchmark keeps the settings its batch folders began with.

Seconds per asset: `train_seconds` of the run's metrics.json, the time of `TextTo3D.train` (teacher
set-up and the optimisation steps), without export, evaluation and report; a run resumed from a
checkpoint counts its last session only (marked in the table). `run s` is the whole line
(process start to report) as the batch manifest records it.

Writes --out (default benchmarks/results)/quality.json, quality.md and quality.png (per prompt, the
ground truth's front view, then each seed's NeRF front and back views from its contact_sheet.png,
64 px each, two prompts a row) and prints the md.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

from sds3d.threads import configure_openmp

configure_openmp()  # before torch loads (as `sds3d` does); the batch's spawned runs import this file too

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_BATCH_DIR = Path("outputs") / "quality"
GROUPS = ("single", "paraphrase", "fronted", "multi")

# The seven primitives' colours in `single` (their default, gray, says little about colour error):
# seven different colours, none a (colour, primitive) pair of `held_out_combinations()`.
SINGLE_COLORS = {"sphere": "blue", "cube": "red", "cylinder": "green", "cone": "orange", "torus": "purple",
                 "pyramid": "yellow", "capsule": "pink"}

# Held-out paraphrases: none is an exact phrasing of the world; each resolves to a `single` scene.
PARAPHRASES = (
    "a small crimson cube",          # shade synonym + size adjective        -> a red cube
    "a shiny blue ball",             # shape synonym + finish adjective      -> a blue sphere
    "a tall green column",           # shape synonym + adjective             -> a green cylinder
    "an orange traffic cone",        # context noun                          -> an orange cone
    "a purple ring shaped object",   # shape description                     -> a purple torus
    "the capsule, pink",             # word order + article                  -> a pink capsule
    "a friendly snowman",            # adjective on a bare composite         -> a white snowman
    "a cozy yellow cottage",         # shape synonym + adjective             -> a yellow house
)

# Two objects and a relation (T3Bench's multiple-object set is the anchor).
MULTI_PROMPTS = (
    "a red cube on top of a blue sphere",
    "a yellow sphere on top of a green cube",
    "a blue cube next to a red sphere",
    "an orange cone next to a purple cylinder",
    "a red sphere in front of a yellow cube",
    "a snowman next to a green pine tree",
)

JANUS_FRONT_MIN = 0.3  # front accent strength a face must reach
JANUS_BACK_MAX = 0.05  # back accent strength above which the back shows a second face
JANUS_RULE = (f"a run fails when its front accent strength is below {JANUS_FRONT_MIN} (no face) or its back accent "
              f"strength is above {JANUS_BACK_MAX} (a second face behind); Janus rate = failing runs / done runs")
SECONDS_RULE = ("train s = metrics.json train_seconds: TextTo3D.train (teacher set-up + optimisation steps), without "
                "export, evaluation and report; a run resumed from a checkpoint (*) counts its last session only. "
                "run s = the whole batch line (process start to report), from the batch manifest")
TILE = 64  # px of one view in quality.png

# Issue 17's done-when figures: (key, text, comparison, target).
TARGETS = (
    ("single_iou", "single: mean IoU", ">=", 0.90),
    ("single_color", "single: mean colour error", "<=", 0.05),
    ("paraphrase_iou", "paraphrase: largest IoU gap to the canonical prompt", "<=", 0.03),
    ("paraphrase_color", "paraphrase: largest colour error gap to the canonical prompt", "<=", 0.02),
    ("fronted_janus", "fronted: Janus rate", "<=", 0.0),
    ("multi_iou", "multi: mean IoU", ">=", 0.80),
    ("red_cube_seconds", "'a red cube': max train s over seeds", "<=", 60.0),
    ("red_cube_iou", "'a red cube': min IoU over seeds", ">=", 0.93),
)


# --- the list ----------------------------------------------------------------------------------

def single_prompts() -> list[str]:
    """Every category once: the primitives in SINGLE_COLORS, the composites in their default colour."""
    from sds3d.world.captions import caption
    from sds3d.world.scenes import CATEGORIES, DEFAULT_COLORS

    return [caption(category, SINGLE_COLORS.get(category, DEFAULT_COLORS[category])) for category in CATEGORIES]


def fronted_categories() -> list[str]:
    """Composites whose default-colour ground truth has front-only pixels (`front_only_pixels`):
    the ones a Janus NeRF can get wrong."""
    import torch

    from sds3d.eval.ground_truth import accent_colors, evaluation_cameras, front_only_pixels
    from sds3d.world.render import render_scene
    from sds3d.world.scenes import COLORS, COMPOSITES, make_scene

    cameras = evaluation_cameras()
    out = []
    for category in COMPOSITES:
        scene = make_scene(category)
        accents = accent_colors(scene)
        if accents.shape[0] == 0:
            continue
        truth = render_scene(scene, cameras)
        pixels, _ = front_only_pixels(truth["albedo"], truth["mask"], torch.tensor(COLORS[scene.color]), accents)
        if pixels.any():
            out.append(category)
    return out


def group_prompts(group: str) -> list[str]:
    if group == "single":
        return single_prompts()
    if group == "paraphrase":
        return list(PARAPHRASES)
    if group == "fronted":
        from sds3d.world.captions import bare_caption

        return [bare_caption(category) for category in fronted_categories()]
    if group == "multi":
        return list(MULTI_PROMPTS)
    raise ValueError(f"unknown group {group!r}: allowed are {', '.join(GROUPS)}")


def canonical_caption(prompt: str, teacher: str = "embedded", sets: dict | None = None) -> tuple[str | None, str | None]:
    """(the caption of the scene the prompt resolves to, None) or (None, the first line of the
    error that refuses it: UnsupportedPromptError from the world, or `check_run`'s refusal of a
    scene the teacher was not trained on, e.g. two objects for the shipped embedded teacher).
    Other errors are a broken list and raise."""
    from sds3d.config import make_config
    from sds3d.pipelines.text_to_3d import check_run
    from sds3d.teachers import teacher_kind
    from sds3d.world.prompts import UnknownPromptError, UnsupportedPromptError, resolve_prompt

    try:
        caption = resolve_prompt(prompt).caption
    except UnsupportedPromptError as error:
        return None, str(error).splitlines()[0]
    if teacher_kind(teacher) in ("embedded", "oracle"):
        try:
            check_run(make_config("cpu-fast", prompt=prompt, teacher=teacher, explicit=sets))
        except UnknownPromptError:
            raise
        except ValueError as error:
            return None, str(error).splitlines()[0]
    return caption, None


def benchmark_list(seeds: int = 2, groups=GROUPS, limit: int | None = None, teacher: str = "embedded",
                   sets: dict | None = None) -> list[dict]:
    """Every run of the benchmark, seed-major within a group: {group, prompt, seed, canonical,
    unsupported}; a prompt the world refuses (or the teacher, under the --set items `sets`) has
    canonical None and its error in `unsupported`."""
    entries = []
    for group in groups:
        prompts = group_prompts(group)[:limit]
        resolved = {prompt: canonical_caption(prompt, teacher, sets) for prompt in prompts}
        for seed in range(seeds):
            for prompt in prompts:
                canonical, error = resolved[prompt]
                entries.append({"group": group, "prompt": prompt, "seed": seed, "canonical": canonical,
                                "unsupported": error})
    return entries


def prompt_file_text(entries: list[dict], group: str) -> str:
    lines = [f"# benchmarks/quality.py, group {group}: one run a line (written by the script; do not edit)"]
    lines += [f"{e['prompt']} | seed={e['seed']}" for e in entries if e["group"] == group and not e["unsupported"]]
    return "\n".join(lines) + "\n"


# --- running -----------------------------------------------------------------------------------

def run_benchmark(entries: list[dict], batch_root: Path, groups, resume: bool, preset: str, settings: dict,
                  workers: int, log=print) -> bool:
    """One `run_batch` per group that has prompts the world supports. True when Ctrl-C stopped it."""
    from sds3d.pipelines.batch import BATCH_FILE, run_batch

    batch_root.mkdir(parents=True, exist_ok=True)
    started = [json.loads((batch_root / g / BATCH_FILE).read_text()) for g in GROUPS
               if (batch_root / g / BATCH_FILE).is_file()]
    if resume and started:  # groups begun now take the settings of the ones begun before
        preset, settings = started[0]["preset"], started[0]["settings"]
    for group in groups:
        text = prompt_file_text(entries, group)
        if text.count("\n") == 1:
            log(f"group {group}: nothing the world supports to run")
            continue
        prompt_file = batch_root / f"{group}.txt"
        group_dir = batch_root / group
        again = resume and (group_dir / BATCH_FILE).is_file()
        if again and prompt_file.is_file() and prompt_file.read_text(encoding="utf-8") != text:
            from sds3d.pipelines.batch import BatchError

            raise BatchError(f"cannot resume group {group}: {prompt_file} lists other runs than this command "
                             "(another --seeds or --limit?); give the options the benchmark began with")
        from sds3d.io import atomic_write_text

        atomic_write_text(prompt_file, text)  # unchanged on a resume (batch checks it against its batch.json)
        log(f"group {group}: {'resuming' if again else 'starting'} {group_dir}")
        result = run_batch(prompt_file, out=group_dir, workers=workers, resume=again, preset=preset,
                           set_items=None if again else settings, log=log)
        if result.interrupted:
            return True
    return False


# --- the summary -------------------------------------------------------------------------------

def _number(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def collect_runs(entries: list[dict], batch_root: Path) -> list[dict]:
    """Every entry with its batch record's state and figures (state "not started" when its group's
    batch folder has no record of it)."""
    from sds3d.pipelines.batch import MANIFEST, read_manifest

    records = {}
    for group in GROUPS:
        if (batch_root / group / MANIFEST).is_file():
            for record in read_manifest(batch_root / group):
                records[(group, record["prompt"], (record.get("overrides") or {}).get("seed", 0))] = record
    runs = []
    for entry in entries:
        run = dict(entry)
        record = records.get((entry["group"], entry["prompt"], entry["seed"]))
        if entry["unsupported"]:
            run["state"] = "unsupported"
        elif record is None:
            run["state"] = "not started"
        else:
            run["state"] = record["state"]
        metrics = (record or {}).get("metrics") or {} if run["state"] == "done" else {}
        accent = metrics.get("accent_strength") if isinstance(metrics.get("accent_strength"), dict) else {}
        run.update(iou=_number(metrics.get("iou_mean")), color_error=_number(metrics.get("color_error_mean")),
                   chamfer=_number(metrics.get("chamfer")), speckle=_number(metrics.get("speckle")),
                   accent_front=_number(accent.get("front")), accent_back=_number(accent.get("back")),
                   train_seconds=_number(metrics.get("train_seconds")),
                   run_seconds=_number((record or {}).get("seconds")) if run["state"] == "done" else None,
                   attempts=(record or {}).get("attempts", 0),
                   run_dir=f"{entry['group']}/{record['run_dir']}" if record else None,
                   error=(record or {}).get("error"))
        runs.append(run)
    return runs


MEAN_KEYS = ("iou", "color_error", "chamfer", "speckle", "accent_front", "accent_back", "train_seconds", "run_seconds")


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def janus_fails(run: dict) -> bool:
    """The Janus rule (JANUS_RULE); a run without a measured front counts as failing."""
    front, back = run["accent_front"], run["accent_back"]
    return front is None or back is None or front < JANUS_FRONT_MIN or back > JANUS_BACK_MAX


def summarize_runs(runs: list[dict]) -> dict:
    """Per group: runs, done, means over done runs; the fronted Janus rate; the paraphrase deltas
    (paraphrase minus the `single` run of its canonical caption, same seed); the targets."""
    groups = {}
    for group in GROUPS:
        mine = [r for r in runs if r["group"] == group]
        done = [r for r in mine if r["state"] == "done"]
        summary = {"runs": len([r for r in mine if r["state"] != "unsupported"]), "done": len(done),
                   "means": {key: _mean(r[key] for r in done) for key in MEAN_KEYS}}
        if group == "fronted":
            no_face = [r for r in done if r["accent_front"] is None or r["accent_front"] < JANUS_FRONT_MIN]
            two_faced = [r for r in done if r["accent_back"] is None or r["accent_back"] > JANUS_BACK_MAX]
            summary.update(janus_rule=JANUS_RULE, janus_failures=sum(janus_fails(r) for r in done),
                           no_face=len(no_face), two_faced=len(two_faced),
                           janus_rate=sum(janus_fails(r) for r in done) / len(done) if done else None)
        if group == "paraphrase":
            canon = {(r["prompt"], r["seed"]): r for r in runs if r["group"] == "single" and r["state"] == "done"}
            pairs = []
            for r in done:
                c = canon.get((r["canonical"], r["seed"]))
                if c is None or None in (r["iou"], c["iou"], r["color_error"], c["color_error"]):
                    continue
                pairs.append({"prompt": r["prompt"], "canonical": r["canonical"], "seed": r["seed"],
                              "delta_iou": r["iou"] - c["iou"], "delta_color_error": r["color_error"] - c["color_error"]})
            summary.update(pairs=pairs,
                           max_abs_delta_iou=max((abs(p["delta_iou"]) for p in pairs), default=None),
                           max_abs_delta_color_error=max((abs(p["delta_color_error"]) for p in pairs), default=None))
        if group == "multi":
            summary["unsupported"] = [{"prompt": r["prompt"], "error": r["unsupported"]}
                                      for r in mine if r["unsupported"] and r["seed"] == 0]
        groups[group] = summary
    cube = [r for r in runs if r["group"] == "single" and r["prompt"] == "a red cube" and r["state"] == "done"]
    values = {
        "single_iou": groups["single"]["means"]["iou"], "single_color": groups["single"]["means"]["color_error"],
        "paraphrase_iou": groups["paraphrase"]["max_abs_delta_iou"],
        "paraphrase_color": groups["paraphrase"]["max_abs_delta_color_error"],
        "fronted_janus": groups["fronted"]["janus_rate"], "multi_iou": groups["multi"]["means"]["iou"],
        "red_cube_seconds": max((r["train_seconds"] for r in cube if r["train_seconds"] is not None), default=None),
        "red_cube_iou": min((r["iou"] for r in cube if r["iou"] is not None), default=None),
    }
    targets = [{"key": key, "what": what, "target": f"{op} {target:g}", "value": values[key],
                "met": None if values[key] is None else (values[key] >= target if op == ">=" else values[key] <= target)}
               for key, what, op, target in TARGETS]
    total = sum(g["runs"] for g in groups.values())
    done = sum(g["done"] for g in groups.values())
    return {"groups": groups, "targets": targets, "runs_total": total, "runs_done": done, "partial": done < total}


BASELINE_KEYS = ("iou", "color_error", "speckle", "train_seconds")


def compare_with_baseline(runs: list[dict], baseline_runs: list[dict]) -> dict:
    """Per group, over the runs done in both (same group, prompt and seed): how many, and each
    BASELINE_KEYS mean before (the baseline's runs) and after (these runs), with the ratio after /
    before; the figure behind 'speckle halved' and any other before-and-after claim."""
    before = {(r["group"], r["prompt"], r["seed"]): r for r in baseline_runs if r["state"] == "done"}
    out = {}
    for group in GROUPS:
        pairs = [(before[key], r) for r in runs if r["group"] == group and r["state"] == "done"
                 and (key := (r["group"], r["prompt"], r["seed"])) in before]
        if not pairs:
            continue
        figures = {}
        for key in BASELINE_KEYS:
            both = [(b[key], a[key]) for b, a in pairs if b[key] is not None and a[key] is not None]
            was, now = _mean(b for b, _ in both), _mean(a for _, a in both)
            figures[key] = {"before": was, "after": now, "ratio": now / was if was else None}
        out[group] = {"runs": len(pairs), **figures}
    return out


def machine() -> dict:
    import torch

    from sds3d.precision import read_cpuinfo
    from sds3d.threads import available_cpus, openmp_waiting

    return {"processor": platform.processor(), "cpu": read_cpuinfo()[0], "cores": len(available_cpus()),
            "threads": torch.get_num_threads(), "openmp": openmp_waiting(), "torch": torch.__version__,
            "python": platform.python_version()}


def batch_settings(batch_root: Path) -> dict:
    """{group: {preset, settings, workers, threads}} from each group's batch.json."""
    from sds3d.pipelines.batch import BATCH_FILE

    out = {}
    for group in GROUPS:
        path = batch_root / group / BATCH_FILE
        if path.is_file():
            info = json.loads(path.read_text())
            out[group] = {key: info.get(key) for key in ("preset", "settings", "workers", "threads")}
    return out


# --- writing -----------------------------------------------------------------------------------

def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = ["# Quality on the world's ground truth (benchmarks/quality.py)", ""]
    if s["partial"]:
        lines += [f"**partial: {s['runs_done']} of {s['runs_total']} runs done** (the figures below cover the done runs)", ""]
    cpu = report["machine"]["cpu"] + (f" ({report['machine']['processor']})" if report["machine"]["processor"] else "")
    lines += [f"Command: `{report['command']}`  ",
              f"Machine: {cpu}, {report['machine']['cores']} cores, torch {report['machine']['torch']}"
              + (f", OpenMP {report['machine']['openmp']}" if report["machine"].get("openmp") else "") + "  ",
              f"Runs: {report['batch_dir']}, {s['runs_done']} of {s['runs_total']} done, seeds 0..{report['seeds'] - 1}  "]
    described = {group: f"preset {info['preset']}, --set {json.dumps(info['settings'], sort_keys=True)}, "
                        f"{info['workers']} worker(s), {info['threads']} thread(s) a run"
                 for group, info in report["settings"].items()}
    if len(set(described.values())) == 1:
        lines.append(f"Settings ({', '.join(described)}): {next(iter(described.values()))}  ")
    else:
        lines += [f"Settings of {group}: {text}  " for group, text in described.items()]
    lines += ["", SECONDS_RULE + ".", "", "## Done-when targets (issue 17)", "", "| figure | target | value | met |",
              "|---|---|---|---|"]
    for t in s["targets"]:
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        value = _seconds(t["value"]) if t["key"].endswith("seconds") else _fmt(t["value"])
        lines.append(f"| {t['what']} | {t['target']} | {value} | {met} |")
    lines += ["", "Speckle is reported per group; 'halved' compares it with a run before the change.", "",
              "## By group", "", "| group | done | IoU | colour err | Chamfer | speckle | front | back | train s | run s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for group, g in s["groups"].items():
        m = g["means"]
        extra = f" ({len(g['unsupported'])} not supported yet)" if g.get("unsupported") else ""
        lines.append(f"| {group} | {g['done']}/{g['runs']}{extra} | {_fmt(m['iou'])} | {_fmt(m['color_error'])} | "
                     f"{_fmt(m['chamfer'], 4)} | {_fmt(m['speckle'], 4)} | {_fmt(m['accent_front'])} | "
                     f"{_fmt(m['accent_back'])} | {_seconds(m['train_seconds'])} | {_seconds(m['run_seconds'])} |")
    fronted, para = s["groups"]["fronted"], s["groups"]["paraphrase"]
    lines += ["", f"Fronted Janus rate: {_fmt(fronted['janus_rate'], 2)} ({fronted['janus_failures']} of {fronted['done']} "
              f"done runs fail; {fronted['no_face']} without a face in front, {fronted['two_faced']} with one behind). "
              f"Rule: {JANUS_RULE}.", "", "## Paraphrases against their canonical prompts (same seed)", "",
              "| paraphrase | canonical | seed | IoU delta | colour err delta |", "|---|---|---|---|---|"]
    for p in para["pairs"]:
        lines.append(f"| {p['prompt']} | {p['canonical']} | {p['seed']} | {p['delta_iou']:+.3f} | {p['delta_color_error']:+.3f} |")
    lines.append(f"| largest gap (absolute) | | | {_fmt(para['max_abs_delta_iou'])} | {_fmt(para['max_abs_delta_color_error'])} |")
    unsupported = s["groups"]["multi"]["unsupported"]
    if unsupported:
        lines += ["", "## Not supported by the world yet", ""]
        lines += [f"- {u['prompt']!r}: not supported yet: {u['error']}"
                  for u in unsupported]
    for b in report.get("baselines", []):
        lines += ["", f"## Against {b['path']}", "", f"Baseline: {b['path']} (`{b['command']}`), over the runs done in both "
                  "(same group, prompt and seed); before -> after (after / before).", "",
                  "| group | runs | IoU | colour err | speckle | train s |", "|---|---|---|---|---|---|"]
        show = lambda key, v: _seconds(v) if key == "train_seconds" else _fmt(v, 4 if key == "speckle" else 3)  # noqa: E731
        for group, g in b["groups"].items():
            cells = [f"{show(k, g[k]['before'])} -> {show(k, g[k]['after'])} ({_fmt(g[k]['ratio'], 2)})" for k in BASELINE_KEYS]
            lines.append(f"| {group} | {g['runs']} | " + " | ".join(cells) + " |")
    lines += ["", "## Every run", "", "| group | prompt | seed | canonical | state | IoU | colour err | Chamfer | speckle | "
              "front | back | train s | run s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {key: i for i, key in enumerate(dict.fromkeys((r["group"], r["prompt"]) for r in report["runs"]))}
    for r in sorted(report["runs"], key=lambda r: (order[r["group"], r["prompt"]], r["seed"])):
        if r["state"] == "unsupported":
            continue
        state = r["state"] + (f" ({r['error']})" if r["state"] == "failed" and r.get("error") else "")
        mark = "*" if r["attempts"] > 1 and r["train_seconds"] is not None else ""
        lines.append(f"| {r['group']} | {r['prompt']} | {r['seed']} | {r['canonical']} | {state} | {_fmt(r['iou'])} | "
                     f"{_fmt(r['color_error'])} | {_fmt(r['chamfer'], 4)} | {_fmt(r['speckle'], 4)} | "
                     f"{_fmt(r['accent_front'])} | {_fmt(r['accent_back'])} | {_seconds(r['train_seconds'])}{mark} | "
                     f"{_seconds(r['run_seconds'])} |")
    if report.get("contact_sheet"):
        lines += ["", "## Contact sheet", "", f"![quality contact sheet]({report['contact_sheet']})", "",
                  "Per prompt (two a row, in this order): the ground truth's front view, then for each seed the NeRF's "
                  "front and back views (shaded, from the run's contact_sheet.png); gray where the run is not done.", ""]
        lines += [f"{i + 1}. {prompt}" for i, prompt in enumerate(report["contact_sheet_prompts"])]
    return "\n".join(lines) + "\n"


def _sheet_views(path: Path):
    """(NeRF front, NeRF back, truth front or None) of a run's contact_sheet.png (8 views a row)."""
    import imageio.v2 as imageio
    import torch

    image = torch.from_numpy(imageio.imread(path)[..., :3].copy()).permute(2, 0, 1).float() / 255
    size = image.shape[-1] // 8
    cell = lambda row, col: image[:, row * size:(row + 1) * size, col * size:(col + 1) * size]  # noqa: E731
    return cell(0, 0), cell(0, 4), cell(1, 0) if image.shape[1] >= 2 * size else None


def contact_sheet(runs: list[dict], batch_root: Path, path: Path, seeds: int) -> list[str] | None:
    """quality.png (see the module docstring); the prompts in its order, or None when no run is done."""
    import torch
    import torch.nn.functional as F

    from sds3d.io import save_image

    prompts = list(dict.fromkeys((r["group"], r["prompt"]) for r in runs if r["state"] != "unsupported"))
    by_key = {(r["group"], r["prompt"], r["seed"]): r for r in runs}
    gray = torch.full((3, TILE, TILE), 0.5)
    shrink = lambda view: F.interpolate(view[None], size=(TILE, TILE), mode="area")[0]  # noqa: E731
    tiles, any_done = [], False
    for group, prompt in prompts:
        truth, views = None, []
        for seed in range(seeds):
            run = by_key.get((group, prompt, seed))
            sheet = batch_root / run["run_dir"] / "contact_sheet.png" if run and run["run_dir"] else None
            if run and run["state"] == "done" and sheet.is_file():
                front, back, truth_front = _sheet_views(sheet)
                views += [shrink(front), shrink(back)]
                truth = truth if truth is not None or truth_front is None else shrink(truth_front)
                any_done = True
            else:
                views += [gray, gray]
        tiles += [truth if truth is not None else gray, *views]
    if not any_done:
        return None
    per_prompt = 1 + 2 * seeds
    save_image(path, torch.stack(tiles).clamp(0, 1), ncols=per_prompt * min(2, len(prompts)))
    return [f"{prompt} ({group})" for group, prompt in prompts]


def read_baseline(path: Path) -> dict:
    """An earlier quality.json (its runs and how they were made), or ValueError naming the problem."""
    try:
        report = json.loads(Path(path).read_text())
        return {"path": str(path), "command": report["command"], "settings": report["settings"], "runs": report["runs"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--baseline {path} is not a quality.json written by this benchmark ({error})") from None


def write_results(entries: list[dict], batch_root: Path, out: Path, command: str, seeds: int,
                  baselines: list[dict] = ()) -> str:
    """quality.json, quality.md and quality.png in `out` from the batch folders (with `baselines`,
    `read_baseline`'s dicts, also a before-and-after comparison with each); returns the md."""
    from sds3d.io import atomic_write_text

    runs = collect_runs(entries, batch_root)
    out.mkdir(parents=True, exist_ok=True)
    sheet = out / "quality.png"
    sheet_prompts = contact_sheet(runs, batch_root, sheet, seeds)
    if sheet_prompts is None:
        sheet.unlink(missing_ok=True)  # no done run: no sheet, not an older one
    report = {"command": command, "written": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
              "batch_dir": str(batch_root), "seeds": seeds, "settings": batch_settings(batch_root),
              "seconds_rule": SECONDS_RULE, "janus_rule": JANUS_RULE, "summary": summarize_runs(runs), "runs": runs,
              "contact_sheet": sheet.name if sheet_prompts else None, "contact_sheet_prompts": sheet_prompts or []}
    report["baselines"] = [{"path": b["path"], "command": b["command"], "settings": b["settings"],
                            "groups": compare_with_baseline(runs, b["runs"])} for b in baselines]
    atomic_write_text(out / "quality.json", json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    atomic_write_text(out / "quality.md", text)
    return text


# --- the command -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="See the module docstring for the list and the rules.")
    parser.add_argument("--batch-dir", default=str(DEFAULT_BATCH_DIR),
                        help=f"where the runs go, one batch folder per group (default {DEFAULT_BATCH_DIR})")
    parser.add_argument("--out", default=str(RESULTS), help="where quality.json/.md/.png go (default benchmarks/results)")
    parser.add_argument("--only", action="append", choices=GROUPS, default=None, metavar="GROUP",
                        help=f"run only this group (repeatable): {', '.join(GROUPS)}")
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0 .. N-1 of every prompt (default 2)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts of each group (for tests)")
    parser.add_argument("--workers", type=int, default=1, help="runs at a time (default 1, so that timings mean something)")
    parser.add_argument("--preset", default="cpu-fast", help="generate preset of every run (default cpu-fast)")
    parser.add_argument("--teacher", default="embedded", help="teacher of every run (default embedded)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a generate setting for every run, as `sds3d batch --set` (recorded in the md header)")
    parser.add_argument("--resume", action="store_true", help="finish an interrupted benchmark in --batch-dir")
    parser.add_argument("--baseline", action="append", default=[], metavar="QUALITY_JSON",
                        help="an earlier quality.json: also compare the runs both hold (same group, prompt, seed); "
                             "repeatable")
    parser.add_argument("--summarize-only", action="store_true",
                        help="run nothing: (re)write quality.json/.md/.png from the runs in --batch-dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    command = shlex.join(["python", "benchmarks/quality.py", *argv])
    resume_command = command if args.resume else f"{command} --resume"
    log = lambda text: print(text, flush=True)  # noqa: E731
    try:
        from sds3d.config import PRESETS, parse_overrides

        if args.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {args.limit}")
        if args.preset not in PRESETS:
            raise ValueError(f"unknown preset {args.preset!r}: allowed are {', '.join(PRESETS)}")
        if args.resume and args.set:
            raise ValueError("--set applies to a new benchmark: a resumed one keeps the settings of its batch folders")
        sets = parse_overrides(args.set)
        settings = {"teacher": args.teacher, **sets}
        groups = tuple(g for g in GROUPS if g in (args.only or GROUPS))
        batch_root = Path(args.batch_dir)
        baselines = [read_baseline(Path(path)) for path in args.baseline]
        interrupted = False
        if not args.summarize_only:
            interrupted = run_benchmark(benchmark_list(args.seeds, groups, args.limit, args.teacher, sets), batch_root, groups,
                                        args.resume, args.preset, settings, args.workers, log)
        text = write_results(benchmark_list(args.seeds, teacher=args.teacher, sets=sets), batch_root, Path(args.out), command,
                             args.seeds, baselines)
    except KeyboardInterrupt:
        print(f"interrupted: the running runs stopped with a checkpoint; finish with: {resume_command}", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as error:
        print(f"error: {str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        return 2
    print(text)
    print(f"written: {Path(args.out) / 'quality.json'}, quality.md, quality.png")
    if interrupted:
        print(f"interrupted: finish with: {resume_command}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
