"""fp32 against bf16 autocast on this CPU: the embedded teacher's forward and a teacher training step.

    python benchmarks/precision.py [--threads 2] [--repeats 5] [--batch 64 2]

Issue #18: bf16 autocast made the shipped teacher 28x slower on an AVX2-only CPU (1.45 s fp32
against 40.7 s bf16 for one `predict_eps` at guidance 3, batch 64), while on CPUs with native bf16
(AVX512_BF16, AMX) it is the faster one. This measures, on the machine at hand:

- forward: `EmbeddedTeacher.predict_eps` of the shipped teacher (sds3d/assets/teacher), guidance 3
  (one network call on 2B images: unconditional and conditional), at each `--batch` (64: the
  evaluation's and the students' batch; 2: `sds3d generate`'s cpu-fast batch);
- train step: one step of `sds3d teacher train` on the shipped teacher's architecture at the
  training batch of its config (v-prediction MSE with min-SNR weights under the same autocast as
  `TeacherTrainer.loss`, backward, gradient clipping, AdamW), on random images and text
  embeddings (the cost does not depend on the content);

fp32 and bf16 interleaved (one of each per repeat, so that load from other processes hits both
alike), after one untimed warm-up each; the median is reported. Printed side by side with what
`sds3d.precision.resolve_precision("auto")` picks here, the CPU's model name and
`torch.backends.cpu.get_cpu_capability()`; saved as benchmarks/results/precision-<capability>.json
and .md (one file per kind of CPU, so that the results of both kinds can sit side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from sds3d.diffusion.schedule import make_schedule, min_snr_weights, stratified_timesteps
from sds3d.precision import cpu_capability, native_bf16, read_cpuinfo, resolve_precision
from sds3d.teachers.embedded import EmbeddedTeacher
from sds3d.teachers.unet import LeanUNet

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each callable, run in turn `repeats` times after one untimed call each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: statistics.median(v) for name, v in times.items()}


def forward_case(teachers: dict, batch: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    some = teachers["fp32"]
    cond = some.encode_prompt(["a red cube"] * batch)
    x = torch.randn(batch, 3, some.resolution, some.resolution, generator=gen)
    t = torch.randint(0, some.schedule.num_train_timesteps, (batch,), generator=gen)

    def call(teacher):
        with torch.no_grad():
            teacher.predict_eps(x, t, cond, 3.0)

    return interleaved({name: (lambda te=te: call(te)) for name, te in teachers.items()}, repeats)


def train_case(teacher: EmbeddedTeacher, batch: int, repeats: int) -> dict:
    """One optimizer step as `TeacherTrainer` takes it, in each precision, on its own copy of the network."""
    schedule = make_schedule(teacher.meta.get("schedule", "cosine"), teacher.schedule.num_train_timesteps)
    cfg = (teacher.meta.get("training") or {}).get("config", {})
    gamma = cfg.get("min_snr_gamma", 5.0)
    res = teacher.resolution

    def make_step(precision: str):
        torch.manual_seed(0)
        model = LeanUNet(teacher.network.config)
        model.load_state_dict(teacher.network.state_dict())
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99))
        gen = torch.Generator().manual_seed(0)

        def step():
            x0 = torch.rand(batch, 3, res, res, generator=gen) * 2 - 1
            text = torch.nn.functional.normalize(torch.randn(batch, 384, generator=gen), dim=-1)
            t = stratified_timesteps(batch, schedule.num_train_timesteps, gen)
            noise = torch.randn(x0.shape, generator=gen)
            x_t = schedule.add_noise(x0, noise, t)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = model(x_t, t, text, None)
            per_sample = (out.float() - schedule.velocity(x0, noise, t)).pow(2).mean(dim=(1, 2, 3))
            loss = (min_snr_weights(schedule, t, "v_prediction", gamma) * per_sample).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

        return step

    return interleaved({p: make_step(p) for p in ("fp32", "bf16")}, repeats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 2], help="predict_eps batch sizes (before CFG)")
    parser.add_argument("--train-batch", type=int, default=None, help="default: the shipped teacher's training batch")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    model, flags = read_cpuinfo()
    capability = cpu_capability()
    native, why = native_bf16()
    auto = resolve_precision("auto", "cpu")
    print(f"CPU: {model}; torch {torch.__version__}, capability {capability}; {why}; "
          f"{torch.get_num_threads()} threads; auto -> {auto}", flush=True)

    fp32 = EmbeddedTeacher.load()
    teachers = {"fp32": fp32, "bf16": EmbeddedTeacher.load(autocast_bf16=True, text_encoder=fp32.text_encoder)}
    train_batch = args.train_batch or int((fp32.meta.get("training") or {}).get("config", {}).get("batch_size", 32))
    rows = []
    for batch in args.batch:
        seconds = forward_case(teachers, batch, args.repeats)
        rows.append({"case": f"predict_eps, guidance 3, batch {batch}", **seconds})
        print(f"  {rows[-1]['case']}: fp32 {seconds['fp32']:.3f} s, bf16 {seconds['bf16']:.3f} s", flush=True)
    seconds = train_case(fp32, train_batch, args.repeats)
    rows.append({"case": f"training step, batch {train_batch}", **seconds})
    print(f"  {rows[-1]['case']}: fp32 {seconds['fp32']:.3f} s, bf16 {seconds['bf16']:.3f} s", flush=True)
    for row in rows:
        row["bf16_over_fp32"] = row["bf16"] / row["fp32"]
        row["fp32"], row["bf16"] = round(row["fp32"], 4), round(row["bf16"], 4)
        row["bf16_over_fp32"] = round(row["bf16_over_fp32"], 3)

    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    record = {
        "command": "python benchmarks/precision.py" + (f" --threads {args.threads}" if args.threads else "")
                   + (f" --repeats {args.repeats}" if args.repeats != 5 else "")
                   + (f" --batch {' '.join(map(str, args.batch))}" if args.batch != [64, 2] else ""),
        "cpu": model, "cpu_bf16_flags": sorted((flags or set()) & {"avx512_bf16", "amx_bf16"}),
        "capability": capability, "native_bf16": native, "why": why, "auto": auto,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        # set: a CPU made to pass for another (ATEN_CPU_CAPABILITY for ATen's kernels, ONEDNN_MAX_CPU_ISA for
        # oneDNN's convolutions and matmuls), e.g. avx2 / AVX2 for an AVX2-only CPU
        "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS",
                                             "OMP_WAIT_POLICY") if k in os.environ},
        "repeats": args.repeats, "load_average_before": load_before, "load_average_after": load_after,
        "seconds": round(time.time() - start, 1), "rows": rows,
    }
    table = ["| case | fp32 s | bf16 s | bf16 / fp32 |", "|---|---|---|---|"]
    table += [f"| {r['case']} | {r['fp32']:.3f} | {r['bf16']:.3f} | {r['bf16_over_fp32']:.2f}x |" for r in rows]
    print("\n".join(table))
    print(f"auto picks {auto} here ({why})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"precision-{capability.replace(' ', '_')}"
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    load = (f"; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
            if load_before and load_after else "")
    md = [f"# fp32 against bf16 autocast on {model} ({capability})", "",
          f"`{record['command']}`: torch {torch.__version__}, {record['threads']} threads, median of {args.repeats} "
          f"interleaved repeats{load}; {record['seconds']:.0f} s."
          + (f" Environment: {', '.join(f'{k}={v}' for k, v in record['env'].items())}." if record["env"] else ""), "",
          *table, "",
          f"`resolve_precision(\"auto\")` picks **{auto}** here: {why}. `sds3d generate` keeps fp32 under auto "
          "(see sds3d/precision.py).", ""]
    (out / f"{name}.md").write_text("\n".join(md))
    print(f"wrote {out / (name + '.json')} and {out / (name + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
