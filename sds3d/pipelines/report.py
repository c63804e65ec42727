"""What people look at in a run folder: a contact sheet, the loss curve and a short summary.

Written by `generate` at the end of every run (and so by every line of `sds3d batch`):

    contact_sheet.png   the 8 evaluation views of the NeRF (shaded), and the world's ground truth
                        from the same cameras in a second row when the prompt names a world scene
    loss.csv            step, total loss: one row per step of the run (resumed runs included)
    loss_curve.png      the same, plotted
    summary.md          prompt, teacher, loss, steps, seconds, metrics and the files, in a few lines
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..io import atomic_write_text, save_image

CONTACT_SHEET = "contact_sheet.png"
LOSS_CURVE = "loss_curve.png"
SUMMARY = "summary.md"
SHEET_RESOLUTION = 128


def contact_sheet_images(field, occupancy, config, scene=None, resolution: int = SHEET_RESOLUTION) -> torch.Tensor:
    """(8 or 16, 3, R, R): the NeRF from the 8 evaluation cameras (Lambertian shading, the run's
    background), then the ground truth from the same cameras when `scene` is given.

    The ray samples are placed with a generator seeded by the run's seed, in a forked RNG state, so
    that the sheet is a function of the field alone and drawing it changes nothing else."""
    from ..eval.ground_truth import evaluation_cameras
    from ..nerf.render import render_image

    cameras = evaluation_cameras(resolution)
    device = next(field.parameters()).device
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            field.display_normals():
        torch.manual_seed(config.seed)
        nerf = render_image(field, cameras, occupancy=occupancy, num_samples=config.num_samples, shading="lambertian",
                            background=config.background, early_stop_eps=config.early_stop_eps,
                            stratified=False)["rgb"].cpu()  # ray midpoints, display normals: no grain
    rows = [nerf.clamp(0, 1)]
    if scene is not None:
        from ..world.render import render_scene

        rows.append(render_scene(scene, cameras, background=config.background)["rgb"].clamp(0, 1))
    return torch.cat(rows)


def write_loss_files(run_dir: Path, losses: list[float], title: str = "") -> dict[str, Path]:
    """loss.csv (every step) and loss_curve.png; nothing when no step was trained."""
    from ..training.loop import LOSS_CSV, write_loss_curve

    if not losses:
        return {}
    csv = run_dir / LOSS_CSV
    atomic_write_text(csv, "step,loss\n" + "".join(f"{i + 1},{v:.6g}\n" for i, v in enumerate(losses)))
    files = {"loss_csv": csv}
    if write_loss_curve(csv, run_dir / LOSS_CURVE, title=title):
        files["loss_curve"] = run_dir / LOSS_CURVE
    return files


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def summary_markdown(config, steps: int, seconds: float, metrics: dict | None, files: dict[str, Path],
                     run_dir: Path) -> str:
    """A few lines a person reads first: what was asked, how it ran, how good it is, where the files are."""
    lines = [f"# {config.prompt}", "",
             f"- teacher `{config.teacher}`, loss `{config.loss}`, guidance {config.guidance_scale:g}, seed {config.seed}",
             f"- {steps} steps at {config.render_resolution} px, batch {config.batch_size}, "
             f"{seconds:.1f} s in all (training {_number(metrics.get('train_seconds')) if metrics else 'n/a'} s)"]
    if metrics:
        lines += ["", "| vs the world's ground truth | value |", "|---|---|",
                  f"| scene | {metrics.get('prompt_scene')} |",
                  f"| silhouette IoU (8 views, mean) | {_number(metrics.get('iou_mean'))} |",
                  f"| albedo colour error (mean) | {_number(metrics.get('color_error_mean'))} |"]
        if "chamfer" in metrics:
            lines.append(f"| Chamfer distance of the mesh | {_number(metrics['chamfer'])} |")
        if metrics.get("speckle") is not None:
            lines.append(f"| speckle (albedo grain in flat regions, lower is better) | {_number(metrics['speckle'])} |")
        accents = metrics.get("accent_strength")
        if accents:
            lines.append(f"| face (front-only parts) front / back, truth 1 / 0 | "
                         f"{_number(accents['front'])} / {_number(accents['back'])} |")
    else:
        lines += ["", "No ground truth: the prompt is not a scene of the embedded world (or scoring was skipped)."]
    lines += ["", "Files: " + ", ".join(f"[{Path(p).name}]({Path(p).relative_to(run_dir).as_posix()})"
                                        for p in files.values() if Path(p).is_relative_to(run_dir))]
    return "\n".join(lines) + "\n"


def write_run_report(run, metrics: dict | None, seconds: float, files: dict[str, Path]) -> dict[str, Path]:
    """contact_sheet.png, loss.csv, loss_curve.png and summary.md of a finished TextTo3D run."""
    from ..world.prompts import resolve_prompt

    config, run_dir = run.config, run.run_dir
    try:
        scene = resolve_prompt(config.prompt)
    except ValueError:
        scene = None
    written = {"contact_sheet": save_image(run_dir / CONTACT_SHEET,
                                           contact_sheet_images(run.field, run.occupancy, config, scene), ncols=8)}
    written.update(write_loss_files(run_dir, run.losses, title=config.prompt))
    everything = {**files, **written}
    atomic_write_text(run_dir / SUMMARY, summary_markdown(config, run.step, seconds, metrics, everything, run_dir))
    written["summary"] = run_dir / SUMMARY
    return written
