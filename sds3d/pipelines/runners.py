"""Where the lines of a batch run: a local pool of processes, or tasks on a Ray cluster.

Both call `run_job`, which is `generate` for one line with the thread count the batch chose, and
both report through the same `update(job, **changes)` so that the manifest reads the same.

Local pool: one fresh process per line (spawned, not forked: OpenMP does not survive a fork), at
most `workers` at a time. A fresh process per line costs the imports (a few seconds) and buys
what a long-lived pool cannot: a run that crashes or is killed for memory takes only its own
process, and every line starts from the same state as `sds3d generate` on the command line.
The children die with the driver (PR_SET_PDEATHSIG), so a killed batch leaves no run writing to
a folder that `--resume` is about to continue; Ctrl-C reaches them too and stops each at its next
step with a checkpoint.

Ray: each line a task with `num_cpus=threads` (and `num_gpus=1` where the cluster has GPUs),
`workers` in flight at a time; without an address a local Ray instance is started (and shut down
at the end). Run folders are the paths the driver gives, so on a cluster the batch folder must be
on a file system every node mounts.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from ..threads import available_cpus
from .batch import BatchError


def _one_line(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return text if isinstance(error, (ValueError, RuntimeError, OSError)) and text else f"{type(error).__name__}: {text}"


def run_job(spec: dict, should_stop=None) -> dict:
    """One line of a batch: `generate(config, out=run_dir)`, continuing the run folder's checkpoint
    when it has one. Returns the manifest fields to record; never raises for a failed run (the
    error's first line is returned, the traceback written to the run folder's error.log)."""
    import torch

    from ..config import GenerateConfig
    from .text_to_3d import generate

    torch.set_num_threads(spec["threads"])
    run_dir = Path(spec["run_dir"])
    start = time.time()
    try:
        config = GenerateConfig.from_dict(spec["config"]).validate()
        if run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # made and left empty by a killed start: start again
        resume = (run_dir / "config.yaml").is_file()
        result = generate(config, out=run_dir, resume=resume, show_progress=False, should_stop=should_stop)
    except Exception as error:  # one line fails, the batch goes on
        if run_dir.is_dir():
            (run_dir / "error.log").write_text(traceback.format_exc())
        return {"state": "failed", "error": _one_line(error), "seconds": round(time.time() - start, 1)}
    seconds = round(time.time() - start, 1)
    if result.stopped:
        return {"state": "interrupted", "seconds": seconds, "error": None}
    metrics = {k: v for k, v in (result.metrics or {}).items() if k != "views"} or None
    files = {name: os.path.relpath(path, run_dir.parent) for name, path in result.files.items()}
    return {"state": "done", "seconds": seconds, "metrics": metrics, "files": files, "error": None}


def job_spec(job, threads: int) -> dict:
    return {"config": job.config.to_dict(), "run_dir": str(job.run_dir.resolve()), "threads": threads,
            "line": job.line.number}


# --- local processes ---------------------------------------------------------------------------

def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child_main(spec: dict, conn, log_path: str, parent_pid: int) -> None:
    _die_with_parent()
    if os.getppid() != parent_pid:  # the driver died before the line above ran
        os._exit(1)
    log = open(log_path, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    stop = []

    def request_stop(signum, frame):
        stop.append(signum)  # honoured before the next step: the checkpoint is written, then the run returns

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    print(f"--- line {spec['line']}: {spec['config']['prompt']!r}, {spec['threads']} thread(s), pid {os.getpid()}",
          flush=True)
    conn.send(run_job(spec, should_stop=lambda: bool(stop)))
    conn.close()


class LocalRunner:
    """At most `workers` child processes at a time, one per line."""

    def __init__(self, workers: int, threads: int, log_dir: Path, stop_timeout_s: float = 120.0):
        self.workers, self.threads, self.log_dir = workers, threads, Path(log_dir)
        self.stop_timeout_s = stop_timeout_s

    def run(self, jobs, update, log) -> bool:
        """Run `jobs`; True when Ctrl-C interrupted the batch (after the running lines stopped), or
        a line stopped on a signal of its own (a Ctrl-C that reached the lines' processes first, or a
        `kill -INT` of one): the batch is then not finished, and `--resume` finishes it."""
        import multiprocessing
        from multiprocessing.connection import wait

        context = multiprocessing.get_context("spawn")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        pending = collections.deque(jobs)
        running = {}  # process sentinel -> [process, connection, job, result]
        lines_stopped = []  # lines that reported "interrupted"

        def finish(sentinel):
            process, conn, job, result = running.pop(sentinel)
            if result is None and conn.poll():
                result = conn.recv()
            process.join()
            conn.close()
            if result is None:
                result = {"state": "failed", "error": f"the run's process ended with exit code {process.exitcode} "
                                                      f"(see logs/{job.line.number:03d}.log)"}
            update(job, finished_at=time.time(), **result)
            if result["state"] == "interrupted":
                lines_stopped.append(job.line.number)
            log(f"line {job.line.number}: {result['state']}"
                + (f" ({result['error']})" if result.get("error") else "")
                + (f", {result['seconds']:.0f} s" if result.get("seconds") is not None else ""))

        def collect(timeout):
            ready = wait([item for entry in running.values() for item in (entry[0].sentinel, entry[1])], timeout)
            for item in ready:
                for sentinel, entry in list(running.items()):
                    if item is entry[1] and entry[3] is None:
                        try:
                            entry[3] = entry[1].recv()
                        except EOFError:
                            pass
                    elif item == sentinel and sentinel in running:
                        finish(sentinel)

        try:
            while pending or running:
                while pending and len(running) < self.workers:
                    job = pending.popleft()
                    parent_end, child_end = context.Pipe(duplex=False)
                    log_path = self.log_dir / f"{job.line.number:03d}.log"
                    process = context.Process(target=_child_main, name=f"sds3d-batch-line-{job.line.number}",
                                              args=(job_spec(job, self.threads), child_end, str(log_path), os.getpid()))
                    process.start()
                    child_end.close()
                    running[process.sentinel] = [process, parent_end, job, None]
                    update(job, state="running", started_at=time.time(), finished_at=None, worker=f"pid {process.pid}",
                           threads=self.threads)
                    log(f"line {job.line.number}: running {job.line.prompt!r} (pid {process.pid})")
                collect(timeout=1.0)
        except KeyboardInterrupt:
            log(f"interrupted: stopping {len(running)} running line(s) at their next step (a checkpoint is kept)")
            deadline = time.time() + self.stop_timeout_s
            try:
                for process, *_ in running.values():
                    if process.is_alive():
                        os.kill(process.pid, signal.SIGINT)
                while running and time.time() < deadline:
                    collect(timeout=1.0)
            except KeyboardInterrupt:
                pass
            for sentinel, (process, conn, job, result) in list(running.items()):
                process.kill()
                process.join()
                conn.close()
                running.pop(sentinel)
                update(job, state="interrupted", finished_at=time.time(), error=None)
            return True
        return bool(lines_stopped)


# --- Ray --------------------------------------------------------------------------------------

def check_ray_address(address: str | None) -> None:
    """Refuse at once (one BatchError line) a Ray address nothing answers at, instead of letting
    `ray.init` retry for a minute. None or "local" mean a local instance; "auto" is Ray's own lookup."""
    if address in (None, "", "local", "auto"):
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise BatchError(f"bad Ray address {address!r}: write HOST:PORT (e.g. 10.0.0.5:6379) or ray://HOST:10001")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise BatchError(f"cannot reach the Ray cluster at {address} ({reason}): start it with `ray start --head`, "
                         "or give --ray without an address to start a local instance") from None


