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
    gen.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default cpu-fast)")
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
    gen.add_argument("--precision", default=None,
                     help="the embedded teacher's CPU compute: auto (default: fp32 in this loop, see README "
                          "'Precision'), fp32 or bf16 (autocast)")
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
    ex.add_argument("--format", default=None, metavar="glb,obj,ply",
                    help="comma-separated mesh formats (default: the run's export_formats, all three)")
    ex.add_argument("--resolution", type=int, default=None,
                    help="marching-cubes grid points per side (default: the run's export_resolution, 128 at cpu-fast)")
    ex.add_argument("--faces", type=int, default=None, help="triangle budget of the decimated mesh (default 20000)")
    ex.add_argument("--texture-size", type=int, default=None, help="texture side in texels, a power of two (default 1024)")
    ex.add_argument("--threshold", default=None, metavar="auto|FLOAT",
                    help="iso-surface density, or auto: the level whose silhouette matches the NeRF's opacity (default)")
    ex.add_argument("--texture", default=None, metavar="albedo|none",
                    help="albedo: UV atlas and baked PNG texture (default); none: vertex colours only, as before")

    add_teacher_parser(sub)
    add_student_parsers(sub)
    add_app_parser(sub)
    add_batch_parser(sub)
    return parser


def _load_run(run_dir: str):
    """A run folder's field as its checkpoint holds it, for `eval` and `export`. Nothing is written
    here; a missing, damaged or unsafe config.yaml or last.pt is one error line naming the file
    (GenerateConfig.load, pipelines.text_to_3d.read_checkpoint: weights_only=True)."""
    from .config import GenerateConfig
    from .io import RunFolderError
    from .pipelines.text_to_3d import TextTo3D

    path = Path(run_dir)
    if not (path / "config.yaml").is_file() or not (path / "checkpoints" / "last.pt").is_file():
        raise RunFolderError(f"{path} is not a finished run folder (needs config.yaml and checkpoints/last.pt)")
    run = TextTo3D(GenerateConfig.load(path / "config.yaml"), path)
    run._init_state()
    run._load_checkpoint()
    return run


def cmd_generate(args) -> int:
    from .config import ConfigError, make_config, parse_overrides
    from .pipelines.text_to_3d import default_run_dir, generate, resumed_config

    overrides = dict(prompt=args.prompt, seed=args.seed, steps=args.steps, teacher=args.teacher, loss=args.loss,
                     guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt, render_resolution=args.render_resolution,
                     batch_size=args.batch_size, encoding_backend=args.encoding_backend, device=args.device, elevation_range=args.elevation_range,
                     distance_range=args.distance_range, precision=args.precision)
    config = make_config(args.preset or "cpu-fast", explicit=parse_overrides(args.set), **overrides)
    out = Path(args.out) if args.out else default_run_dir(config)
    if args.resume and args.set:
        raise ConfigError("--set applies to new runs: a resumed run keeps the settings in its config.yaml (only --steps may extend it)")
    if args.resume:
        # A resumed run keeps its config.yaml: --steps may extend it and --device, --encoding-backend,
        # --precision move it; any other flag must repeat the run's own value (the prompt included), or
        # the resume is refused (--preset too, when given).
        asked = {name: value for name, value in overrides.items() if value is not None}
        if args.preset is not None:
            asked["preset"] = args.preset
        config = resumed_config(out, asked)
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


def _export_overrides(args) -> dict:
    """The `export` flags given, as GenerateConfig fields (checked by GenerateConfig.validate)."""
    threshold = args.threshold
    if threshold is not None and threshold != "auto":
        try:
            threshold = float(threshold)
        except ValueError:
            raise ValueError(f"--threshold must be auto or a density (a number > 0), got {threshold!r}") from None
    formats = None if args.format is None else tuple(f.strip() for f in args.format.split(",") if f.strip())
    values = {"export_formats": formats, "export_resolution": args.resolution, "export_faces": args.faces,
              "export_texture_size": args.texture_size, "mesh_threshold": threshold, "export_texture": args.texture}
    return {key: value for key, value in values.items() if value is not None}


def cmd_export(args) -> int:
    import dataclasses

    overrides = _export_overrides(args)
    run = _load_run(args.run_dir)
    run.config = dataclasses.replace(run.config, **overrides).validate()
    for name, path in run.export().items():
        print(f"{name}: {path}")
    return 0


# --- sds3d teacher ----------------------------------------------------------------------------

