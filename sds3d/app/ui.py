"""The Gradio Blocks page: Generate, Runs and Students tabs over one output root.

Every run goes through `sds3d.pipelines.text_to_3d.generate` (see jobs.RunJob); this module only
turns form values into calls and results into components. Safety rules of the page:
- files are served only from the output root (`allowed_paths=[root]`), and every run or student
  name the browser sends is resolved and checked to lie inside it (paths.inside_root);
- a user's mistake (unknown prompt, bad teacher, bad number, bad setting) comes back as one line in
  the status box, and a run that crashes is reported the same way while the app keeps serving;
- runs wait in a first-come queue (`max_runs` at a time) that shows each waiting page its position.
"""

from __future__ import annotations

import html
import threading
import time
from pathlib import Path

import gradio as gr

from ..config import PRESETS, make_config
from ..world.prompts import world_txt_prompts
from .jobs import RNG_LOCK, RunJob, RunQueue, TeacherCache, Ticket, config_from_form, error_line, resume_config, user_errors
from .paths import OutsideRootError, inside_root
from .runs import contact_sheet, list_runs, metrics_markdown, new_run_dir, summarize, thumbnail_array
from .students import MAX_IMAGES, StudentSampler, list_students

TEACHER_CHOICES = ["embedded", "oracle"]
LOSS_CHOICES = ["sds", "vsd", "nfsd"]
UPDATE_EVERY_S = 0.5  # the page is refreshed at most this often while a run trains
PHASES = {"train": "training", "export": "exporting", "evaluate": "scoring", "stopped": "stopping"}
PREVIEW_ZOOM = 2  # live previews are 64 px a view: shown twice as large (nearest neighbour)
SETTINGS_HINT = ("One FIELD=VALUE per line, YAML values, any field of a run's config.yaml (as `sds3d generate "
                 "--set`), e.g.\nlambda_z_variance=100\nelevation_range=[0, 45]")


def progress_html(step: int = 0, total: int = 0, loss: float | None = None, seconds_left: float | None = None,
                  text: str = "") -> str:
    """A progress bar with step, loss and time left (plain HTML: no script, every value escaped)."""
    share = 0.0 if not total else max(0.0, min(1.0, step / total))
    parts = [f"step {step}/{total}"] if total else []
    if loss is not None and loss == loss:
        parts.append(f"loss {loss:.4g}")
    if seconds_left is not None:
        minutes, seconds = divmod(int(round(seconds_left)), 60)
        parts.append(f"{minutes}:{seconds:02d} left")
    if text:
        parts.append(text)
    label = html.escape(" · ".join(parts))
    return (f'<div class="sds3d-progress" role="progressbar" aria-valuemin="0" aria-valuemax="{total}" '
            f'aria-valuenow="{step}">'
            f'<div style="background:#e5e7eb;border-radius:6px;height:14px;overflow:hidden">'
            f'<div style="background:#f97316;height:14px;width:{100 * share:.1f}%"></div></div>'
            f'<div class="sds3d-progress-label" style="font-family:monospace;margin-top:4px">{label}</div></div>')


class Panel:
    """The components that show one run: status, progress, live preview, viewer, video, contact
    sheet, metrics, downloads, a JSON summary (for API clients) and the Resume button."""

    def __init__(self, prefix: str):
        self.status = gr.Markdown("Ready.", elem_id=f"{prefix}-status")
        self.progress = gr.HTML(progress_html(), elem_id=f"{prefix}-progress")
        self.resume = gr.Button("Resume this run", visible=False, elem_id=f"{prefix}-resume")
        self.preview = gr.Image(label="live preview: four views around the object", type="numpy", format="png",
                                interactive=False, elem_id=f"{prefix}-preview", height=180)
        with gr.Row():
            self.model = gr.Model3D(label="mesh (GLB)", elem_id=f"{prefix}-model", height=360)
            self.video = gr.Video(label="turntable", elem_id=f"{prefix}-video", autoplay=True, loop=True,
                                  interactive=False, height=360)
        with gr.Row():
            self.sheet = gr.Image(label="contact sheet: 8 views (ground truth below), or the previews so far", type="filepath", interactive=False,
                                  elem_id=f"{prefix}-sheet")
            self.metrics = gr.Markdown("", elem_id=f"{prefix}-metrics")
        self.files = gr.File(label="downloads: GLB, OBJ (+ MTL, PNG texture), PLY, MP4, config.yaml", file_count="multiple",
                             interactive=False, elem_id=f"{prefix}-files")
        with gr.Accordion("run summary (JSON)", open=False):
            self.summary = gr.JSON(elem_id=f"{prefix}-summary")
        self.run = gr.State(None)  # the shown run's folder name, relative to the output root

    def outputs(self) -> list:
        """What a run's stream updates. Not the 3D viewer: gr.Model3D stays blank when a streaming
        (generator) event sets it (gradio 6), so a plain event shows the mesh after the run
        (`SDS3DApp.model_of`)."""
        return [self.status, self.progress, self.preview, self.video, self.sheet, self.metrics, self.files,
                self.summary, self.run, self.resume]

    @staticmethod
    def values(status=None, progress=None, preview=None, video=None, sheet=None, metrics=None, files=None,
               summary=None, run=None, resume=None, clear: bool = False) -> tuple:
        """A tuple for `outputs()`: the given values, the others left as they are (or emptied with clear)."""
        keep = None if clear else gr.skip()
        given = [status, progress, preview, video, sheet, metrics, files, summary, run, resume]
        return tuple(keep if value is None else value for value in given)


