"""Training time against quality of `sds3d generate` at cpu-fast, one lever at a time.

    python benchmarks/generate_speed.py [--prompts "a red cube" "a house"] [--variants NAME ...] [--seeds 0]

Each variant is cpu-fast with a few settings changed (the levers of issue 17: step count, coarse-to-fine
resolution, samples per ray, batch size, regularizers). Every run trains alone in this process, one
after the other (two runs side by side on 2 cores would time each other), and is scored against the
world's ground truth by `generate` itself (metrics.json: IoU, colour error, speckle, train_seconds).
Runs live under outputs/generate_speed/DAY/VARIANT/PROMPT-sSEED (DAY: today's date, or --runs); a run
with a metrics.json is reused, so the command resumes within a day, while another day (perhaps another
machine, or the same one under other load) measures every variant again, cpu-fast included: the time
ratios compare runs of one machine and one sitting. Writes benchmarks/results/generate_speed.{json,md}:
per variant the mean over prompts and seeds, and the training time as a ratio to cpu-fast's on the
same machine in the same table; the md names the settings cpu-fast's runs were made with.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

from sds3d.threads import configure_openmp, openmp_waiting

configure_openmp()

import torch  # noqa: E402

from sds3d.config import GenerateConfig, make_config  # noqa: E402
from sds3d.io import atomic_write_text  # noqa: E402
from sds3d.pipelines.text_to_3d import generate  # noqa: E402
from sds3d.precision import read_cpuinfo  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = Path("outputs") / "generate_speed"

# name -> settings changed from cpu-fast (800 steps, 64 px renders, 48 samples a ray, batch 2)
VARIANTS: dict[str, dict] = {
    "cpu-fast": {},
    "700 steps": {"steps": 700},
    "600 steps": {"steps": 600},
    "500 steps": {"steps": 500},
    "coarse 32 px first half": {"coarse_resolution": 32},
    "coarse 32 px first half, 600 steps": {"coarse_resolution": 32, "steps": 600},
    "32 samples a ray": {"num_samples": 32},
    "batch 1, 1200 steps": {"batch_size": 1, "steps": 1200},
    "albedo smoothness 1": {"lambda_albedo_smooth": 1.0},
    "albedo smoothness 10": {"lambda_albedo_smooth": 10.0},
    "hash grid max resolution 256": {"max_resolution": 256},
    "hash grid 16-128, 8 levels": {"n_levels": 8, "max_resolution": 128},
    "48 px renders": {"render_resolution": 48},
    "hash grid 16-512, 12 levels": {"n_levels": 12, "max_resolution": 512},
    "lr decay 0.1": {"lr_decay": 0.1},
    "lr decay 0.1, 600 steps": {"lr_decay": 0.1, "steps": 600},
    "lr decay 0.3": {"lr_decay": 0.3},
    "lr decay 0.1 over the last quarter": {"lr_decay": 0.1, "lr_decay_start": 0.75},
    "albedo from the 3 coarsest levels": {"albedo_levels": 3},
    "albedo from the 4 coarsest levels": {"albedo_levels": 4},
    "early ray termination 0.01": {"early_stop_eps": 0.01},
}
SCORES = ("iou_mean", "color_error_mean", "speckle", "train_seconds")


def run_one(runs: Path, variant: str, prompt: str, seed: int) -> dict:
    folder = runs / variant.replace(" ", "-").replace(",", "") / f"{prompt.replace(' ', '-')}-s{seed}"
    metrics_path = folder / "metrics.json"
    if not metrics_path.exists():
        config = make_config("cpu-fast", prompt=prompt, seed=seed, explicit=dict(VARIANTS[variant]))
        generate(config, out=folder, overwrite=folder.exists(), show_progress=False)
    metrics = json.loads(metrics_path.read_text())
    return {"variant": variant, "prompt": prompt, "seed": seed, "run": str(folder), **{k: metrics.get(k) for k in SCORES}}


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", nargs="*", default=["a red cube", "a house"])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--runs", default=time.strftime("%Y-%m-%d"),
                        help="folder under outputs/generate_speed for the runs (default: today's date)")
    args = parser.parse_args(argv)
    start = time.time()
    variants = list(dict.fromkeys(["cpu-fast", *args.variants]))  # the reference is always measured
    rows = []
    for variant in variants:
        for prompt in args.prompts:
            for seed in args.seeds:
                rows.append(run_one(RUNS / args.runs, variant, prompt, seed))
                r = rows[-1]
                print(f"{variant:38s} {prompt:12s} seed {seed}: IoU {r['iou_mean']:.3f} colour {r['color_error_mean']:.3f} "
                      f"speckle {r['speckle'] or float('nan'):.4f} {r['train_seconds']:.1f} s", flush=True)
    summary = {}
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        summary[variant] = {k: mean(r[k] for r in mine) for k in SCORES}
    reference = summary["cpu-fast"]["train_seconds"]
    # what cpu-fast was when its runs were made (the preset's defaults change; reused runs keep theirs)
    saved = GenerateConfig.load(Path(next(r["run"] for r in rows if r["variant"] == "cpu-fast")) / "config.yaml")
    grid = ", ".join(f"{key} {getattr(saved, key)}" for key in ("steps", "n_levels", "max_resolution", "albedo_levels",
                                                                "render_resolution"))
    command = "python benchmarks/generate_speed.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    cpu, _ = read_cpuinfo()
    machine = (f"{cpu}, {torch.get_num_threads()} threads ({openmp_waiting()}), torch {torch.__version__}, "
               f"python {platform.python_version()}")
    lines = ["# Training time against quality of `sds3d generate` (cpu-fast, one lever at a time)", "",
             f"`{command.strip()}` on {machine}; {time.time() - start:.0f} s. Means over "
             f"{', '.join(repr(p) for p in args.prompts)}, seeds {args.seeds}; every run alone on the machine; runs in "
             f"{RUNS / args.runs} (a run already there is reused, so the seconds above count only new training). "
             f"cpu-fast in these runs: {grid}.", "",
             "| variant | settings | IoU | colour error | albedo speckle | train s | time vs cpu-fast |",
             "|---|---|---|---|---|---|---|"]
    for variant in variants:
        s = summary[variant]
        settings = ", ".join(f"{k}={v}" for k, v in VARIANTS[variant].items()) or "(preset)"
        lines.append(f"| {variant} | {settings} | {s['iou_mean']:.3f} | {s['color_error_mean']:.3f} | "
                     f"{s['speckle']:.4f} | {s['train_seconds']:.1f} | {s['train_seconds'] / reference:.2f}x |")
    lines += ["", "Per run:", "", "| variant | prompt | seed | IoU | colour error | albedo speckle | train s |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['prompt']} | {r['seed']} | {r['iou_mean']:.3f} | {r['color_error_mean']:.3f} | "
              f"{r['speckle']:.4f} | {r['train_seconds']:.1f} |" for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "generate_speed.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "generate_speed.json", json.dumps({"command": command.strip(), "machine": machine,
                                                               "summary": summary, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
