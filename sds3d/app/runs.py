"""Run folders as the web app shows them: the gallery of the Runs tab, a run's result files, its
contact sheet of previews and its metrics table.

Everything here reads the folders `sds3d generate` writes (see sds3d/pipelines/text_to_3d.py); the
only file it adds is `previews_sheet.png`, derived from `previews/` and written atomically (the run's own
`contact_sheet.png`, 8 views beside the ground truth, is written by `generate`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ..io import atomic_path, slugify
from .paths import OutsideRootError, inside_root

PREVIEW_RE = re.compile(r"^step-(\d+)\.png$")
# Files offered for download, in this order, when the run has them.
DOWNLOADS = ("mesh.glb", "mesh.obj", "mesh.mtl", "mesh.png", "mesh.ply", "turntable.mp4", "config.yaml")
CONTACT_SHEET = "previews_sheet.png"
SHEET_ROWS = 8


@dataclass
class RunSummary:
    """What the gallery says of one run folder."""

    name: str  # the folder's path relative to the output root
    path: Path
    prompt: str
    seed: int | None
    steps: int | None  # the config's
    step: int | None  # steps trained: the last preview's, or the checkpoint's for an unfinished run
    finished: bool
    metrics: dict | None
    thumbnail: Path | None
    mtime: float
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.finished:
            return "done"
        if self.step is None:
            return "not started"
        return f"stopped at step {self.step}/{self.steps}"

    @property
    def caption(self) -> str:
        parts = [self.prompt or self.name, f"seed {self.seed}", self.status]
        if self.metrics and isinstance(self.metrics.get("iou_mean"), (int, float)):
            parts.append(f"IoU {self.metrics['iou_mean']:.2f}")
        return " · ".join(parts)


def previews(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the run's saved previews, by step."""
    folder = run_dir / "previews"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PREVIEW_RE.match(p.name))]
    return sorted(found)


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of checkpoints/last.pt, read through a memory map (the tensors are not loaded)."""
    import torch

    path = run_dir / "checkpoints" / "last.pt"
    if not path.is_file():
        return None
    try:
        return int(torch.load(path, weights_only=True, mmap=True, map_location="cpu")["step"])
    except Exception:  # an unreadable checkpoint: the gallery shows the run without a step
        return None


def is_finished(run_dir: Path) -> bool:
    """A run whose mesh was exported after its last checkpoint (a resumed and stopped run is not)."""
    mesh, checkpoint = run_dir / "mesh.glb", run_dir / "checkpoints" / "last.pt"
    if not mesh.is_file():
        return False
    return not checkpoint.is_file() or mesh.stat().st_mtime >= checkpoint.stat().st_mtime


def read_metrics(run_dir: Path) -> dict | None:
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def summarize(root: Path, run_dir: Path) -> RunSummary | None:
    """The summary of one run folder, or None when it holds no readable config.yaml."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(config, dict):
        return None
    shots = previews(run_dir)
    finished = is_finished(run_dir)
    step = shots[-1][0] if shots else None
    if not finished:
        step = checkpoint_step(run_dir) if (run_dir / "checkpoints" / "last.pt").is_file() else step
    seed, steps = config.get("seed"), config.get("steps")
    return RunSummary(name=str(run_dir.relative_to(root)), path=run_dir, prompt=str(config.get("prompt", "")),
                      seed=seed if isinstance(seed, int) else None, steps=steps if isinstance(steps, int) else None,
                      step=step, finished=finished, metrics=read_metrics(run_dir),
                      thumbnail=shots[-1][1] if shots else None, mtime=(run_dir / "config.yaml").stat().st_mtime,
                      files={name: run_dir / name for name in DOWNLOADS if (run_dir / name).is_file()})


