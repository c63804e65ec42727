"""How `generate` trains when it shares the machine: steps per second alone, beside a busy loop,
and beside a second run. Policies: "fixed" (libgomp's default waiting, GOMP_SPINCOUNT 300000, and
the run's thread count fixed: sds3d before sds3d/threads.py) and "sds3d" (what `sds3d` sets: a short
spin, and `ThreadGovernor` fitting the thread count to the free cores between steps); or "spin=N"
(that spin count, threads fixed).

    python benchmarks/shared_machine.py [--steps 240] [--preset cpu-fast] [--policies fixed sds3d spin=0]

Each measurement is a fresh process (OpenMP's waiting is fixed when torch loads) that trains
`--steps` steps of "a red cube" and reports the rate over the steps after the first `--skip`.
"Beside a busy loop": one single-threaded `while True: pass` holds a core for the whole run; a
program that loses one core of two should slow down by at most 2x. "Beside another run": two
identical runs at once, both rates shown. "Two runs, one thread each" is what `sds3d batch
--workers 2` does. Run it alone: anything else on the machine shifts every figure. Writes
benchmarks/results/shared_machine.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def worker(steps: int, skip: int, preset: str, adapt: bool) -> None:
    """Train `steps` steps, print the rate (steps/s) over steps skip..steps as JSON."""
    import tempfile

    import torch

    from sds3d.config import make_config
    from sds3d.pipelines.text_to_3d import TextTo3D

    config = make_config(preset, prompt="a red cube", steps=steps, explicit={"preview_every": 10_000,
                                                                             "checkpoint_every": 10_000,
                                                                             "adapt_threads": adapt})
    marks = {}
    run = TextTo3D(config, tempfile.mkdtemp(prefix="sds3d-shared-"), callback=lambda e: marks.setdefault(e.step, time.time()),
                   progress_every=1)
    run.train(show_progress=False)
    rate = (steps - skip) / (marks[steps] - marks[skip])
    print(json.dumps({"steps_per_s": rate, "threads": torch.get_num_threads()}), flush=True)


def environment(policy: str, threads: int | None) -> dict:
    from sds3d.threads import SPIN_COUNT

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env["GOMP_SPINCOUNT"] = {"fixed": "300000", "sds3d": SPIN_COUNT}.get(policy, policy.removeprefix("spin="))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def start_worker(args, policy, threads=None):
    adapt = ["--adapt"] if policy == "sds3d" else []
    return subprocess.Popen([sys.executable, __file__, "--worker", "--steps", str(args.steps), "--skip", str(args.skip),
                             "--preset", args.preset, *adapt], env=environment(policy, threads), stdout=subprocess.PIPE,
                            text=True)


def rate_of(process) -> float:
    out, _ = process.communicate()
    return json.loads(out.strip().splitlines()[-1])["steps_per_s"]


def measure(args, spin, scenario):
    if scenario == "alone":
        return [rate_of(start_worker(args, spin))]
    if scenario == "beside a busy loop":
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.5)
            return [rate_of(start_worker(args, spin))]
        finally:
            busy.kill()
            busy.wait()
    if scenario == "beside another run":
        a, b = start_worker(args, spin), start_worker(args, spin)
        return [rate_of(a), rate_of(b)]
    if scenario == "two runs, one thread each":
        a, b = start_worker(args, spin, 1), start_worker(args, spin, 1)
        return [rate_of(a), rate_of(b)]
    raise ValueError(scenario)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--adapt", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--skip", type=int, default=10, help="steps left out of the rate (start-up)")
    parser.add_argument("--preset", default="cpu-fast")
    parser.add_argument("--policies", nargs="+", default=["fixed", "sds3d"],
                        help="fixed (libgomp default, fixed threads), sds3d (sds3d/threads.py), spin=N")
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.skip, args.preset, args.adapt)
        return
    spins = args.policies
    scenarios = ["alone", "beside a busy loop", "beside another run", "two runs, one thread each"]
    import torch

    header = (f"CPU: {cpu_name()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__} "
              f"({torch.backends.cpu.get_cpu_capability()}); cpu-fast \"a red cube\", {args.steps} steps, rate over "
              f"steps {args.skip}-{args.steps}")
    print(header, flush=True)
    rows = []
    for spin in spins:
        for scenario in scenarios:
            rates = measure(args, spin, scenario)
            rows.append({"policy": spin, "scenario": scenario, "steps_per_s": rates})
            print(f"{spin:<12} {scenario:<28} " + " + ".join(f"{r:.2f}" for r in rates)
                  + (f" = {sum(rates):.2f}" if len(rates) > 1 else "") + " steps/s", flush=True)
    alone = {row["policy"]: row["steps_per_s"][0] for row in rows if row["scenario"] == "alone"}
    lines = [f"# generate on a shared machine\n", header + "\n",
             f"Command: `python benchmarks/shared_machine.py --steps {args.steps} --policies {' '.join(spins)}`\n",
             "| policy | scenario | steps/s (each run) | total | slowdown vs alone |", "|---|---|---|---|---|"]
    for row in rows:
        rates = row["steps_per_s"]
        slow = alone[row["policy"]] / min(rates)
        lines.append(f"| {row['policy']} | {row['scenario']} | {' + '.join(f'{r:.2f}' for r in rates)} | "
                     f"{sum(rates):.2f} | {slow:.2f}x |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shared_machine.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "shared_machine.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS / 'shared_machine.md'}")


if __name__ == "__main__":
    main()