PRECISION_HELP = "auto (default: bf16 autocast where the CPU runs bf16 natively, else fp32), fp32 or bf16"


def add_teacher_parser(sub) -> None:
    """`sds3d teacher train|export|eval|sample`."""
    teacher = sub.add_parser("teacher", help="train, export, evaluate or sample a teacher")
    tsub = teacher.add_subparsers(dest="teacher_command", required=True)
    tr = tsub.add_parser("train", help="start or resume training in --out (resumes when --out has a checkpoint)")
    tr.add_argument("--out", required=True)
    tr.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this many minutes")
    tr.add_argument("--max-steps", type=int, default=None)
    tr.add_argument("--config", default=None,
                    help="JSON or YAML file of TrainConfig settings, e.g. a run's train_config.json, or a teacher folder's "
                         "config.json (the settings it was trained with: with --set init_from=embedded, a fine-tune); "
                         "new runs only (a resumed run keeps its own); unknown or mistyped settings are refused")
    tr.add_argument("--threads", type=int, default=None)
    tr.add_argument("--precision", default=None,
                    help="auto (new runs' default: bf16 autocast where the CPU runs bf16 natively, else fp32), fp32 "
                         "or bf16; a resumed run keeps its own unless this is given")
    tr.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="any TrainConfig setting (see a run's train_config.json), YAML values, dotted names for the "
                         "network, repeatable: --set batch_size=32 --set lr=5e-4 --set network.channels=[64,128,256]")
    ex = tsub.add_parser("export", help="write a run's EMA weights as a teacher folder (usable as --teacher DIR)")
    ex.add_argument("--run", required=True)
    where = ex.add_mutually_exclusive_group(required=True)
    where.add_argument("--dest", help="a new folder for the teacher (refused when it holds files)")
    where.add_argument("--into-package", action="store_true",
                       help="replace the teacher shipped inside the installed sds3d package (sds3d/assets/teacher)")
    ev = tsub.add_parser("eval", help="DDIM samples over prompts/world.txt scored by the world classifier; "
                                      "writes eval.json and regenerates MODEL_CARD.md")
    ev.add_argument("--teacher", default=None,
                    help="teacher folder written by `sds3d teacher export` (default, or 'embedded': the shipped one)")
    ev.add_argument("--samples-per-prompt", type=int, default=4)
    ev.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    ev.add_argument("--guidance", type=float, default=3.0)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--threads", type=int, default=None)
    ev.add_argument("--precision", default="auto", help=PRECISION_HELP)
    dest = ev.add_mutually_exclusive_group()
    dest.add_argument("--out", default=None,
                      help="write eval.json, a MODEL_CARD.md and eval_samples.png here, leaving the teacher folder as it is "
                           "(default: into the teacher folder; the shipped teacher needs --out or --write-into-teacher)")
    dest.add_argument("--write-into-teacher", action="store_true",
                      help="write eval.json and MODEL_CARD.md into the teacher folder, the shipped one included")
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
    sa.add_argument("--precision", default="auto", help=PRECISION_HELP + " (embedded teachers)")
    sa.add_argument("--out", default="outputs/teacher-samples", help="folder for the PNGs (existing files are never overwritten)")


def _config_from_args(args):
    """The TrainConfig of `teacher train`: defaults < --config file < --set items < --threads, or None
    when none is given (a resumed run then keeps its train_config.json). Checked strictly and
    validated here, before the run folder is touched; --set is the one syntax of every command
    (sds3d.settings.parse_set_items: YAML values, dotted keys for the network)."""
    import yaml

    from .settings import ConfigError, merge_settings, parse_set_items
    from .teachers import EMBEDDED_FORMAT
    from .training.teacher import TrainConfig

    data = {}
    if args.config:
        text = Path(args.config).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as error:
                raise ConfigError(f"cannot read --config {args.config}: not JSON or YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {args.config} is not a mapping of TrainConfig setting: value")
        if data.get("format") == EMBEDDED_FORMAT:  # a teacher folder's config.json: the settings it was trained with
            data = (data.get("training") or {}).get("config")
            if not isinstance(data, dict):
                raise ConfigError(f"--config {args.config} is a teacher's config.json without its training settings "
                                  "(\"training\": {\"config\": ...}): give a train_config.json instead")
    data = merge_settings(data, parse_set_items(args.set))
    if args.threads:
        data["threads"] = args.threads
    if not data:
        return None
    return TrainConfig.from_dict(data).validate()