def list_runs(root: str | Path) -> list[RunSummary]:
    """Run folders directly under the output root (those with a config.yaml), newest first.

    A folder that is a symlink out of the root is skipped: the app shows and serves only what lies
    inside it."""
    root = Path(root).resolve()
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        if not entry.is_dir() or not (entry / "config.yaml").is_file():
            continue
        try:
            run_dir = inside_root(root, entry.name)
        except OutsideRootError:
            continue
        summary = summarize(root, run_dir)
        if summary is not None:
            found.append(summary)
    return sorted(found, key=lambda s: s.mtime, reverse=True)


def thumbnail_array(summary: RunSummary) -> np.ndarray | None:
    """The front view of the run's last preview (its leftmost quarter: previews are four views side
    by side), as an (H, W, 3) uint8 array, or None."""
    if summary.thumbnail is None:
        return None
    import imageio.v2 as imageio

    try:
        image = np.asarray(imageio.imread(summary.thumbnail))[..., :3]
    except Exception:
        return None
    height, width = image.shape[:2]
    return image[:, : width // 4] if width >= 4 * height else image


def contact_sheet(run_dir: Path, rows: int = SHEET_ROWS) -> Path | None:
    """`previews_sheet.png`: up to `rows` saved previews evenly spread over the run (the last always
    among them), one per row with its step written on the left; rebuilt when a preview is newer.
    None when the run has no preview yet."""
    shots = previews(run_dir)
    if not shots:
        return None
    out = run_dir / CONTACT_SHEET
    if out.is_file() and out.stat().st_mtime >= max(p.stat().st_mtime for _, p in shots):
        return out
    if len(shots) > rows:
        picks = sorted({round(i * (len(shots) - 1) / (rows - 1)) for i in range(rows)})
        shots = [shots[i] for i in picks]
    from PIL import Image, ImageDraw

    images = [Image.open(path).convert("RGB") for _, path in shots]
    label_width = 72
    width = max(image.width for image in images) + label_width
    sheet = Image.new("RGB", (width, sum(image.height for image in images)), "white")
    draw = ImageDraw.Draw(sheet)
    top = 0
    for (step, _), image in zip(shots, images):
        sheet.paste(image, (label_width, top))
        draw.text((6, top + image.height // 2 - 6), f"step {step}", fill=(0, 0, 0))
        top += image.height
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out


def _front_back(accents) -> str | None:
    """`accent_strength` ({"front", "back", "pixels"}) as "front / back"; None when the scene has no face."""
    if not isinstance(accents, dict) or "front" not in accents or "back" not in accents:
        return None
    return f"{accents['front']:.3g} / {accents['back']:.3g}"


def metrics_markdown(metrics: dict | None, prompt: str = "") -> str:
    """The run's scores against the world's ground truth as a small table (metrics.json)."""
    if not metrics:
        return f"No metrics: {prompt!r} is not a scene of the embedded world, or the run is unfinished." if prompt \
            else "No metrics yet."
    rows = [("scene", metrics.get("prompt_scene")),
            ("silhouette IoU, mean of 8 views (higher is better)", metrics.get("iou_mean")),
            ("albedo colour error, mean (lower is better)", metrics.get("color_error_mean")),
            ("speckle: albedo grain in flat regions (lower is better)", metrics.get("speckle")),
            ("face (front-only parts) front / back, truth 1 / 0", _front_back(metrics.get("accent_strength"))),
            ("Chamfer distance to the true mesh (lower is better)", metrics.get("chamfer")),
            ("training seconds", metrics.get("train_seconds"))]
    lines = ["| metric (vs ground truth) | value |", "|---|---|"]
    for name, value in rows:
        if value is None:
            continue
        shown = f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)
        lines.append(f"| {name} | {shown} |")
    return "\n".join(lines)


def new_run_dir(root: Path, prompt: str, seed: int) -> Path:
    """A fresh folder `root/<prompt-slug>-<seed>` (as the CLI names it), or `..._2`, `..._3` when that is
    taken: the app never reuses a run folder for a new run. Created here, so that two runs started at
    once cannot take the same name."""
    base = f"{slugify(prompt)}-{seed}"
    root.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        path = root / (base if n == 1 else f"{base}_{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1
