"""`sds3d` command line: generate | eval | export.

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

    from .teachers.training import add_teacher_parser

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


def cmd_teacher(args) -> int:
    from .teachers.training import cmd_teacher as run_teacher_command

    return run_teacher_command(args)


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