def cmd_teacher(args) -> int:
    """`sds3d teacher train|export|eval|sample`."""
    import torch

    from .io import atomic_write_text, save_image
    from .precision import check_precision, describe_precision, resolve_precision
    from .teachers.embedded import EmbeddedTeacher
    from .training.teacher import TrainConfig, evaluate_teacher, export_teacher, train_teacher

    if args.teacher_command == "train":
        config = _config_from_args(args)
        run = Path(args.out)
        if args.precision is not None:
            check_precision(args.precision, "--precision")
            if config is None:  # a resumed run keeps its settings but this one
                saved = run / "train_config.json"
                config = TrainConfig.from_dict(json.loads(saved.read_text())) if saved.exists() else TrainConfig()
            config.precision = args.precision
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
        import os
        import shlex

        from .teachers import SHIPPED_TEACHERS, embedded_folder, is_embedded_teacher_folder
        from .training.teacher import composition_eval_prompts, evaluate_compositions, evaluate_views, write_model_card

        for name in ("samples_per_prompt", "steps", "threads"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        check_precision(args.precision, "--precision")
        folder = embedded_folder(args.teacher or "embedded")
        if not is_embedded_teacher_folder(folder):
            raise ValueError(f"{folder} is not an embedded teacher folder (no config.json of `sds3d teacher export`)")
        shipped = any(folder.resolve() == path.resolve() for path in SHIPPED_TEACHERS.values())
        if args.out:
            out = Path(args.out)
            if out.resolve() != folder.resolve() and is_embedded_teacher_folder(out):
                raise ValueError(f"--out {out} is another teacher's folder: its card would describe this one; "
                                 "choose an empty folder")
        elif shipped and not args.write_into_teacher:
            raise ValueError(f"the shipped teacher's folder {folder} is part of the package: give --out DIR, "
                             "or --write-into-teacher to replace its eval.json and MODEL_CARD.md")
        else:
            out = folder
        if args.threads:
            torch.set_num_threads(args.threads)
        # The command that reproduces eval.json, every setting spelled out (also when defaulted).
        words = ["sds3d", "teacher", "eval"] + (["--teacher", args.teacher] if args.teacher else [])
        words += ["--samples-per-prompt", str(args.samples_per_prompt), "--steps", str(args.steps),
                  "--guidance", f"{args.guidance:g}", "--seed", str(args.seed)]
        words += (["--threads", str(args.threads)] if args.threads else [])
        words += (["--precision", args.precision] if args.precision != "auto" else [])  # eval.json has the one used
        words += ["--out", args.out] if args.out else ["--write-into-teacher"] if args.write_into_teacher else []
        env = [f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if k in os.environ]
        # bf16 autocast only where the CPU runs it natively (issue #18: 28x slower than fp32 elsewhere)
        teacher = EmbeddedTeacher.load(folder, autocast_bf16=resolve_precision(args.precision) == "bf16")
        print(describe_precision(args.precision), file=sys.stderr, flush=True)
        record, images = evaluate_teacher(teacher, samples_per_prompt=args.samples_per_prompt, steps=args.steps,
                                          guidance=args.guidance, seed=args.seed)
        record = {"command": shlex.join(env + words), **record}
        record["views"], _ = evaluate_views(teacher, steps=min(args.steps, 25), guidance=args.guidance, seed=args.seed)
        print(f"views: silhouette IoU {record['views']['silhouette_iou']:.3f} against the asked camera, "
              f"{record['views']['silhouette_iou_turned']:.3f} against a quarter turn", file=sys.stderr, flush=True)
        if teacher.meta.get("compositions"):  # a teacher of two-object scenes: their own measure
            config = TrainConfig.from_dict((teacher.meta.get("training") or {}).get("config") or {})
            seen, unseen = composition_eval_prompts(config)
            record["compositions"] = {"steps": min(args.steps, 25), "guidance": args.guidance}
            for name, prompts in (("seen", seen), ("unseen", unseen)):
                part, _ = evaluate_compositions(teacher, prompts, steps=min(args.steps, 25), guidance=args.guidance,
                                                seed=args.seed)
                record["compositions"][name] = part
                print(f"two-object scenes ({name}): bound {part['bound']}, silhouette IoU {part['silhouette_iou']}",
                      file=sys.stderr, flush=True)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "eval.json", json.dumps(record, indent=2) + "\n")
        written = [out / "eval.json"]
        if out.resolve() != folder.resolve():
            # Beside a separate --out only (not into a teacher folder or the package): the first
            # sample of every prompt, 13 prompts a row, for a look at what was scored.
            written.append(save_image(out / "eval_samples.png", images[::args.samples_per_prompt], ncols=13))
        written.append(write_model_card(folder, out))
        print(json.dumps(record["metrics"], indent=2), flush=True)
        print(f"wrote {', '.join(str(p) for p in written)}", flush=True)
        return 0
    if args.teacher_command == "sample":
        paths, result, seconds = sample_teacher(args.prompt, args.teacher, args.solver, args.steps, args.guidance,
                                                args.num_images, args.seed, args.negative_prompt, args.out, args.spacing,
                                                precision=args.precision)
        print(f"wrote {len(paths)} image(s) to {Path(args.out)}: {args.solver}, {args.steps} steps, "
              f"NFE {result.nfe}, {seconds:.2f} s")
        return 0
    raise ValueError(args.teacher_command)


