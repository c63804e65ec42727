"""The one place that decides the compute precision of CPU work: fp32, or bf16 autocast.

bf16 autocast (`torch.autocast("cpu", dtype=torch.bfloat16)`) pays only on CPUs that run bf16
natively: AVX512_BF16 (Intel Cooper Lake and later, AMD Zen 4 and later) or AMX (Intel Sapphire
Rapids and later). There oneDNN's bf16 convolutions and matmuls beat fp32; elsewhere they fall back
to emulation, and the embedded teacher's forward (guidance 3, batch 64, one `predict_eps`) took
40.7 s under autocast against 1.45 s in fp32 on an AVX2-only AMD EPYC (issue #18: 28x slower).
benchmarks/precision.py measures both on the machine at hand (figures in README, "Precision").

    resolve_precision("auto", "cpu")   -> "bf16" where the CPU has native bf16, else "fp32"
    describe_precision("auto", "cpu")  -> one line for the log: CPU model, capability, choice, why

Two sources must agree before "auto" picks bf16: the CPU's flags (`avx512_bf16` or `amx_bf16` in
/proc/cpuinfo) and torch's own dispatch level (`torch.backends.cpu.get_cpu_capability()`: "AVX512"
or above; "AVX2", "DEFAULT", "NO AVX" rule bf16 out). Where the flags cannot be read (not Linux,
a sandbox) "auto" is fp32: a slow default is never guessed. An explicit "bf16" is obeyed
everywhere, with one warning line where the CPU lacks it. On a GPU, CPU autocast does not apply:
"auto" is fp32 there (the embedded teacher's autocast is a CPU-only switch).

A base module: the standard library and torch only, so every layer may use it.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of native bf16 arithmetic
CPUINFO = Path("/proc/cpuinfo")
# get_cpu_capability() values at which ATen and oneDNN run AVX-512 code (bf16 needs at least that).
_AVX512_CAPABILITIES = ("AVX512", "AMX")


def check_precision(choice: str, name: str = "precision") -> str:
    """`choice` itself, or ValueError in one line naming what is allowed."""
    if choice not in PRECISIONS:
        raise ValueError(f"bad value {name}={choice!r}: allowed are {', '.join(PRECISIONS)}")
    return choice


def read_cpuinfo(path: str | Path | None = None) -> tuple[str, set[str] | None]:
    """(CPU model name, flags) from /proc/cpuinfo; flags is None where they cannot be read (no such
    file, no "flags" line: not Linux on x86). The model name falls back to `platform`'s answer."""
    fallback = platform.processor() or platform.machine() or "unknown CPU"
    try:
        text = Path(path if path is not None else CPUINFO).read_text(errors="replace")
    except OSError:
        return fallback, None
    model, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip() and model is None:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = set(value.split())
    return model or fallback, flags


def cpu_capability() -> str:
    """torch's dispatch level for CPU kernels ("AVX2", "AVX512", "DEFAULT", ...), "unknown" if torch
    cannot say."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # an old torch without the call, or a build that refuses it
        return "unknown"


def native_bf16() -> tuple[bool, str]:
    """(does this CPU run bf16 natively, why), from the flags and torch's capability together."""
    _, flags = read_cpuinfo()
    capability = cpu_capability()
    if flags is None:
        return False, f"CPU flags unreadable ({CPUINFO} has none), so no native bf16 is assumed"
    found = sorted(flags & set(NATIVE_BF16_FLAGS))
    if not found:
        return False, f"no native bf16 (neither {' nor '.join(NATIVE_BF16_FLAGS)} in the CPU flags)"
    if not capability.upper().startswith(_AVX512_CAPABILITIES):
        return False, f"CPU flags list {', '.join(found)} but torch dispatches {capability} kernels"
    return True, f"native bf16 ({', '.join(found)})"


def _is_cpu(device) -> bool:
    return torch.device(device if device is not None else "cpu").type == "cpu"


def resolve_precision(choice: str = "auto", device: str | torch.device | None = "cpu", warn: bool = True, *,
                      nerf_loop: bool = False) -> str:
    """"fp32" or "bf16": the precision a run on `device` computes in, for a requested `choice`.

    "auto": bf16 only on a CPU with native bf16 (`native_bf16`), fp32 otherwise (a GPU included).
    With `nerf_loop` (the teacher of `sds3d generate`) "auto" is fp32 everywhere: there the teacher
    sees a few images per step (cpu-fast: 2 renders, 4 network images with CFG), where bf16 saves
    little, and the rest of the step (rendering, the field's backward) stays fp32. Measured on an
    AMD EPYC with avx512_bf16, 2 threads, idle machine (benchmarks/results/precision-AVX512.md):
    predict_eps at batch 2, guidance 3, 32 ms fp32 against 31 ms bf16, nothing on a cpu-fast step
    of 150-200 ms (benchmarks/step.py), against 0.72 s / 0.33 s at batch 64; and the quality that
    tests/test_generate.py asserts was calibrated with the fp32 teacher.
    "fp32" / "bf16": as asked; "bf16" on a CPU without native bf16 prints one warning line to
    stderr (with `warn`), since it is typically many times slower there (issue #18: 28x)."""
    check_precision(choice)
    if choice == "fp32":
        return "fp32"
    if choice == "bf16":
        if warn and _is_cpu(device):
            native, why = native_bf16()
            if not native:
                print(f"warning: --precision bf16 on {read_cpuinfo()[0]}: {why}; bf16 autocast may run many times "
                      "slower than fp32 here (auto picks fp32)", file=sys.stderr, flush=True)
        return "bf16"
    if nerf_loop or not _is_cpu(device):
        return "fp32"
    return "bf16" if native_bf16()[0] else "fp32"


def describe_precision(choice: str = "auto", device: str | torch.device | None = "cpu", *,
                       nerf_loop: bool = False) -> str:
    """One line for the run's log, beside the backend line: the precision in use and why, with the
    CPU's model name and torch's capability (arguments as `resolve_precision`'s)."""
    check_precision(choice)
    used = resolve_precision(choice, device, warn=False, nerf_loop=nerf_loop)
    name = "bf16 autocast" if used == "bf16" else "fp32"
    if not _is_cpu(device):
        return f"precision: {name} ({choice} on {torch.device(device)}: CPU autocast does not apply)"
    _, why = native_bf16()
    how = "asked for" if choice != "auto" else "auto in the NeRF loop" if nerf_loop else "auto"
    return f"precision: {name} ({how}; {read_cpuinfo()[0]}, torch capability {cpu_capability()}, {why})"