class RayRunner:
    """Each line a Ray task, `workers` in flight at a time."""

    def __init__(self, address: str | None, workers: int, threads: int):
        self.address = None if address in (None, "", "local") else address
        self.workers, self.threads = workers, threads

    def run(self, jobs, update, log) -> bool:
        import logging

        try:
            import ray
        except ImportError:
            raise BatchError("--ray needs Ray: pip install 'sds3d[dist]' (or pip install ray)") from None
        started_here = not ray.is_initialized()
        if started_here:
            options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            if self.address is None:
                options["num_cpus"] = max(len(available_cpus()), self.threads)
            try:
                ray.init(address=self.address, **options)
            except (ConnectionError, RuntimeError) as error:
                raise BatchError(f"cannot start Ray at {self.address or 'a local instance'}: {_one_line(error)}") from None
        try:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
            task = ray.remote(num_cpus=self.threads, num_gpus=gpus, max_retries=0)(run_job)
            pending = collections.deque(jobs)
            running = {}  # ObjectRef -> job
            try:
                while pending or running:
                    while pending and len(running) < self.workers:
                        job = pending.popleft()
                        running[task.remote(job_spec(job, self.threads))] = job
                        update(job, state="running", started_at=time.time(), finished_at=None, worker="ray",
                               threads=self.threads)
                        log(f"line {job.line.number}: running {job.line.prompt!r} (Ray task)")
                    ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                    for ref in ready:
                        job = running.pop(ref)
                        try:
                            result = ray.get(ref)
                        except Exception as error:  # the task's worker died
                            result = {"state": "failed", "error": _one_line(error)}
                        update(job, finished_at=time.time(), **result)
                        log(f"line {job.line.number}: {result['state']}"
                            + (f" ({result['error']})" if result.get("error") else ""))
            except KeyboardInterrupt:
                log(f"interrupted: cancelling {len(running)} Ray task(s); their last checkpoints are kept")
                for ref, job in running.items():
                    ray.cancel(ref, force=True)
                    update(job, state="interrupted", finished_at=time.time(), error=None)
                return True
            return False
        finally:
            if started_here:
                ray.shutdown()