def sample_teacher(prompt: str, teacher="embedded", solver: str = "ddim", steps: int = 25, guidance: float | None = None,
                   num_images: int = 1, seed: int = 0, negative_prompt: str | None = None,
                   out: str | Path = "outputs/teacher-samples", spacing: str | None = None, precision: str = "auto"):
    """Sample `num_images` images of one prompt and write them as PNGs into `out`, refusing to overwrite.

    Returns (paths, SampleResult, seconds of sampling). `teacher` is a Teacher or a `load_teacher` spec,
    loaded to compute in `precision` (`sds3d.precision.resolve_precision`; embedded teachers);
    guidance defaults to 3 for the embedded teacher and 7.5 otherwise; spacing to the solver's own
    default. The embedded teacher's DDIM runs with its evaluation settings (clamped x0)."""
    import math
    import time

    import torch

    from .diffusion.solvers import check_solver, sample
    from .io import save_image, slugify
    from .precision import check_precision, describe_precision, resolve_precision
    from .teachers import load_teacher, teacher_kind
    from .teachers.embedded import EMBEDDED_DDIM, EmbeddedTeacher

    if not str(prompt).strip():
        raise ValueError("prompt is empty: give the text to sample, e.g. 'a red cube'")
    check_solver(solver)
    check_precision(precision, "--precision")
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
        embedded_spec = teacher_kind(teacher) == "embedded"
        teacher = load_teacher(teacher, autocast_bf16=resolve_precision(precision, warn=embedded_spec) == "bf16")
        if embedded_spec:
            print(describe_precision(precision), file=sys.stderr, flush=True)
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


# --- sds3d distill / sample ---------------------------------------------------------------------

def add_student_parsers(sub) -> None:
    """`sds3d distill` (train a few-step image student) and `sds3d sample --student` (use one)."""
    from .distill.students import METHODS

    di = sub.add_parser("distill", help="train a few-step image student of a teacher (SFD, progressive, consistency, KD, DMD, Adv-KD)")
    di.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    di.add_argument("--teacher", default="embedded", help="embedded (default), an exported teacher folder, or a diffusers folder / hub id")
    di.add_argument("--nfe", type=int, required=True, help="network evaluations per sample of the student")
    di.add_argument("--steps", type=int, default=None, help="optimizer steps")
    di.add_argument("--batch", type=int, default=None, help="batch size")
    di.add_argument("--seed", type=int, default=None)
    di.add_argument("--out", default=None, help="run folder (default outputs/students/<method>-nfe<N>-<seed>)")
    di.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    di.add_argument("--overwrite", action="store_true", help="start again; the old folder is kept as NAME.old-N")
    di.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this many minutes")
    di.add_argument("--precision", default=None,
                    help="teacher and student compute on the CPU (embedded teachers): auto (new runs' default: bf16 "
                         "autocast where the CPU runs bf16 natively, else fp32), fp32 or bf16; a resumed run keeps "
                         "its own unless this is given")
    di.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a student setting (YAML value), e.g. --set lr=1e-4 --set options.sub_steps=3")
    sa = sub.add_parser("sample", help="sample images from a trained student into a PNG grid")
    sa.add_argument("prompt")
    sa.add_argument("--student", required=True, help="a folder written by sds3d distill")
    sa.add_argument("--nfe", type=int, default=None, help="network evaluations (default: the student's own)")
    sa.add_argument("--n", type=int, default=16, help="number of images")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--precision", default="auto", help=PRECISION_HELP + " (embedded teachers)")
    sa.add_argument("--out", default=None, help="PNG file (default outputs/student-samples/<slug>-<method>-nfe<N>-seed<S>.png)")