class SDS3DApp:
    """The app's state across pages: the output root, the queue, teachers kept loaded, who may cancel what."""

    def __init__(self, out_root: str | Path = "outputs", max_runs: int = 1, warm: bool = True):
        self.root = Path(out_root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.queue = RunQueue(max_runs)
        self.teachers = TeacherCache()
        self.students = StudentSampler(self.root)
        self.tickets: dict[str, set[Ticket]] = {}  # browser session -> its runs (waiting or running)
        self.jobs: dict[Path, RunJob] = {}  # running jobs by folder
        self.lock = threading.Lock()
        if warm:
            threading.Thread(target=self.warm_up, name="sds3d-warm-up", daemon=True).start()

    # -- start-up ---------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Load the default teacher and build the hash-grid op before the first Generate, so that the
        first preview comes within seconds (the first run would otherwise pay for both)."""
        try:
            from ..nerf import hashgrid_cpp

            with RNG_LOCK:  # building the teacher's network draws from torch's global generator
                self.teachers.get(make_config("cpu-fast", prompt="a red cube")).encode_prompt(["a red cube"])
            hashgrid_cpp.available()  # builds (or loads) the CPU hash-grid op
        except Exception as error:  # only a slower first run: say so in the log
            print(f"sds3d app: warm-up skipped ({type(error).__name__}: {error})", flush=True)

    # -- runs -------------------------------------------------------------------------------------
    def _name(self, run_dir: Path) -> str:
        return str(Path(run_dir).resolve().relative_to(self.root))

    def finished_values(self, run_dir: Path, state: str, message: str, extra: dict | None = None) -> tuple:
        """Everything the page shows of a run folder, from the folder itself."""
        summary = summarize(self.root, run_dir)
        if summary is None:
            return Panel.values(status=message, progress=progress_html(text=state), clear=True, run=None,
                                resume=gr.update(visible=False), summary={"state": state, "message": message})
        # generate's 8 views above the ground truth once the run is done, else the previews so far
        sheet = run_dir / "contact_sheet.png" if (run_dir / "contact_sheet.png").is_file() else contact_sheet(run_dir)
        files = summary.files
        info = {"run": summary.name, "state": state, "message": message, "prompt": summary.prompt,
                "seed": summary.seed, "steps": summary.steps, "step": summary.step, "status": summary.status,
                "files": {name: f"{summary.name}/{name}" for name in files},
                "metrics": {k: v for k, v in (summary.metrics or {}).items() if k != "views"}, **(extra or {})}
        total = summary.steps or 0
        step = total if summary.finished else (summary.step or 0)
        preview = thumbnail_full(summary.thumbnail)
        return (f"**{_esc(state)}**: {message}",
                progress_html(step, total, text=summary.status),
                preview,
                str(files["turntable.mp4"]) if "turntable.mp4" in files else None,
                str(sheet) if sheet else None,
                metrics_markdown(summary.metrics, summary.prompt),
                [str(path) for path in files.values()] or None,
                info,
                summary.name,
                gr.update(visible=not summary.finished))

    def run(self, config, session: str, run_dir: Path | None = None, resume: bool = False):
        """Wait for a slot, then train, streaming the page's updates; a generator of Panel tuples."""
        ticket = Ticket(config.prompt)
        with self.lock:
            self.tickets.setdefault(session, set()).add(ticket)
        self.queue.join(ticket)
        job = None
        begin = time.perf_counter()
        try:
            shown = None
            while not self.queue.try_start(ticket, timeout=0.5):
                if ticket.cancel.is_set():
                    yield Panel.values(status="**cancelled** before it started: nothing was trained",
                                       progress=progress_html(text="cancelled"))
                    return
                position = self.queue.position(ticket)
                if position != shown:
                    shown = position
                    yield Panel.values(status=f"**queued**: position {position} in the queue "
                                              f"({self.queue.limit} run{'s' if self.queue.limit > 1 else ''} at a time "
                                              f"on this machine); it starts by itself",
                                       progress=progress_html(text=f"queue position {position}"))
            if ticket.cancel.is_set():
                yield Panel.values(status="**cancelled** before it started: nothing was trained",
                                   progress=progress_html(text="cancelled"))
                return
            if run_dir is None:
                run_dir = new_run_dir(self.root, config.prompt, config.seed)
            name = self._name(run_dir)
            with self.lock:
                if run_dir.resolve() in self.jobs:  # two Resume presses of one run: the first one runs it
                    yield Panel.values(status=f"error: run {_esc(name)} is running already",
                                       progress=progress_html(text="not started"))
                    return
                job = RunJob(config, run_dir, teacher_loader=self.teachers.get, resume=resume, ticket=ticket)
                self.jobs[run_dir.resolve()] = job
            job.start()
            verb = "resuming" if resume else "running"
            yield Panel.values(status=f"**{verb}** {_esc(config.prompt)} (seed {config.seed}) in `{name}`",
                               progress=progress_html(0, config.steps, text="loading the teacher"),
                               run=name, resume=gr.update(visible=False), clear=not resume)
            yield from self._stream(job, name)
            job.join()
            yield self._final(job, run_dir, begin)
        finally:
            if job is not None and job.thread.is_alive():  # the page went away: stop cleanly, keep the checkpoint
                ticket.cancel.set()
                job.join()
            if job is not None:
                with self.lock:
                    self.jobs.pop(job.run_dir.resolve(), None)
            self.queue.leave(ticket)
            with self.lock:
                self.tickets.get(session, set()).discard(ticket)
                if not self.tickets.get(session):
                    self.tickets.pop(session, None)

    def _stream(self, job: RunJob, name: str):
        """Page updates from the job's queue, at most one per UPDATE_EVERY_S (the latest values win)."""
        import queue as queue_module

        done = False
        while not done:
            latest, preview = None, None
            deadline = time.perf_counter() + UPDATE_EVERY_S
            while True:
                try:
                    update = job.updates.get(timeout=max(0.01, deadline - time.perf_counter()))
                except queue_module.Empty:
                    break
                if update is None:
                    done = True
                    break
                latest = update
                if update.preview is not None:
                    preview = update.preview.repeat(PREVIEW_ZOOM, axis=0).repeat(PREVIEW_ZOOM, axis=1)
                if time.perf_counter() >= deadline:
                    break
            if latest is None:
                continue
            text = latest.message or ("cancelling: stopping after this step" if job.ticket.cancel.is_set() else "")
            phase = PHASES.get(latest.phase, latest.phase)
            yield Panel.values(status=f"**{phase}** `{name}`" + (f": {_esc(text)}" if text else ""),
                               progress=progress_html(latest.step, latest.total_steps, latest.loss,
                                                      latest.seconds_left, text),
                               preview=preview)

    def _final(self, job: RunJob, run_dir: Path, begin: float) -> tuple:
        extra = {"seconds": round(time.perf_counter() - begin, 2),
                 "first_preview_s": None if job.first_preview_s is None else round(job.first_preview_s, 2),
                 "live_previews": job.previews, "live_preview_seconds": round(job.preview_seconds, 2)}
        if job.error is not None:
            message = error_line(job.error)
            if not run_dir.exists():
                return Panel.values(status=_esc(message), progress=progress_html(text="failed"),
                                    summary={"state": "error", "message": message, **extra},
                                    resume=gr.update(visible=False))
            shown = message[len("error: "):] if message.startswith("error: ") else message
            return self.finished_values(run_dir, "error", _esc(shown), {**extra, "message": message})
        result = job.result
        if result.stopped:
            return self.finished_values(run_dir, "stopped",
                                        f"cancelled at step {result.steps} of {job.config.steps}; the checkpoint is "
                                        f"kept: press Resume to continue", extra)
        return self.finished_values(run_dir, "done", f"finished {result.steps} steps in {extra['seconds']:.1f} s", extra)

    # -- event handlers ---------------------------------------------------------------------------
    def generate(self, prompt, teacher, loss, preset, seed, steps, guidance, settings, request: gr.Request):
        """Generate tab: check the form (one line on a mistake), then queue and run."""
        try:
            config = config_from_form(prompt, teacher, loss, preset, seed, steps, guidance, settings)
        except Exception as error:
            yield self._refused(error)
            return
        yield from self.run(config, _session(request))

    def resume_run(self, name, steps, request: gr.Request):
        """Resume the named run (a folder of the output root) from its checkpoint."""
        try:
            run_dir = inside_root(self.root, str(name or ""))
            if run_dir == self.root or not (run_dir / "config.yaml").is_file():
                raise OutsideRootError(f"{name!r} is not a run folder of the output root")
            if not (run_dir / "checkpoints" / "last.pt").is_file():
                raise ValueError(f"run {name!r} has no checkpoint to resume from")
            with self.lock:
                if run_dir in self.jobs:
                    raise ValueError(f"run {name!r} is running already")
            config = resume_config(run_dir, steps)
        except Exception as error:
            yield self._refused(error)
            return
        yield from self.run(config, _session(request), run_dir=run_dir, resume=True)

    def _refused(self, error: BaseException) -> tuple:
        if not isinstance(error, user_errors()):
            import traceback

            traceback.print_exc()
        message = error_line(error)
        return Panel.values(status=_esc(message), progress=progress_html(text="not started"),
                            summary={"state": "error", "message": message})

    def cancel(self, request: gr.Request) -> str:
        """Cancel every run this page started (waiting ones leave the queue, running ones stop after the
        step in progress and keep their checkpoint)."""
        with self.lock:
            tickets = list(self.tickets.get(_session(request), ()))
        if not tickets:
            return "Nothing to cancel: no run of this page is waiting or running."
        for ticket in tickets:
            ticket.cancel.set()
        return "**cancelling**: the run stops after the step in progress and keeps its checkpoint"

    def open_run(self, name) -> tuple:
        """Show a run folder of the output root (the Runs tab); a name outside the root is refused."""
        try:
            run_dir = inside_root(self.root, str(name or ""))
            if run_dir == self.root or not (run_dir / "config.yaml").is_file():
                raise OutsideRootError(f"{name!r} is not a run folder of the output root")
        except Exception as error:
            return self._refused(error)
        with self.lock:
            running = run_dir in self.jobs
        summary = summarize(self.root, run_dir)
        state = "running" if running else ("done" if summary and summary.finished else "stopped")
        values = list(self.finished_values(run_dir, state, f"`{_esc(self._name(run_dir))}`"))
        if running:
            values[-1] = gr.update(visible=False)
        return tuple(values)

    def model_of(self, name) -> str | None:
        """The GLB of a run folder of the output root, for the 3D viewer (None: none yet, or refused)."""
        try:
            glb = inside_root(self.root, f"{name}/mesh.glb") if name else None
        except OutsideRootError:
            return None
        return str(glb) if glb is not None and glb.is_file() else None

    def refresh_runs(self):
        """Gallery items, a table and the picker's choices of every run under the output root."""
        runs = list_runs(self.root)
        with self.lock:
            running = set(self.jobs)
        gallery, rows = [], ["| run | prompt | seed | status | IoU | colour error |", "|---|---|---|---|---|---|"]
        for run in runs:
            status = "running" if run.path in running else run.status
            image = thumbnail_array(run)  # runs without a preview yet are in the table only
            if image is not None:
                gallery.append((image, f"{run.caption if status == run.status else run.caption + ' · running'}"))
            metrics = run.metrics or {}
            iou, color = metrics.get("iou_mean"), metrics.get("color_error_mean")
            rows.append(f"| `{run.name}` | {_cell(run.prompt)} | {run.seed} | {status} | "
                        f"{'' if iou is None else f'{iou:.3f}'} | {'' if color is None else f'{color:.3f}'} |")
        table = "\n".join(rows) if runs else f"No runs yet in `{self.root}`."
        shown = [run.name for run in runs if thumbnail_array(run) is not None]  # the gallery's items, in order
        return gallery, table, gr.update(choices=[run.name for run in runs]), shown

    def pick_run(self, names, event: gr.SelectData):
        index = event.index if isinstance(event.index, int) else event.index[0]
        name = names[index] if names and 0 <= index < len(names) else None
        return (gr.update(value=name),) + self.open_run(name)

    def refresh_students(self):
        names = list_students(self.root)
        return gr.update(choices=names, value=names[0] if names else None)

    def compare_students(self, name, prompt, seed, n):
        try:
            from .jobs import _optional_int

            seed = _optional_int(seed, "seed") or 0
            n = _optional_int(n, "images") or 4
            result = self.students.compare(str(name or ""), prompt, seed, n)
        except Exception as error:
            if not isinstance(error, user_errors()):
                import traceback

                traceback.print_exc()
            return None, None, _esc(error_line(error))
        return _zoom(result.student), _zoom(result.teacher), result.markdown()

    # -- the page ---------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        examples = world_txt_prompts()
        with gr.Blocks(title="sds3d: text to 3D") as demo:
            gr.Markdown("# sds3d: text to 3D by score distillation\nType a prompt of the embedded world (or pick an "
                        "example), press **Generate**, watch the NeRF form, take the mesh home. Output root: "
                        f"`{_esc(str(self.root))}`.")
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=320):
                        prompt = gr.Textbox(label="prompt", value="", placeholder="a red cube", elem_id="prompt")
                        gr.Examples(examples=[[p] for p in examples], inputs=[prompt], examples_per_page=12,
                                    label="prompts of the embedded world (prompts/world.txt)")
                        teacher = gr.Dropdown(TEACHER_CHOICES, value="embedded", allow_custom_value=True,
                                              label="teacher: embedded, oracle, a diffusers folder or a cached hub id",
                                              elem_id="teacher")
                        loss = gr.Radio(LOSS_CHOICES, value="sds", label="loss", elem_id="loss")
                        preset = gr.Dropdown(list(PRESETS), value="cpu-fast", label="preset", allow_custom_value=True,
                                             elem_id="preset")
                        with gr.Row():
                            seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                            steps = gr.Textbox(value="", label="steps (blank: the preset's)", elem_id="steps")
                        with gr.Accordion("Advanced", open=False):
                            guidance = gr.Textbox(value="", label="guidance scale (blank: the teacher's default)",
                                                  elem_id="guidance")
                            settings = gr.Textbox(label="more settings", lines=4, placeholder=SETTINGS_HINT,
                                                  elem_id="settings")
                        with gr.Row():
                            go = gr.Button("Generate", variant="primary", elem_id="generate-button")
                            stop = gr.Button("Cancel", variant="stop", elem_id="cancel-button")
                    with gr.Column(scale=2):
                        panel = Panel("gen")
            with gr.Tab("Runs", id="runs") as runs_tab:
                with gr.Row():
                    refresh = gr.Button("Refresh", elem_id="runs-refresh")
                    picker = gr.Dropdown([], label="run folder", allow_custom_value=True, elem_id="run-picker")
                    resume_steps = gr.Textbox(value="", label="resume up to step (blank: its own)",
                                              elem_id="resume-steps")
                gallery = gr.Gallery(label="runs under the output root: front view of the last preview (click one to "
                                           "open it)", columns=8, height="auto", allow_preview=False,
                                     elem_id="runs-gallery", object_fit="contain")
                table = gr.Markdown(elem_id="runs-table")
                names = gr.State([])
                runs_panel = Panel("runs")
                with gr.Row():
                    runs_stop = gr.Button("Cancel", variant="stop", elem_id="runs-cancel-button")
            with gr.Tab("Students", id="students"):
                gr.Markdown("A few-step student of the teacher next to the teacher itself (DDIM, 50 steps): same "
                            "prompt, same seed, same starting noise. Students are folders under "
                            f"`{_esc(str(self.root / 'students'))}` written by `sds3d distill`.")
                with gr.Row():
                    student = gr.Dropdown([], label="student folder", allow_custom_value=True, elem_id="student")
                    student_prompt = gr.Textbox(value="a red cube", label="prompt", elem_id="student-prompt")
                    student_seed = gr.Number(value=0, precision=0, label="seed", elem_id="student-seed")
                    count = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="images", elem_id="student-count")
                sample_button = gr.Button("Sample", variant="primary", elem_id="student-sample")
                with gr.Row():
                    student_image = gr.Image(label="student", type="numpy", format="png", interactive=False,
                                             elem_id="student-image")
                    teacher_image = gr.Image(label="teacher (DDIM, 50 steps)", type="numpy", format="png",
                                             interactive=False, elem_id="teacher-image")
                student_info = gr.Markdown(elem_id="student-info")

            optimize = dict(concurrency_limit=None)  # the app's own RunQueue limits the runs and shows positions
            form = [prompt, teacher, loss, preset, seed, steps, guidance, settings]
            hidden = dict(api_visibility="private", show_progress="hidden")
            for trigger in (go.click, prompt.submit):
                trigger(_blank, None, panel.model, **hidden).then(
                    self.generate, form, panel.outputs(), show_progress="hidden", **optimize,
                    **(dict(api_name="generate") if trigger == go.click else dict(api_visibility="private"))).then(
                    self.model_of, panel.run, panel.model, **hidden)
            stop.click(self.cancel, None, panel.status, api_name="cancel", concurrency_limit=None)
            panel.resume.click(_blank, None, panel.model, **hidden).then(
                self.resume_run, [panel.run, gr.State(None)], panel.outputs(), **hidden, **optimize).then(
                self.model_of, panel.run, panel.model, **hidden)

            runs_outputs = [gallery, table, picker, names]
            refresh.click(self.refresh_runs, None, runs_outputs, api_name="list_runs")
            runs_tab.select(self.refresh_runs, None, runs_outputs, api_visibility="private")
            demo.load(self.refresh_runs, None, runs_outputs, api_visibility="private")
            picker.input(self.open_run, picker, runs_panel.outputs(), api_name="open_run").then(
                self.model_of, runs_panel.run, runs_panel.model, **hidden)
            gallery.select(self.pick_run, names, [picker] + runs_panel.outputs(), api_visibility="private").then(
                self.model_of, runs_panel.run, runs_panel.model, **hidden)
            runs_panel.resume.click(_blank, None, runs_panel.model, **hidden).then(
                self.resume_run, [picker, resume_steps], runs_panel.outputs(), api_name="resume",
                show_progress="hidden", **optimize).then(self.model_of, runs_panel.run, runs_panel.model, **hidden)
            runs_stop.click(self.cancel, None, runs_panel.status, api_visibility="private", concurrency_limit=None)

            demo.load(self.refresh_students, None, student, api_visibility="private")
            sample_button.click(self.compare_students, [student, student_prompt, student_seed, count],
                                [student_image, teacher_image, student_info], api_name="compare_students")
        return demo


