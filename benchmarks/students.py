"""Students vs training-free solvers at equal NFE, on the embedded teacher: one command, one table.

    python benchmarks/students.py [--student DIR ...] [--samples-per-prompt 2] [--threads 2]

Rows: the teacher with DDIM-50; DDIM, DPM-Solver++(2M), DPM-Solver++(3M) and Heun at NFE 1, 2, 4
and 8; every student folder given (default: every folder under outputs/students/) at each NFE
it supports up to 8. NFE counts network evaluations: a guided teacher call costs 2 (cond and
uncond), so a training-free solver at NFE n takes n/2 guided steps (guidance 3, the teacher's
evaluation scale); at NFE 1 it takes one unguided step, the only way to spend one evaluation.
Heun's NFE is 2 (2 steps - 1) per guided step count, so it appears at the NFE it can reach.
Students distil guidance and are called unguided: NFE = their steps.

Columns: NFE, parameters, training minutes on this machine's cores (the student's own run,
including the teacher caches it made before training, e.g. KD's pairs; 0 for training-free
solvers), FD_world against real renders of the same prompts' scenes (world classifier features;
the real-vs-real floor is printed beside the table), prompt accuracy (category and colour, by the
world classifier) on seen prompts and on the held-out (colour, primitive) pairs, and samples per
second on this machine. Every row samples the same prompts with the same initial noise.

Writes benchmarks/results/students.json and students.md and students.png (one row of samples per
table row: the same 8 prompts and seeds).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from sds3d.diffusion.solvers import initial_noise, sample
from sds3d.distill.students import METHODS, load_student
from sds3d.eval.classifier import is_held_out_prompt, score_samples
from sds3d.eval.fd import fd_world
from sds3d.io import atomic_write_text, save_image
from sds3d.teachers import load_teacher
from sds3d.teachers.embedded import EMBEDDED_DDIM
from sds3d.world.dataset import RenderSpec, world_renders
from sds3d.world.prompts import resolve_prompt, world_txt_prompts

RESULTS = Path(__file__).resolve().parent / "results"
GUIDANCE = 3.0
SOLVER_NFES = (1, 2, 4, 8)


def solver_plan(solver: str, nfe: int) -> tuple[int, float] | None:
    """(steps, guidance) that spend exactly `nfe` evaluations with this solver, or None."""
    if nfe == 1:
        return (1, 1.0) if solver != "heun" else (1, 1.0)
    if nfe % 2:
        return None
    calls = nfe // 2
    if solver == "heun":  # 2 * steps - 1 calls
        return ((calls + 1) // 2, GUIDANCE) if calls % 2 == 1 else None
    return calls, GUIDANCE


def real_images(prompts: list[str], n: int, resolution: int, seed: int) -> torch.Tensor:
    """n real renders of the prompts' scenes (fresh cameras), the FD_world reference set."""
    scenes = list(dict.fromkeys(resolve_prompt(p) for p in prompts))
    per = max(2, -(-n // len(scenes)))
    real = world_renders(RenderSpec(resolution=resolution, views_per_scene=per, seed=seed), scenes=scenes)
    return real.float_images(torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))[:n])