def cmd_distill(args) -> int:
    from .config import parse_overrides
    from .distill.students import METHODS, StudentConfig, StudentRun
    from .io import RunFolderError, prepare_run_folder
    from .distill.students.common import STUDENT_FILE, make_accelerator, read_student_folder

    if args.method not in METHODS:
        raise ValueError(f"unknown method {args.method!r}: allowed are {', '.join(METHODS)}")
    values = {"method": args.method, "teacher": args.teacher, "nfe": args.nfe}
    for key, value in (("steps", args.steps), ("batch_size", args.batch), ("seed", args.seed),
                       ("precision", args.precision)):
        if value is not None:
            values[key] = value
    for key, value in parse_overrides(args.set).items():
        if key.startswith("options."):
            values.setdefault("options", {})[key.split(".", 1)[1]] = value
        else:
            values[key] = value
    config = StudentConfig.from_dict(values)
    out = Path(args.out) if args.out else Path("outputs/students") / f"{config.method}-nfe{config.nfe}-{config.seed}"
    if args.resume:
        if not (out / STUDENT_FILE).exists():
            raise RunFolderError(f"cannot resume: {out} is not a student run (no {STUDENT_FILE})")
        saved = StudentConfig.from_dict(json.loads((out / STUDENT_FILE).read_text())["config"])
        if args.steps is not None:
            saved.steps = args.steps
        if args.precision is not None:  # a machine's choice, not the model's: may change on resume
            saved.precision = args.precision
        config = saved
    config.validate()
    method_cls = METHODS[config.method]
    why = method_cls.supported_nfe(config.nfe)
    if why:  # before any folder is made
        raise ValueError(f"method {config.method} cannot make a {config.nfe}-NFE student: {why}")
    method_cls(config)  # checks the method's options
    accelerator = make_accelerator()  # several processes under `accelerate launch`, else None
    main = accelerator is None or accelerator.is_main_process
    fresh = not out.exists()
    if main:
        prepare_run_folder(out, overwrite=args.overwrite, resume=args.resume)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    try:
        # flush: progress reaches a file or a pipe as it happens
        log = (lambda text: print(text, flush=True)) if main else (lambda *a: None)
        run = StudentRun(out, config, method_cls, log=log, accelerator=accelerator)
    except BaseException:
        if main and fresh and out.exists() and not any(out.iterdir()):
            out.rmdir()  # a failed start leaves nothing behind
        raise
    result = run.train(max_minutes=args.max_minutes)
    if main:
        read_student_folder(out)
        print(f"student folder: {out} ({result['step']} steps, {result['reason']}, {result['train_minutes']:.1f} min)")
    return 0


def cmd_sample(args) -> int:
    import time

    import torch

    from .distill.students import METHODS, load_student
    from .io import save_image, slugify
    from .precision import check_precision

    if not args.prompt.strip():
        raise ValueError("prompt is empty: give the text to sample, e.g. 'a red cube'")
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    check_precision(args.precision, "--precision")
    student, method, meta = load_student(args.student, METHODS, precision=args.precision)
    nfe = args.nfe or meta["nfe"]
    why = method.supported_nfe(nfe)
    if why:
        raise ValueError(f"this {meta['config']['method']} student cannot sample with {nfe} NFE: {why}")
    name = f"{slugify(args.prompt)}-{meta['config']['method']}-nfe{nfe}-seed{args.seed}.png"
    out = Path(args.out) if args.out else Path("outputs/student-samples") / name
    if out.exists():
        raise ValueError(f"{out} exists: choose another --out or --seed; nothing was written")
    cond = student.teacher.encode_prompt([args.prompt] * args.n)
    start = time.perf_counter()
    result = method.sample(student, cond, nfe, torch.Generator().manual_seed(args.seed))
    seconds = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(out, result.images, ncols=min(args.n, 8))
    print(f"wrote {out}: {args.n} image(s), NFE {result.nfe}, {seconds:.2f} s")
    return 0


# --- sds3d app -----------------------------------------------------------------------------------

