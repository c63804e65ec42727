"""Speckle of trained runs: the albedo's grain, and the shaded grain of the pictures we show.

    python benchmarks/speckle.py [--runs DIR ...] [--prompts "a red cube" "a house"] [--steps 800]

Without --runs it trains (or reuses) one cpu-fast run per prompt under outputs/speckle/. For every
run it renders the 8 evaluation views at 128 px and measures `sds3d.eval.metrics.speckle` (RMS of the
colour's deviation from its 3x3 mean inside regions of one flat colour in the truth, 2 px away from
their borders) on:

- the albedo at ray midpoints (what a texture bakes; `metrics.json`'s `speckle`);
- the Lambertian turntable picture as it was drawn before (analytic normals, random sample offsets
  along each ray), at ray midpoints, and at ray midpoints with `NeRFField.display_normals` (central
  differences) at several widths;
- the truth's own shaded render (its shading varies smoothly: the floor of the shaded figure).

Writes benchmarks/results/speckle.json and speckle.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from sds3d.cli import _load_run
from sds3d.config import make_config
from sds3d.eval.ground_truth import evaluation_cameras
from sds3d.eval.metrics import speckle
from sds3d.io import atomic_write_text
from sds3d.nerf.field import DISPLAY_NORMAL_EPS
from sds3d.nerf.render import render_image
from sds3d.pipelines.text_to_3d import generate
from sds3d.world.prompts import resolve_prompt
from sds3d.world.render import render_scene

RESULTS = Path(__file__).resolve().parent / "results"
SHADED = [("turntable before: analytic normals, random offsets", "analytic", None, True),
          ("analytic normals, ray midpoints", "analytic", None, False),
          ("display normals 0.005, midpoints", "finite_difference", 0.005, False),
          ("display normals 0.01, midpoints", "finite_difference", 0.01, False),
          (f"display normals {DISPLAY_NORMAL_EPS} (default), midpoints", "finite_difference", DISPLAY_NORMAL_EPS, False)]


def measure(run_dir: Path) -> dict:
    run = _load_run(str(run_dir))
    cfg, field = run.config, run.field
    cameras = evaluation_cameras(128)
    truth = render_scene(resolve_prompt(cfg.prompt), cameras, background=cfg.background)

    def grain(shading: str, stratified: bool) -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            out = render_image(field, cameras, occupancy=run.occupancy, num_samples=cfg.num_samples, shading=shading,
                               background=cfg.background, early_stop_eps=cfg.early_stop_eps, stratified=stratified)
        return float(speckle(out["rgb"], out["opacity"], truth["albedo"], truth["mask"]).nanmean())

    try:  # the run's own scores and training time, for the record
        scored = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        scored = {}
    row = {"run": str(run_dir), "prompt": cfg.prompt, "steps": cfg.steps, "seed": cfg.seed,
           "iou": scored.get("iou_mean"), "color_error": scored.get("color_error_mean"),
           "train_seconds": scored.get("train_seconds"), "albedo, midpoints": grain("albedo", False)}
    saved = field.normals, field.normal_eps
    try:
        for name, normals, eps, stratified in SHADED:
            field.normals, field.normal_eps = normals, eps if eps is not None else saved[1]
            row[name] = grain("lambertian", stratified)
    finally:
        field.normals, field.normal_eps = saved
    row["truth shaded"] = float(speckle(truth["rgb"], truth["mask"], truth["albedo"], truth["mask"]).nanmean())
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", default=None, help="trained run folders (default: train --prompts)")
    parser.add_argument("--prompts", nargs="*", default=["a red cube", "a house"])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    start = time.time()
    runs = [Path(r) for r in args.runs] if args.runs else []
    if not args.runs:
        for prompt in args.prompts:
            folder = Path("outputs/speckle") / prompt.replace(" ", "-")
            if not (folder / "checkpoints" / "last.pt").exists():
                generate(make_config("cpu-fast", prompt=prompt, steps=args.steps), out=folder, show_progress=False)
            runs.append(folder)
    rows = [measure(r) for r in runs]
    names = [k for k in rows[0] if k not in ("run", "prompt", "steps", "seed", "iou", "color_error", "train_seconds")]
    command = "python benchmarks/speckle.py " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    lines = ["# Speckle of trained runs (RMS deviation from the 3x3 mean in flat truth regions, 8 views, 128 px)", "",
             f"`{command.strip()}` on {machine}; {time.time() - start:.0f} s.", "",
             "| measure | " + " | ".join(f"{r['prompt']} ({r['steps']} steps, seed {r['seed']})" for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    lines += [f"| {name} | " + " | ".join(f"{r[name]:.4f}" for r in rows) + " |" for name in names]
    lines += ["", "The runs' own metrics.json: " + "; ".join(
        f"{r['prompt']}: IoU {r['iou']:.3f}, colour error {r['color_error']:.3f}, {r['train_seconds']} s of training"
        if r["iou"] is not None else f"{r['prompt']}: no metrics.json"
        for r in rows)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "speckle.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "speckle.json", json.dumps({"command": command.strip(), "machine": machine, "rows": rows},
                                                       indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