def run_rows(teacher, prompts: list[str], noise: torch.Tensor, students: list[Path], batch: int, log) -> list[dict]:
    """Every row: (name, nfe, parameters, train minutes, sampler) -> images, timed."""
    rows = []
    params = sum(p.numel() for p in teacher.network.parameters())

    def timed(fn):
        images, start = [], time.perf_counter()
        for i in range(0, len(prompts), batch):
            cond = teacher.encode_prompt(prompts[i:i + batch])
            images.append(fn(cond, noise[i:i + batch]))
        seconds = time.perf_counter() - start
        return torch.cat(images), len(prompts) / seconds

    def ddim50(cond, x_T):
        return sample(teacher, cond, "ddim", 50, GUIDANCE, x_T=x_T, **EMBEDDED_DDIM).images

    images, sps = timed(ddim50)
    rows.append({"name": "teacher DDIM-50", "kind": "teacher", "nfe": 100, "parameters": params,
                 "train_minutes": 0.0, "images": images, "samples_per_second": sps})
    log(f"teacher DDIM-50: {sps:.1f} samples/s")
    for solver in ("ddim", "dpmpp-2m", "dpmpp-3m", "heun"):
        for nfe in SOLVER_NFES:
            plan = solver_plan(solver, nfe)
            if plan is None:
                continue
            steps, guidance = plan
            options = dict(EMBEDDED_DDIM) if solver == "ddim" else {}

            def run(cond, x_T, solver=solver, steps=steps, guidance=guidance, options=options):
                return sample(teacher, cond, solver, steps, guidance, x_T=x_T, **options).images

            images, sps = timed(run)
            rows.append({"name": f"{solver} ({steps} step{'s' * (steps > 1)}, guidance {guidance:g})", "kind": "solver",
                         "nfe": nfe, "parameters": params, "train_minutes": 0.0, "images": images,
                         "samples_per_second": sps})
            log(f"{rows[-1]['name']}: NFE {nfe}, {sps:.1f} samples/s")
    for folder in students:
        student, method, meta = load_student(folder, METHODS, teacher=teacher)
        nfes = [n for n in range(1, 9) if method.supported_nfe(n) is None]
        for nfe in nfes:
            def run(cond, x_T, nfe=nfe):
                return method.sample(student, cond, nfe, None, x_T=x_T).images

            images, sps = timed(run)
            # teacher caches and first stages (SFD's second stage) count too
            minutes = meta["train_minutes"] + meta.get("setup_minutes", 0.0) + meta.get("prior_minutes", 0.0)
            rows.append({"name": f"{meta['config']['method']} student ({folder.name})", "kind": "student", "nfe": nfe,
                         "parameters": meta["parameters"], "train_minutes": minutes, "images": images,
                         "samples_per_second": sps, "folder": str(folder)})
            log(f"{rows[-1]['name']}: NFE {nfe}, {sps:.1f} samples/s")
    return rows


def markdown(rows: list[dict], floor: float, header: str) -> str:
    lines = [header, "",
             "| row | NFE | parameters | train minutes | FD_world | category seen | colour seen | category held-out | colour held-out | samples/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['nfe']} | {r['parameters'] / 1e6:.2f}M | {r['train_minutes']:.1f} | "
                     f"{r['fd_world']:.2f} | {r['seen_category']:.3f} | {r['seen_color']:.3f} | "
                     f"{r['held_out_category']:.3f} | {r['held_out_color']:.3f} | {r['samples_per_second']:.1f} |")
    lines += ["", f"FD_world of real renders vs real renders (the floor): {floor:.2f}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", action="append", default=None, help="a student folder (repeatable)")
    parser.add_argument("--samples-per-prompt", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS), help="folder for students.json / .md / .png")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    students = [Path(s) for s in args.student] if args.student else sorted(
        p for p in Path("outputs/students").glob("*") if (p / "student.json").exists())
    log = lambda text: print(text, flush=True)
    teacher = load_teacher("embedded")
    prompts = [p for p in world_txt_prompts() for _ in range(args.samples_per_prompt)]
    noise = initial_noise(teacher, len(prompts), torch.Generator().manual_seed(0))
    start = time.time()
    rows = run_rows(teacher, prompts, noise, students, args.batch, log)
    real = real_images(prompts, len(prompts), teacher.resolution, seed=4)
    floor = fd_world(real_images(prompts, len(prompts), teacher.resolution, seed=5), real)
    held = torch.tensor([is_held_out_prompt(p) for p in prompts])
    for r in rows:
        scores = score_samples(r["images"], prompts)
        r.update({k: scores[k] for k in ("seen_category", "seen_color", "held_out_category", "held_out_color")})
        r["fd_world"] = fd_world(r["images"], real)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/students.py " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    header = (f"# Students vs training-free solvers at equal NFE (embedded teacher)\n\n`{command.strip()}` on {machine}; "
              f"{len(prompts)} samples per row ({args.samples_per_prompt} per prompt of prompts/world.txt, "
              f"{int(held.sum())} of them held-out pairs), same initial noise in every row; {time.time() - start:.0f} s.")
    atomic_write_text(out / "students.md", markdown(rows, floor, header))
    table = [{k: v for k, v in r.items() if k != "images"} for r in rows]
    atomic_write_text(out / "students.json", json.dumps({"command": command.strip(), "machine": machine,
                                                         "fd_world_real_vs_real": floor, "rows": table}, indent=2) + "\n")
    # One row of samples per table row: the first 8 distinct prompts, first sample of each.
    pick = [prompts.index(p) for p in list(dict.fromkeys(prompts))[:: max(1, len(set(prompts)) // 8)][:8]]
    save_image(out / "students.png", torch.cat([r["images"][pick] for r in rows]), ncols=len(pick))
    print(markdown(rows, floor, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