def add_app_parser(sub) -> None:
    """`sds3d app`: the Gradio web app (sds3d/app), on the loopback interface unless --host says otherwise."""
    ap = sub.add_parser("app", help="serve the web app: generate, watch, cancel/resume, view and download runs")
    ap.add_argument("--host", default="127.0.0.1",
                    help="interface to bind (default 127.0.0.1: this machine only; 0.0.0.0 serves the network)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="also ask Gradio for a public share link (needs internet)")
    ap.add_argument("--out-root", default="outputs",
                    help="folder of the run folders (default outputs); the app serves files from here only")
    ap.add_argument("--max-runs", type=int, default=1, help="optimizations at a time (default 1); others queue")


def cmd_app(args) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_runs < 1:
        raise ValueError(f"--max-runs must be at least 1, got {args.max_runs}")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("the web app needs gradio: pip install 'sds3d[app]'") from None
    from .app import launch

    print(f"sds3d app: serving {Path(args.out_root).resolve()} on http://{args.host}:{args.port} (Ctrl-C stops)",
          flush=True)
    launch(host=args.host, port=args.port, share=args.share, out_root=args.out_root, max_runs=args.max_runs)
    return 0

# --- sds3d batch ---------------------------------------------------------------------------------

def add_batch_parser(sub) -> None:
    """`sds3d batch PROMPTS_FILE`: one generate run per line (sds3d/pipelines/batch.py)."""
    from .config import PRESETS

    ba = sub.add_parser("batch", help="generate one asset per line of a prompt file, resumable, locally or on Ray",
                        description="Lines: 'PROMPT' or 'PROMPT | FIELD=VALUE ...' (generate's --set names, plus "
                                    "preset); # comments and blank lines are ignored. Every line is checked "
                                    "before any run starts.")
    ba.add_argument("prompts_file", help="e.g. prompts/world-smoke.txt")
    ba.add_argument("--out", default=None, help="batch folder (default outputs/batches/<file name>)")
    ba.add_argument("--workers", type=int, default=1, help="lines run at a time (default 1)")
    ba.add_argument("--threads", type=int, default=None,
                    help="CPU threads per run (default: this machine's cores divided by --workers)")
    ba.add_argument("--preset", default="cpu-fast", help=f"one of {', '.join(PRESETS)} (default cpu-fast; a line may set preset=)")
    ba.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                    help="run each line as a Ray task: on the cluster at ADDRESS (HOST:PORT, ray://HOST:PORT or auto), "
                         "or on a local Ray instance when no address is given")
    ba.add_argument("--resume", action="store_true",
                    help="finish the batch in --out: skip done lines, continue interrupted and failed ones")
    ba.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a setting for every line (a line's own settings win), as generate --set")


def cmd_batch(args) -> int:
    from .config import PRESETS, parse_overrides
    from .pipelines.batch import run_batch, summary_table

    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}: allowed are {', '.join(PRESETS)}")
    log = lambda text: print(text, flush=True)  # noqa: E731  (progress reaches a file or a pipe as it happens)
    try:
        result = run_batch(args.prompts_file, out=args.out, workers=args.workers, resume=args.resume,
                           preset=args.preset, set_items=parse_overrides(args.set), threads=args.threads,
                           ray_address=None if args.ray == "local" else args.ray, use_ray=args.ray is not None, log=log)
    except KeyboardInterrupt:
        print("interrupted: running lines stopped with a checkpoint; finish with: sds3d batch "
              f"{args.prompts_file} --resume" + (f" --out {args.out}" if args.out else ""), file=sys.stderr)
        return 130
    print(summary_table(result.records))
    print(f"batch folder: {result.batch_dir} (index.html, manifest.jsonl)")
    if result.interrupted:
        print("interrupted: stopped lines kept their checkpoint; finish with: sds3d batch "
              f"{args.prompts_file} --resume" + (f" --out {args.out}" if args.out else ""), file=sys.stderr)
        return 130
    if result.failed:
        print(f"{len(result.failed)} of {len(result.records)} line(s) failed: see the table above; "
              "rerun them with --resume", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from .threads import configure_openmp

    configure_openmp()  # before torch loads: OpenMP threads that yield a shared core (sds3d/threads.py)
    args = build_parser().parse_args(argv)
    handlers = {"generate": cmd_generate, "eval": cmd_eval, "export": cmd_export, "teacher": cmd_teacher,
                "distill": cmd_distill, "sample": cmd_sample, "app": cmd_app, "batch": cmd_batch}
    try:
        return handlers[args.command](args)
    except (ValueError, RuntimeError, FloatingPointError, OSError) as error:
        from .io import RunFolderError

        from .pipelines.batch import BatchError
        from .teachers.diffusers import TeacherLoadError
        from .teachers.embedded import TeacherWeightsError

        user_errors = (ValueError, RunFolderError, TeacherWeightsError, TeacherLoadError, FloatingPointError,
                       FileNotFoundError, PermissionError, BatchError)
        if not isinstance(error, user_errors):
            raise
        print(f"error: {str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
