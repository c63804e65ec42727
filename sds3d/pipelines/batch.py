"""`sds3d batch PROMPTS_FILE`: one `generate` run per line, on a local pool of processes or on Ray.

A batch folder holds

    batch.json          the prompt file's path and text, preset, --set items, workers, threads per run
    manifest.jsonl      one JSON record per prompt line: state (queued, running, done, failed,
                        interrupted), times, run folder, files, metrics, the error line of a failure;
                        rewritten atomically (temporary file + rename) after every change of state,
                        so that it is valid JSON Lines at every moment, a SIGKILL included
    index.html          a static gallery of the runs that opens from disk
    logs/NNN.log        what each line's run printed
    NNN-<slug>-<seed>/  the run folder of the prompt on line NNN of the file (`generate`'s layout)

Every line is planned and checked (its settings, its prompt for the world's teachers) before
anything is created, so a malformed line stops the batch with its line number and nothing runs.
`--resume` skips the lines that are done, continues interrupted or failed ones from their last
checkpoint, and refuses when the prompt file no longer says what the batch was started with. One
driver at a time: the batch folder is locked (flock) while a driver runs it.

Threads: each run gets `threads` CPU threads (default: the cores this process may use divided by the
number of workers), so that N workers share the machine instead of oversubscribing it; the count is
recorded per line. Runs with the SDS loss and the world's teachers give the same bits at 1 and 2
threads (tests/test_thread_invariance.py), so on a 2-core machine the metrics of a line do not
depend on `--workers`; other setups may differ in the last digits between thread counts.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..config import GenerateConfig, make_config
from ..io import atomic_write_text, slugify
from ..settings import ConfigError
from ..threads import available_cpus
from .gallery import write_index_html
from .prompt_file import PromptLine, read_prompt_file
from .text_to_3d import check_run

BATCH_FILE = "batch.json"
MANIFEST = "manifest.jsonl"
LOCK = ".batch.lock"
STATES = ("queued", "running", "done", "failed", "interrupted")


class BatchError(RuntimeError):
    """A batch that cannot start or resume as asked; the message says what to do."""


@dataclass
class BatchJob:
    """One prompt line, planned: its full config and its run folder."""

    line: PromptLine
    config: GenerateConfig
    run_dir: Path

    @property
    def name(self) -> str:
        return self.run_dir.name


def plan_batch(lines: list[PromptLine], batch_dir: Path, preset: str = "cpu-fast",
               settings: dict | None = None) -> list[BatchJob]:
    """The config and run folder of every line, each checked as `generate` checks one (values,
    prompts the world's teachers know, diffusers folders that exist). The first bad line raises
    ConfigError / ValueError with its line number; nothing is created."""
    jobs = []
    for line in lines:
        overrides = {**(settings or {}), **line.overrides}
        line_preset = overrides.pop("preset", preset)
        overrides.pop("prompt", None)
        try:
            if "prompt" in line.overrides:
                raise ConfigError("prompt is the text before the bar, not a setting")
            config = check_run(make_config(str(line_preset), explicit=overrides, prompt=line.prompt))
        except ValueError as error:
            raise type(error)(f"line {line.number}: {str(error).splitlines()[0]}") from None
        jobs.append(BatchJob(line, config, batch_dir / f"{line.number:03d}-{slugify(line.prompt, 40)}-{config.seed}"))
    return jobs


# --- the manifest ------------------------------------------------------------------------------

def new_record(job: BatchJob) -> dict:
    return {"line": job.line.number, "prompt": job.line.prompt, "overrides": job.line.overrides,
            "run_dir": job.name, "state": "queued", "attempts": 0, "threads": None, "worker": None,
            "queued_at": time.time(), "started_at": None, "finished_at": None, "seconds": None,
            "metrics": None, "files": {}, "error": None}


def write_manifest(batch_dir: Path, records: list[dict]) -> None:
    """All records, one JSON object a line, replacing the file atomically."""
    atomic_write_text(batch_dir / MANIFEST, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def read_manifest(batch_dir: Path) -> list[dict]:
    path = batch_dir / MANIFEST
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise BatchError(f"cannot resume: {batch_dir} has no {MANIFEST} (not a batch folder)") from None
    except json.JSONDecodeError as error:
        raise BatchError(f"cannot resume: {path} is damaged ({error.msg} at line {error.lineno})") from None
    if not all(isinstance(r, dict) and r.get("state") in STATES for r in records):
        raise BatchError(f"cannot resume: {path} holds records that are not sds3d batch records")
    return records


def _file_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@contextmanager
def batch_lock(batch_dir: Path):
    """Hold the batch folder's lock for one driver; a second driver is refused at once."""
    handle = open(batch_dir / LOCK, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise BatchError(f"another sds3d batch is running in {batch_dir}: wait for it or stop it first") from None
    try:
        yield
    finally:
        handle.close()  # closing releases the lock (the kernel releases it too when the driver is killed)


# --- the driver ---------------------------------------------------------------------------------

@dataclass
class BatchResult:
    batch_dir: Path
    records: list[dict]
    interrupted: bool = False

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.records if r["state"] == "failed"]

    @property
    def done(self) -> list[dict]:
        return [r for r in self.records if r["state"] == "done"]


def default_batch_dir(prompt_file: str | Path) -> Path:
    return Path("outputs") / "batches" / slugify(Path(prompt_file).stem)


def prepare_batch(prompt_file: str | Path, out: str | Path | None = None, resume: bool = False,
                  preset: str = "cpu-fast", set_items: dict | None = None, workers: int = 1,
                  threads: int | None = None) -> tuple[Path, list[BatchJob], list[dict], dict]:
    """Read and check everything a batch needs before it touches the disk: (batch folder, jobs,
    records, batch.json contents). A resumed batch keeps the preset and --set items it began with."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    prompt_file = Path(prompt_file)
    lines = read_prompt_file(prompt_file)
    batch_dir = Path(out) if out else default_batch_dir(prompt_file)
    text = prompt_file.read_text(encoding="utf-8")
    if resume:
        try:
            info = json.loads((batch_dir / BATCH_FILE).read_text())
        except FileNotFoundError:
            raise BatchError(f"cannot resume: {batch_dir} is not a batch folder (no {BATCH_FILE})") from None
        except json.JSONDecodeError:
            raise BatchError(f"cannot resume: {batch_dir / BATCH_FILE} is damaged (not JSON)") from None
        if set_items:
            raise ConfigError("--set applies to new batches: a resumed batch keeps the settings in its batch.json")
        if info.get("prompt_file_sha256") != _file_digest(text):
            raise BatchError(f"cannot resume: {prompt_file} changed since the batch started (see {batch_dir / BATCH_FILE}); "
                             "put new lines in a new batch (another --out)")
        jobs = plan_batch(lines, batch_dir, info["preset"], info["settings"])
        records = read_manifest(batch_dir)
        if [(r["line"], r["prompt"]) for r in records] != [(j.line.number, j.line.prompt) for j in jobs]:
            raise BatchError(f"cannot resume: {batch_dir / MANIFEST} does not list the lines of {prompt_file}")
        info.update(workers=workers, threads=threads or max(1, len(available_cpus()) // workers))
        return batch_dir, jobs, records, info
    if batch_dir.exists() and (not batch_dir.is_dir() or any(batch_dir.iterdir())):
        raise BatchError(f"batch folder {batch_dir} exists: add --resume to finish it, or choose another --out")
    jobs = plan_batch(lines, batch_dir, preset, set_items)
    info = {"prompt_file": str(prompt_file), "prompt_file_sha256": _file_digest(text), "prompt_file_text": text,
            "preset": preset, "settings": set_items or {}, "workers": workers,
            "threads": threads or max(1, len(available_cpus()) // workers), "created": time.time()}
    return batch_dir, jobs, [new_record(job) for job in jobs], info


def run_batch(prompt_file: str | Path, out: str | Path | None = None, workers: int = 1, resume: bool = False,
              preset: str = "cpu-fast", set_items: dict | None = None, threads: int | None = None,
              ray_address: str | None = None, use_ray: bool = False, log=print) -> BatchResult:
    """Run every line of a prompt file (see the module docstring). Ctrl-C stops the runs at their
    next step with a checkpoint, marks them interrupted and re-raises KeyboardInterrupt."""
    from .runners import LocalRunner, RayRunner, check_ray_address

    batch_dir, jobs, records, info = prepare_batch(prompt_file, out, resume, preset, set_items, workers, threads)
    if use_ray:
        check_ray_address(ray_address)  # an unreachable cluster fails here, before any folder exists
    fresh = not batch_dir.exists()
    batch_dir.mkdir(parents=True, exist_ok=True)
    try:
        with batch_lock(batch_dir):
            atomic_write_text(batch_dir / BATCH_FILE, json.dumps(info, indent=2) + "\n")
            todo = []
            for job, record in zip(jobs, records):
                if record["state"] == "done" and job.run_dir.is_dir():
                    continue
                record.update(state="queued", queued_at=time.time(), error=None)
                todo.append(job)
            write_manifest(batch_dir, records)
            write_index_html(batch_dir, records)
            skipped = len(jobs) - len(todo)
            log(f"batch {batch_dir}: {len(jobs)} line(s), {len(todo)} to run"
                + (f" ({skipped} done before)" if skipped else "")
                + f", {workers} at a time, {info['threads']} thread(s) each"
                + (f", on Ray ({ray_address or 'a local instance'})" if use_ray else ""))
            by_line = {r["line"]: r for r in records}

            def update(job: BatchJob, **changes):
                record = by_line[job.line.number]
                if changes.get("state") == "running":
                    changes["attempts"] = record.get("attempts", 0) + 1
                record.update(changes)
                write_manifest(batch_dir, records)
                write_index_html(batch_dir, records)

            runner = (RayRunner(ray_address, workers, info["threads"]) if use_ray
                      else LocalRunner(workers, info["threads"], batch_dir / "logs"))
            interrupted = runner.run(todo, update, log)
    except BaseException:
        if fresh and not (batch_dir / MANIFEST).exists():
            import shutil

            shutil.rmtree(batch_dir, ignore_errors=True)  # a failed start leaves nothing behind
        raise
    return BatchResult(batch_dir, records, interrupted)


def summary_table(records: list[dict]) -> str:
    """The table printed at the end of a batch: line, state, IoU, colour error, seconds, prompt."""
    rows = ["line  state        IoU    colour  seconds  prompt"]
    for r in records:
        m = r.get("metrics") or {}
        iou = f"{m['iou_mean']:.3f}" if isinstance(m.get("iou_mean"), (int, float)) else "-"
        color = f"{m['color_error_mean']:.3f}" if isinstance(m.get("color_error_mean"), (int, float)) else "-"
        seconds = f"{r['seconds']:.0f}" if isinstance(r.get("seconds"), (int, float)) else "-"
        text = r["prompt"] if r["state"] != "failed" else f"{r['prompt']}  ({r.get('error')})"
        rows.append(f"{r['line']:<5} {r['state']:<12} {iou:<6} {color:<7} {seconds:<8} {text}")
    return "\n".join(rows)
