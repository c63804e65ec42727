"""`sds3d batch` with one worker and with N: wall time of the whole batch, and the metrics of every
line side by side (they must be identical: a line's result does not depend on its thread count).

    python benchmarks/batch_workers.py [--prompts prompts/six.txt] [--workers 2] [--steps 400]

Runs `sds3d batch PROMPTS --workers 1` then `--workers N` (same lines, same seeds, `--set steps=S`)
into a temporary folder, one after the other, and writes benchmarks/results/batch_workers.{json,md}.
Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run_batch(prompts: str, workers: int, steps: int, out: Path) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sds3d", "batch", prompts, "--workers", str(workers), "--out", str(out),
                    "--set", f"steps={steps}"], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return wall, [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="prompts/six.txt")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    import torch

    root = Path(tempfile.mkdtemp(prefix="sds3d-batch-workers-"))
    one_wall, one = run_batch(args.prompts, 1, args.steps, root / "one")
    print(f"--workers 1: {one_wall:.0f} s", flush=True)
    many_wall, many = run_batch(args.prompts, args.workers, args.steps, root / "many")
    print(f"--workers {args.workers}: {many_wall:.0f} s", flush=True)

    def scores(record):
        return {k: v for k, v in record["metrics"].items() if not k.endswith("_seconds")}

    identical = all(scores(a) == scores(b) for a, b in zip(one, many))
    header = (f"{args.prompts}, cpu-fast with steps={args.steps}; CPU {torch.backends.cpu.get_cpu_capability()}, "
              f"{len(os.sched_getaffinity(0))} cores")
    lines = ["# sds3d batch: one worker against several\n", header + "\n",
             f"Command: `python benchmarks/batch_workers.py --prompts {args.prompts} --workers {args.workers} "
             f"--steps {args.steps}`\n",
             f"Wall time of the batch: {one_wall:.0f} s with 1 worker ({one[0]['threads']} threads a run), "
             f"{many_wall:.0f} s with {args.workers} ({many[0]['threads']} thread(s) a run): "
             f"{many_wall / one_wall:.2f}x. Metrics of every line identical: {'yes' if identical else 'NO'}.\n",
             f"| line | prompt | IoU | colour error | train s, 1 worker | train s, {args.workers} workers |",
             "|---|---|---|---|---|---|"]
    for a, b in zip(one, many):
        lines.append(f"| {a['line']} | {a['prompt']} | {a['metrics']['iou_mean']:.4f} | "
                     f"{a['metrics']['color_error_mean']:.4f} | {a['metrics']['train_seconds']:.0f} | "
                     f"{b['metrics']['train_seconds']:.0f} |")
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batch_workers.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "batch_workers.json").write_text(json.dumps(
        {"header": header, "wall_s": {"1": one_wall, str(args.workers): many_wall}, "identical_metrics": identical,
         "one_worker": one, "many_workers": many}, indent=2) + "\n")


if __name__ == "__main__":
    main()
