"""What the web app adds to a run: the same `generate` job through `sds3d generate` and through the
page's API (gradio_client against `sds3d app` in its own process), in interleaved pairs.

    python benchmarks/app_overhead.py [--pairs 3] [--steps 400] [--preset cpu-fast]

Per run: wall seconds (the CLI: the whole process, imports included; the app: from submitting the
request to the result, on a server that is already up) and training seconds (metrics.json's
`train_seconds`, the loop alone: where the page's per-step progress events and live previews
cost). Pairs alternate which goes first, so that a drift of the machine's speed falls on both.
Run it alone on the machine. Writes benchmarks/results/app_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(root: Path, args, seed: int) -> dict:
    out = root / f"cli-{seed}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sds3d", "generate", "a red cube", "--preset", args.preset, "--steps",
                    str(args.steps), "--seed", str(seed), "--out", str(out), "--quiet"], check=True,
                   capture_output=True)
    wall = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_s": wall, "train_s": metrics["train_seconds"], "iou": metrics["iou_mean"]}


def run_app(client, args, seed: int) -> dict:
    start = time.perf_counter()
    out = client.predict(prompt="a red cube", teacher="embedded", loss="sds", preset=args.preset, seed=seed,
                         steps=args.steps, guidance=None, settings="", api_name="/generate")
    wall = time.perf_counter() - start
    summary = next(value for value in out if isinstance(value, dict) and "state" in value)
    if summary["state"] != "done":
        raise RuntimeError(f"the app's run ended {summary['state']}: {out[0]}")
    return {"wall_s": wall, "train_s": summary["metrics"]["train_seconds"], "iou": summary["metrics"]["iou_mean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--preset", default="cpu-fast")
    args = parser.parse_args()
    import gradio_client

    root = Path(tempfile.mkdtemp(prefix="sds3d-app-overhead-"))
    port = free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    server = subprocess.Popen([sys.executable, "-m", "sds3d", "app", "--port", str(port), "--out-root", str(root / "app")],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while True:
            try:
                client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)
        rows = []
        for pair in range(args.pairs):
            order = ("cli", "app") if pair % 2 == 0 else ("app", "cli")
            for kind in order:
                seed = pair
                row = run_cli(root, args, seed) if kind == "cli" else run_app(client, args, seed)
                rows.append({"pair": pair, "kind": kind, **row})
                print(f"pair {pair} {kind}: wall {row['wall_s']:.1f} s, train {row['train_s']:.1f} s, IoU {row['iou']:.3f}",
                      flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)

    def median(kind, key):
        return statistics.median(r[key] for r in rows if r["kind"] == kind)

    import torch

    header = (f"{args.pairs} pairs, \"a red cube\", {args.preset}, {args.steps} steps; CPU "
              f"{torch.backends.cpu.get_cpu_capability()}, {len(os.sched_getaffinity(0))} cores")
    lines = ["# The web app against the CLI\n", header + "\n",
             f"Command: `python benchmarks/app_overhead.py --pairs {args.pairs} --steps {args.steps} --preset {args.preset}`\n",
             "| pair | run | wall s | train s | IoU |", "|---|---|---|---|---|"]
    lines += [f"| {r['pair']} | {r['kind']} | {r['wall_s']:.1f} | {r['train_s']:.1f} | {r['iou']:.3f} |" for r in rows]
    summary = {key: median("app", key) / median("cli", key) - 1 for key in ("wall_s", "train_s")}
    lines += ["", f"Medians: wall {median('cli', 'wall_s'):.1f} s (CLI) vs {median('app', 'wall_s'):.1f} s (app), "
                  f"{summary['wall_s']:+.1%}; training {median('cli', 'train_s'):.1f} s vs {median('app', 'train_s'):.1f} s, "
                  f"{summary['train_s']:+.1%}."]
    print("\n".join(lines[-1:]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "app_overhead.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "app_overhead.json").write_text(json.dumps({"header": header, "rows": rows, "app_vs_cli": summary},
                                                          indent=2) + "\n")


if __name__ == "__main__":
    main()
