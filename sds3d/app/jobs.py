"""Runs behind the web page: the form turned into a config, the queue that lets one optimization run
at a time, and the worker thread that runs `generate` with a live view and a stop flag.

There is no second copy of the loop: a job calls `sds3d.pipelines.text_to_3d.generate` (through
`TextTo3D`'s `callback`, `progress_every` and `should_stop`) exactly as the CLI does, with a
teacher kept loaded between runs.
"""

from __future__ import annotations

import collections
import math
import queue
import shutil
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import GenerateConfig, make_config, parse_overrides
from ..io import RunFolderError, to_uint8
from ..pipelines.text_to_3d import ProgressEvent, RunResult, check_run, generate, make_teacher, run_device

# Errors a user can fix, shown as their first line (the CLI's list, sds3d/cli.py `main`).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, RunFolderError, FloatingPointError, FileNotFoundError,
                                                PermissionError)


def user_errors() -> tuple[type[BaseException], ...]:
    from ..teachers.diffusers import TeacherLoadError
    from ..teachers.embedded import TeacherWeightsError

    return USER_ERRORS + (TeacherLoadError, TeacherWeightsError)


def error_line(error: BaseException) -> str:
    """One line for the page: a user's mistake as its message, anything else named as a failure (its
    traceback goes to the server's log, never to the page)."""
    first = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, user_errors()):
        return f"error: {first}"
    return f"the run failed ({type(error).__name__}: {first}); the app keeps serving, the server log has the details"


# torch's global random generator is one per process: a field's initial weights come from it right
# after `torch.manual_seed(config.seed)` (TextTo3D._init_state), and building any network (a teacher,
# a student) draws from it too. Whatever builds networks in the app holds this lock, and a run holds
# it until its first step is done, so that a run started from the page is bit-identical to the same
# run from the CLI. (With max_runs > 1 the saved previews of one run still draw from it while
# another starts: such runs are not guaranteed bit-identical.)
RNG_LOCK = threading.Lock()


# --- the form --------------------------------------------------------------------------------

def _optional_int(value, name: str) -> int | None:
    """A whole number from the page (gr.Number sends floats, the API anything), or None when blank."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"bad number {name}={value!r}: give a whole number") from None
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"bad number {name}={value!r}: give a whole number")
    return int(number)


def _optional_float(value, name: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"bad number {name}={value!r}: give a number") from None
    if not math.isfinite(number):
        raise ValueError(f"bad number {name}={value!r}: give a finite number")
    return number


def config_from_form(prompt, teacher="embedded", loss="sds", preset="cpu-fast", seed=0, steps=None,
                     guidance_scale=None, settings: str = "") -> GenerateConfig:
    """The run's GenerateConfig from the Generate tab, as `sds3d generate` builds it (dataclass defaults
    < teacher defaults < preset < the fields < the Advanced box's FIELD=VALUE lines, `--set` syntax),
    checked like a CLI run before anything is queued or written (ValueError with one line)."""
    lines = [line.strip() for line in str(settings or "").splitlines()]
    explicit = parse_overrides([line for line in lines if line and not line.startswith("#")])
    seed = _optional_int(seed, "seed")
    config = make_config(str(preset or "cpu-fast"), explicit=explicit, prompt=str(prompt or "").strip(),
                         teacher=str(teacher or "embedded").strip(), loss=str(loss or "sds").strip(),
                         seed=seed, steps=_optional_int(steps, "steps"),
                         guidance_scale=_optional_float(guidance_scale, "guidance_scale"))
    return check_run(config)


def resume_config(run_dir: Path, steps=None) -> GenerateConfig:
    """A stopped run's own config.yaml (a resumed run keeps its settings; only `steps` may extend it)."""
    config = GenerateConfig.load(run_dir / "config.yaml")
    new_steps = _optional_int(steps, "steps")
    if new_steps is not None:
        config.steps = new_steps
    return check_run(config)


# --- teachers kept loaded ----------------------------------------------------------------------

class TeacherCache:
    """Teachers kept between runs (loading one is the slow part of a short run), at most `size`, the
    least recently used dropped first. Keyed by everything `make_teacher` reads from a config."""

    def __init__(self, size: int = 2):
        self.size = size
        self.items: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()

    @staticmethod
    def key(config: GenerateConfig) -> tuple:
        """What makes two configs' teachers differ: the oracle's options (its bank of renders), a
        diffusers teacher's VAE resolution, and for all the spec, the device and the precision."""
        from ..teachers import teacher_kind

        base = (config.teacher, str(run_device(config)), config.precision)
        kind = teacher_kind(config.teacher)
        if kind == "oracle":
            return base + (config.teacher_resolution, config.oracle_views_per_bucket, config.elevation_range,
                           config.distance_range, config.fovy_range, config.oracle_camera_sigma)
        return base + ((config.vae_resolution,) if kind == "diffusers" else ())

    def get(self, config: GenerateConfig):
        key = self.key(config)
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
            teacher = make_teacher(config, run_device(config))
            self.items[key] = teacher
            while len(self.items) > self.size:
                self.items.popitem(last=False)
            return teacher


# --- the queue ----------------------------------------------------------------------------------

class Ticket:
    """One request for an optimization slot; `cancel` is its Cancel button."""

    def __init__(self, label: str = ""):
        self.label = label
        self.cancel = threading.Event()


