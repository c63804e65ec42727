"""OpenMP threads that behave when the machine is shared.

torch's CPU kernels (and our fused hash-grid op) run on one OpenMP team: libgomp, which the torch
wheels ship. Between parallel regions libgomp's idle threads spin (busy-wait) before they sleep:
GOMP_SPINCOUNT iterations, 300,000 by default (OMP_WAIT_POLICY unset). Alone on a machine that
saves a wake-up per region; when another process holds one of the cores, a thread that spins
on it takes the CPU from that process while the team's other thread waits for it at the barrier,
and both programs crawl (benchmarks/shared_machine.py measures it). A short spin keeps most of the
speed alone and lets a waiting thread yield the core at once when there is someone to yield it to.

These variables are read once, when libgomp loads (the first `import torch`): `configure_openmp`
must run before that, which is why the `sds3d` command calls it first thing. A value the user set
in the environment is kept.

Waiting is half of it; the other half is how many threads to run. `ThreadGovernor` (called between
the steps of `generate`) watches how much of this process's cores other processes use and runs
as many threads as there are cores left, back up to the run's own count when they leave: one
thread beside a busy neighbour on two cores instead of two that take turns with it. Changing the
thread count does not change the run's result where its ops are thread-count invariant (the NeRF
with the SDS loss and the world's teachers at 1 and 2 threads: tests/test_thread_invariance.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Mapping, MutableMapping

# Spin iterations before an idle OpenMP thread sleeps: GOMP_SPINCOUNT's default is 300,000.
SPIN_COUNT = "10000"


def configure_openmp(environ: MutableMapping[str, str] = os.environ) -> MutableMapping[str, str]:
    """Set sds3d's OpenMP waiting in `environ` (default: this process's), unless the user chose one
    (OMP_WAIT_POLICY or GOMP_SPINCOUNT already set). Returns `environ`."""
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return environ


def openmp_waiting(environ: Mapping[str, str] = os.environ) -> str:
    """How this process's OpenMP threads wait between regions, for benchmark records: the
    OMP_WAIT_POLICY / GOMP_SPINCOUNT in `environ` (sds3d's own after `configure_openmp`). Timings
    depend on it: OMP_WAIT_POLICY=PASSIVE wakes a sleeping thread at every region, several ms a step."""
    found = [f"{key}={environ[key]}" for key in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if key in environ]
    return " ".join(found) or "libgomp's default waiting (GOMP_SPINCOUNT 300000)"


def available_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity, which containers and `taskset` narrow)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _busy_seconds(cpus: list[int], stat: Path = Path("/proc/stat")) -> float | None:
    """CPU seconds the kernel counted as busy (not idle, not waiting on I/O) on `cpus`, or None where
    /proc/stat cannot be read (not Linux)."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{i}" for i in cpus}
    ticks = 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in wanted:
            values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
            ticks += sum(values) - values[3] - values[4]
    return ticks / os.sysconf("SC_CLK_TCK")


class ThreadGovernor:
    """Torch's thread count fitted to the cores other processes leave this one (see the module
    docstring). Call `update()` between steps: at most every `interval_s` seconds it measures, over
    the time since its last measurement, the busy time of this process's CPUs minus this process's
    own CPU time (what the others used), and sets `torch.set_num_threads(cores - others)` rounded,
    at least 1 and at most the count the run started with. `close()` puts that count back."""

    def __init__(self, max_threads: int | None = None, interval_s: float = 2.0, stat: Path = Path("/proc/stat")):
        import torch

        self.initial = torch.get_num_threads()
        self.max_threads = max_threads or self.initial
        self.cpus = available_cpus()
        self.interval_s = interval_s
        self.stat = stat
        self.changes: list[tuple[float, int]] = []  # (time, threads) of every change, for the record
        self._last = self._sample()

    def _sample(self):
        busy = _busy_seconds(self.cpus, self.stat)
        return None if busy is None else (time.monotonic(), busy, time.process_time())

    def others(self) -> float | None:
        """Cores' worth of CPU other processes used since the last sample (and take a new one)."""
        now = self._sample()
        if now is None or self._last is None:
            return None
        (t0, busy0, own0), (t1, busy1, own1) = self._last, now
        self._last = now
        if t1 - t0 <= 0:
            return None
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))

    def update(self) -> int | None:
        """The new thread count when it changed, else None."""
        import torch

        if self._last is None or time.monotonic() - self._last[0] < self.interval_s:
            return None
        others = self.others()
        if others is None:
            return None
        threads = max(1, min(self.max_threads, int(len(self.cpus) - others + 0.3)))
        if threads == torch.get_num_threads():
            return None
        torch.set_num_threads(threads)
        self.changes.append((time.time(), threads))
        return threads

    def close(self) -> None:
        import torch

        torch.set_num_threads(self.initial)