def _zoom(image, min_height: int = 192):
    """A small image grid enlarged by a whole factor (nearest neighbour: every pixel stays as sampled)."""
    factor = max(1, min_height // max(1, image.shape[0]))
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def _blank():
    return None


def thumbnail_full(path: Path | None):
    return str(path) if path is not None else None


def _esc(text) -> str:
    """Text for a Markdown component: <, > and & escaped (quotes kept readable for API clients)."""
    return html.escape(str(text), quote=False)


def _cell(text: str) -> str:
    return html.escape(str(text)).replace("|", "\\|")


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "no-session"


def build_app(out_root: str | Path = "outputs", max_runs: int = 1, warm: bool = True) -> gr.Blocks:
    """The page over `out_root` (created if missing), `max_runs` optimizations at a time."""
    return SDS3DApp(out_root, max_runs=max_runs, warm=warm).build()


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False, out_root: str | Path = "outputs",
           max_runs: int = 1, block: bool = True, warm: bool = True):
    """Serve the page on host:port (loopback unless told otherwise), files only from `out_root`."""
    app = SDS3DApp(out_root, max_runs=max_runs, warm=warm)
    demo = app.build()
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(app.root)],
                prevent_thread_lock=True, show_error=False, quiet=not block)
    if share:  # Gradio keeps serving locally when its tunnel cannot be set up (offline): say which it is
        print(f"sds3d app: public share link {demo.share_url}" if demo.share_url else
              "sds3d app: no public share link (Gradio could not set up its tunnel: no internet here?); "
              f"serving on http://{host}:{port} only", flush=True)
    if block:
        demo.block_thread()
    return demo