class RunQueue:
    """First come, first served slots: `limit` optimizations at a time (one per machine by default,
    the training uses every core); the others wait with a visible position."""

    def __init__(self, limit: int = 1):
        if limit < 1:
            raise ValueError(f"bad value max_runs={limit}: must be at least 1")
        self.limit = limit
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.running: set[Ticket] = set()
        self.cond = threading.Condition()

    def join(self, ticket: Ticket) -> None:
        with self.cond:
            self.waiting.append(ticket)

    def position(self, ticket: Ticket) -> int:
        """1 for the next to start, 0 once running (or gone)."""
        with self.cond:
            return self.waiting.index(ticket) + 1 if ticket in self.waiting else 0

    def try_start(self, ticket: Ticket, timeout: float = 0.5) -> bool:
        """Wait up to `timeout` s for the ticket's turn; True when it now holds a slot."""
        with self.cond:
            ready = lambda: self.waiting and self.waiting[0] is ticket and len(self.running) < self.limit  # noqa: E731
            if self.cond.wait_for(ready, timeout=timeout):
                self.waiting.popleft()
                self.running.add(ticket)
                self.cond.notify_all()
                return True
            return False

    def leave(self, ticket: Ticket) -> None:
        """Give up the place in line or the slot."""
        with self.cond:
            if ticket in self.waiting:
                self.waiting.remove(ticket)
            self.running.discard(ticket)
            self.cond.notify_all()


# --- one optimization in a thread -------------------------------------------------------------------

@dataclass
class Update:
    """What the page shows while a run trains."""

    step: int
    total_steps: int
    loss: float
    seconds_left: float | None
    phase: str
    message: str = ""
    preview: np.ndarray | None = None  # (H, W, 3) uint8


class RunJob:
    """`generate` in a worker thread, its progress as a queue of Updates and a stop flag.

    Live previews: the loop's own previews are passed on, and between them the field is rendered
    (ProgressEvent.render, at `preview_resolution` pixels a view) at the first step and then whenever
    `min_interval` seconds have passed and rendering costs at most `preview_budget` of the time since
    the last one, so that watching a run slows it by at most that share."""

    def __init__(self, config: GenerateConfig, run_dir: Path, teacher_loader=None, resume: bool = False,
                 ticket: Ticket | None = None, min_interval: float = 1.0, preview_budget: float = 0.02,
                 preview_resolution: int = 48):
        # teacher_loader(config) -> teacher (the app's TeacherCache.get), called in the worker thread;
        # None: generate loads the teacher itself.
        self.config, self.run_dir, self.teacher_loader, self.resume = config, Path(run_dir), teacher_loader, resume
        self.ticket = ticket or Ticket()
        self.updates: queue.Queue[Update | None] = queue.Queue()
        self.result: RunResult | None = None
        self.error: BaseException | None = None
        self.min_interval, self.preview_budget, self.preview_resolution = min_interval, preview_budget, preview_resolution
        self._last_preview = None  # time of the last preview sent
        self._preview_cost = 0.0
        self.first_preview_s: float | None = None  # seconds from start() to the first preview sent
        self.preview_seconds, self.previews = 0.0, 0  # time spent rendering the page's extra previews
        self._holds_rng = False
        self.thread = threading.Thread(target=self._work, name=f"sds3d-run-{self.run_dir.name}", daemon=True)

    def start(self) -> "RunJob":
        self._started = time.perf_counter()
        self.thread.start()
        return self

    def _want_preview(self) -> bool:
        if self._last_preview is None:
            return True
        since = time.perf_counter() - self._last_preview
        return since >= max(self.min_interval, self._preview_cost / self.preview_budget)

    def _release_rng(self) -> None:
        if self._holds_rng:
            self._holds_rng = False
            RNG_LOCK.release()

    def _callback(self, event: ProgressEvent) -> None:
        self._release_rng()  # the field is built and a step is done: the run draws only from its own generator now
        image = event.preview
        if image is None and event.phase == "train" and event.render is not None and self._want_preview():
            import torch

            begin = time.perf_counter()
            # The render samples along rays from torch's global generator, which the run's scoring
            # (eval.ground_truth) also draws from: restore it, so the page's extra previews leave the
            # run's metrics exactly as the CLI computes them.
            with torch.random.fork_rng(devices=None if torch.cuda.is_available() else []):
                image = event.render(resolution=self.preview_resolution)
            self._preview_cost = time.perf_counter() - begin
            self.preview_seconds += self._preview_cost
            self.previews += 1
        if image is not None:
            self._last_preview = time.perf_counter()
            if self.first_preview_s is None:
                self.first_preview_s = self._last_preview - self._started
        self.updates.put(Update(event.step, event.total_steps, event.loss, event.seconds_left, event.phase, event.message,
                                None if image is None else to_uint8(image)))

    def _work(self) -> None:
        RNG_LOCK.acquire()
        self._holds_rng = True
        try:
            teacher = self.teacher_loader(self.config) if self.teacher_loader is not None else None
            self.result = generate(self.config, out=self.run_dir, resume=self.resume, teacher=teacher,
                                   callback=self._callback, show_progress=False, progress_every=1,
                                   should_stop=self.ticket.cancel.is_set)
        except BaseException as error:  # reported on the page in one line; the app keeps serving
            self.error = error
            if not isinstance(error, user_errors()):
                print(f"sds3d app: run {self.run_dir} failed:", file=sys.stderr)
                traceback.print_exc()
            if not self.resume and not (self.run_dir / "checkpoints" / "last.pt").exists():
                _remove_empty_run(self.run_dir)
        finally:
            self._release_rng()
            self.updates.put(None)

    def join(self) -> None:
        self.thread.join()


def _remove_empty_run(run_dir: Path) -> None:
    """Remove a folder the app made for a run that failed before its first checkpoint (it holds at
    most config.yaml and empty folders), so the gallery lists no run that never was."""
    try:
        files = [p for p in run_dir.rglob("*") if p.is_file()]
        if all(p.name == "config.yaml" and p.parent == run_dir for p in files):
            shutil.rmtree(run_dir)
    except OSError:
        pass
