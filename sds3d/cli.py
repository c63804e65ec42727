"""`sds3d` command line: generate | eval | export | teacher.

User mistakes (bad prompt, bad value, occupied folder) end with one `error: ...` line and exit
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (two numbers), got {text!r}") from None
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS

    parser = argparse.ArgumentParser(prog="sds3d", description="Text to 3D by score distillation, CPU first.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="optimize a NeRF for a prompt, export a mesh and a turntable")
    gen.add_argument("prompt", help='e.g. "a red cube" (see prompts/world.txt for what the embedded world knows)')
    gen.add_argument("--preset", default="cpu-fast", help=f"one of {', '.join(PRESETS)} (default cpu-fast)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--teacher", default=None,
                     help="oracle | embedded | PATH_OR_HUB_ID: the exact denoiser of world renders, the shipped network "
                          "(default), or a diffusers Stable Diffusion 1.x/2.x / DeepFloyd IF folder or hub id")
    gen.add_argument("--loss", default=None, help="sds (default), vsd (ProlificDreamer, trains a LoRA) or nfsd")
    gen.add_argument("--guidance-scale", type=float, default=None)
    gen.add_argument("--negative-prompt", default=None, help="unconditional text for network teachers")
    gen.add_argument("--render-resolution", type=int, default=None)
    gen.add_argument("--batch-size", type=int, default=None)
    gen.add_argument("--encoding-backend", default=None, help="auto (default: tcnn on CUDA, cpp on CPU), cpp, torch or tcnn")
    gen.add_argument("--device", default=None, help="auto (default: CUDA when there), cpu or cuda")
    gen.add_argument("--elevation-range", type=_range, default=None, metavar="LOW,HIGH")
    gen.add_argument("--distance-range", type=_range, default=None, metavar="LOW,HIGH")
    gen.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                     help="any config field (see a run's config.yaml), YAML values, repeatable: "
                          "--set lambda_z_variance=100 --set azimuth_range=[-90,90]")
    gen.add_argument("--out", default=None, help="run folder (default outputs/<prompt-slug>-<seed>)")
    gen.add_argument("--overwrite", action="store_true", help="start again; the old folder is kept as NAME.old-N")
    gen.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    gen.add_argument("--no-eval", action="store_true", help="skip scoring against the world's ground truth")
    gen.add_argument("--quiet", action="store_true")

    ev = sub.add_parser("eval", help="score a run folder against the world's ground truth; writes metrics.json")
    ev.add_argument("run_dir")

    ex = sub.add_parser("export", help="re-export a run's mesh and turntable from its last checkpoint")
    ex.add_argument("run_dir")

    add_teacher_parser(sub)
    return parser


def _load_run(run_dir: str):
    from .config import GenerateConfig
    from .io import RunFolderError
    from .pipelines.text_to_3d import TextTo3D

    path = Path(run_dir)
    if not (path / "config.yaml").exists() or not (path / "checkpoints" / "last.pt").exists():
        raise RunFolderError(f"{path} is not a finished run folder (needs config.yaml and checkpoints/last.pt)")
    run = TextTo3D(GenerateConfig.load(path / "config.yaml"), path)
    run._init_state()
    run._load_checkpoint()
    return run


def cmd_generate(args) -> int:
    from .config import ConfigError, GenerateConfig, make_config, parse_overrides
    from .pipelines.text_to_3d import default_run_dir, generate

    overrides = dict(prompt=args.prompt, seed=args.seed, steps=args.steps, teacher=args.teacher, loss=args.loss,
                     guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt, render_resolution=args.render_resolution,
                     batch_size=args.batch_size, encoding_backend=args.encoding_backend, device=args.device, elevation_range=args.elevation_range,
                     distance_range=args.distance_range)
    config = make_config(args.preset, explicit=parse_overrides(args.set), **overrides)
    out = Path(args.out) if args.out else default_run_dir(config)
    if args.resume and args.set:
        raise ConfigError("--set applies to new runs: a resumed run keeps the settings in its config.yaml (only --steps may extend it)")
    if args.resume and (out / "config.yaml").exists():
        # A resumed run keeps its saved settings; only --steps may extend it.
        config = GenerateConfig.load(out / "config.yaml")
        if args.steps is not None:
            config.steps = args.steps
        config.validate()
    result = generate(config, out=out, overwrite=args.overwrite, resume=args.resume, show_progress=not args.quiet,
                      evaluate=not args.no_eval)
    print(f"run folder: {result.run_dir}")
    for name, path in result.files.items():
        print(f"  {name}: {path}")
    if result.metrics:
        keys = ("iou_mean", "color_error_mean", "chamfer", "train_seconds")
        print("  metrics: " + ", ".join(f"{k}={result.metrics[k]:.4g}" for k in keys if k in result.metrics))
    return 0


def cmd_eval(args) -> int:
    run = _load_run(args.run_dir)
    metrics = run.evaluate()
    if metrics is None:
        raise ValueError(f"prompt {run.config.prompt!r} is not a scene of the embedded world: nothing to score against")
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_export(args) -> int:
    run = _load_run(args.run_dir)
    for name, path in run.export().items():
        print(f"{name}: {path}")
    return 0


# --- sds3d teacher ----------------------------------------------------------------------------

def add_teacher_parser(sub) -> None:
    """`sds3d teacher train|export|eval|sample`."""
    teacher = sub.add_parser("teacher", help="train, export, evaluate or sample a teacher")
    tsub = teacher.add_subparsers(dest="teacher_command", required=True)
    tr = tsub.add_parser("train", help="start or resume training in --out (resumes when --out has a checkpoint)")
    tr.add_argument("--out", required=True)
    tr.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this many minutes")
    tr.add_argument("--max-steps", type=int, default=None)
    tr.add_argument("--config", default=None, help="JSON file of TrainConfig fields (new runs; a resumed run keeps its own)")
    tr.add_argument("--threads", type=int, default=None)
    tr.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a TrainConfig field, e.g. --set batch_size=32 --set network.channels=[64,128,256]")
    ex = tsub.add_parser("export", help="write a run's EMA weights as a teacher folder (usable as --teacher DIR)")
    ex.add_argument("--run", required=True)
    where = ex.add_mutually_exclusive_group(required=True)
    where.add_argument("--dest", help="a new folder for the teacher (refused when it holds files)")
    where.add_argument("--into-package", action="store_true",
                       help="replace the teacher shipped inside the installed sds3d package (sds3d/assets/teacher)")
    ev = tsub.add_parser("eval", help="DDIM samples over prompts/world.txt scored by the world classifier")
    ev.add_argument("--teacher", default=None, help="teacher folder (default: the shipped one)")
    ev.add_argument("--samples-per-prompt", type=int, default=4)
    ev.add_argument("--steps", type=int, default=50)
    ev.add_argument("--guidance", type=float, default=3.0)
    ev.add_argument("--out", default=None, help="write metrics JSON and a sample grid here")
    ev.add_argument("--threads", type=int, default=None)
    sa = tsub.add_parser("sample", help="sample images from a teacher with a chosen solver; prints NFE and seconds")
    sa.add_argument("prompt")
    sa.add_argument("--teacher", default="embedded",
                    help="'embedded' (the shipped teacher), an embedded teacher folder, or a diffusers folder / hub id")
    sa.add_argument("--solver", default="ddim", help="ddim | dpmpp-2m | dpmpp-3m | heun (default ddim)")
    sa.add_argument("--steps", type=int, default=25)
    sa.add_argument("--guidance", type=float, default=None, help="CFG scale (default: 3 embedded, 7.5 diffusers)")
    sa.add_argument("--spacing", default=None,
                    help="timesteps: trailing | leading | linspace, or karras for heun (default: heun karras, others trailing)")
    sa.add_argument("--num-images", type=int, default=1)
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--negative-prompt", default=None)
    sa.add_argument("--out", default="outputs/teacher-samples", help="folder for the PNGs (existing files are never overwritten)")


def _config_from_args(args):
    from .training.teacher import TrainConfig

    data = {}
    if args.config:
        data = json.loads(Path(args.config).read_text())
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if key.startswith("network."):
            data.setdefault("network", TrainConfig().network.to_dict())[key.split(".", 1)[1]] = parsed
        else:
            data[key] = parsed
    if args.threads:
        data["threads"] = args.threads
    if not data:
        return None
    base = TrainConfig().to_dict()
    if "network" in data:
        base["network"].update(data.pop("network"))
    base.update(data)
    return TrainConfig.from_dict(base)


def cmd_teacher(args) -> int:
    """`sds3d teacher train|export|eval|sample`."""
    import torch

    from .io import atomic_write_text, save_image
    from .teachers.embedded import EmbeddedTeacher
    from .training.teacher import TrainConfig, evaluate_teacher, export_teacher, train_teacher

    if args.teacher_command == "train":
        config = _config_from_args(args)
        run = Path(args.out)
        if config is None and not (run / "train_config.json").exists():
            config = TrainConfig()
        result = train_teacher(run, config, max_minutes=args.max_minutes, max_steps=args.max_steps)
        print(json.dumps(result))
        return 0
    if args.teacher_command == "export":
        from .teachers.embedded import ASSET_DIR

        folder = export_teacher(args.run, ASSET_DIR if args.into_package else args.dest,
                                allow_existing=args.into_package)
        print(f"exported teacher to {folder}")
        return 0
    if args.teacher_command == "eval":
        if args.threads:
            torch.set_num_threads(args.threads)
        teacher = EmbeddedTeacher.load(args.teacher, autocast_bf16=True)
        metrics, images = evaluate_teacher(teacher, samples_per_prompt=args.samples_per_prompt, steps=args.steps,
                                           guidance=args.guidance)
        print(json.dumps(metrics, indent=2))
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "teacher_eval.json", json.dumps(metrics, indent=2) + "\n")
            save_image(out / "teacher_samples.png", images, ncols=16)
        return 0
    if args.teacher_command == "sample":
        paths, result, seconds = sample_teacher(args.prompt, args.teacher, args.solver, args.steps, args.guidance,
                                                args.num_images, args.seed, args.negative_prompt, args.out, args.spacing)
        print(f"wrote {len(paths)} image(s) to {Path(args.out)}: {args.solver}, {args.steps} steps, "
              f"NFE {result.nfe}, {seconds:.2f} s")
        return 0
    raise ValueError(args.teacher_command)


def sample_teacher(prompt: str, teacher="embedded", solver: str = "ddim", steps: int = 25, guidance: float | None = None,
                   num_images: int = 1, seed: int = 0, negative_prompt: str | None = None,
                   out: str | Path = "outputs/teacher-samples", spacing: str | None = None):
    """Sample `num_images` images of one prompt and write them as PNGs into `out`, refusing to overwrite.

    Returns (paths, SampleResult, seconds of sampling). `teacher` is a Teacher or a `load_teacher` spec;
    guidance defaults to 3 for the embedded teacher and 7.5 otherwise; spacing to the solver's own
    default. The embedded teacher's DDIM runs with its evaluation settings (clamped x0)."""
    import math
    import time

    import torch

    from .diffusion.solvers import check_solver, sample
    from .io import save_image, slugify
    from .teachers import load_teacher
    from .teachers.embedded import EMBEDDED_DDIM, EmbeddedTeacher

    if not str(prompt).strip():
        raise ValueError("prompt is empty: give the text to sample, e.g. 'a red cube'")
    check_solver(solver)
    if num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {num_images}")
    if guidance is not None and not math.isfinite(guidance):
        raise ValueError(f"--guidance must be a finite number, got {guidance}")
    out = Path(out)
    names = [f"{slugify(prompt)}-{solver}-{steps}steps-seed{seed}-{i}.png" for i in range(num_images)]
    taken = [n for n in names if (out / n).exists()]
    if taken:
        raise ValueError(f"{out} already holds {taken[0]} ({len(taken)} of {len(names)} files): "
                         "choose another --out or --seed; nothing was written")
    if isinstance(teacher, str):
        teacher = load_teacher(teacher)
    embedded = isinstance(teacher, EmbeddedTeacher)
    guidance = (3.0 if embedded else 7.5) if guidance is None else float(guidance)
    options = dict(EMBEDDED_DDIM) if embedded and solver == "ddim" else {}
    if spacing is not None:
        options["spacing"] = spacing
    cond = teacher.encode_prompt([prompt] * num_images,
                                 None if negative_prompt is None else [negative_prompt] * num_images)
    start = time.perf_counter()
    result = sample(teacher, cond, solver, steps, guidance, torch.Generator().manual_seed(seed), **options)
    seconds = time.perf_counter() - start
    paths = [save_image(out / name, image) for name, image in zip(names, result.images)]
    return paths, result, seconds


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"generate": cmd_generate, "eval": cmd_eval, "export": cmd_export, "teacher": cmd_teacher}
    try:
        return handlers[args.command](args)
    except (ValueError, RuntimeError, FloatingPointError, OSError) as error:
        from .io import RunFolderError

        from .teachers.diffusers import TeacherLoadError
        from .teachers.embedded import TeacherWeightsError

        user_errors = (ValueError, RunFolderError, TeacherWeightsError, TeacherLoadError, FloatingPointError,
                       FileNotFoundError, PermissionError)
        if not isinstance(error, user_errors):
            raise
        print(f"error: {str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
