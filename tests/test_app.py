"""The web app without a browser: the path rule, the stop flag of the loop, and a launched app driven
through gradio_client (a real HTTP server on 127.0.0.1 at a free port, torn down after the module).

References: a run started from the page must be bit-identical to `generate` called as the CLI calls
it (same config, same seed), the GLB it serves must be the file in the run folder and a mesh trimesh
reads; files and run names outside the output root are refused by the server, not just hidden.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

import pytest
import torch

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from sds3d.app.paths import OutsideRootError, inside_root  # noqa: E402
from sds3d.config import make_config  # noqa: E402
from sds3d.pipelines.text_to_3d import generate  # noqa: E402


def field_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")["field"]


def assert_same_field(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


# --- the path rule -------------------------------------------------------------------------------

def test_inside_root_refuses_dotdot_and_symlinks_out(tmp_path):
    root, outside = tmp_path / "outputs", tmp_path / "secret"
    (root / "run-0").mkdir(parents=True)
    outside.mkdir()
    (outside / "key.txt").write_text("secret")
    (root / "escape").symlink_to(outside, target_is_directory=True)  # a link planted inside the root
    (root / "alias").symlink_to(root / "run-0", target_is_directory=True)  # a link that stays inside

    assert inside_root(root, "run-0") == (root / "run-0").resolve()
    assert inside_root(root, "alias") == (root / "run-0").resolve()
    assert inside_root(root, str(root / "run-0")) == (root / "run-0").resolve()  # absolute, but inside
    for bad in ["../secret", "../secret/key.txt", "run-0/../../secret", "escape", "escape/key.txt",
                str(outside / "key.txt"), "/etc/passwd", "", "run-0\x00"]:
        with pytest.raises(OutsideRootError):
            inside_root(root, bad)
    with pytest.raises(OutsideRootError, match="does not exist"):
        inside_root(root, "no-such-run")


# --- the loop's stop flag ---------------------------------------------------------------------------

def test_stop_flag_keeps_the_checkpoint_and_resume_is_exact(tmp_path):
    """The Cancel button's contract: training stops before the next step, the checkpoint holds the
    step reached (5, not a multiple of checkpoint_every), nothing is exported, and resuming ends
    exactly where an uninterrupted run ends."""
    config = make_config("smoke", prompt="a red cube", steps=8, checkpoint_every=4, preview_every=4)
    generate(config, out=tmp_path / "straight", show_progress=False, evaluate=False)

    seen = []
    stop = lambda: bool(seen) and seen[-1].step >= 5  # noqa: E731
    result = generate(config, out=tmp_path / "stopped", show_progress=False, evaluate=False,
                      callback=seen.append, progress_every=1, should_stop=stop)
    assert result.stopped and result.steps == 5 and result.files == {}
    assert [e.step for e in seen if e.phase == "train"] == [1, 2, 3, 4, 5]
    assert seen[-1].phase == "stopped" and "step 5" in seen[-1].message
    assert torch.load(tmp_path / "stopped" / "checkpoints" / "last.pt", weights_only=True)["step"] == 5
    assert not (tmp_path / "stopped" / "mesh.glb").exists()
    # ETA of a step-1 event: 7 steps left at the pace of one step
    first = seen[0]
    assert first.seconds_left == pytest.approx(first.elapsed_s * 7)

    generate(config, out=tmp_path / "stopped", resume=True, show_progress=False, evaluate=False)
    assert_same_field(field_state(tmp_path / "straight"), field_state(tmp_path / "stopped"))


# --- the page, built and served -----------------------------------------------------------------------

def test_app_builds_with_its_endpoints(tmp_path):
    from sds3d.app import build_app

    demo = build_app(tmp_path / "outputs", warm=False)
    assert isinstance(demo, gr.Blocks)
    names = {fn.api_name for fn in demo.fns.values() if fn.api_name}
    assert {"generate", "cancel", "list_runs", "open_run", "resume", "compare_students"} <= names
    assert (tmp_path / "outputs").is_dir()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(root: Path, warm: bool):
    """(url, app) of an SDS3DApp over `root` launched on a free 127.0.0.1 port; closed on exit."""
    from sds3d.app.ui import SDS3DApp

    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    app = SDS3DApp(root, max_runs=1, warm=warm)
    demo = app.build()
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(app.root)])
    try:
        yield f"http://127.0.0.1:{port}/", app
    finally:
        demo.close()
        mp.undo()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, output root, app) of a launched app; closed after the module's tests."""
    with serve_app(tmp_path_factory.mktemp("app") / "outputs", warm=False) as (url, app):
        yield url, app.root, app


def client(url):
    return gradio_client.Client(url, verbose=False)


def generate_args(prompt, preset="smoke", seed=0, steps=None, teacher="embedded", settings=""):
    return dict(prompt=prompt, teacher=teacher, loss="sds", preset=preset, seed=seed, steps=steps, guidance=None,
                settings=settings, api_name="/generate")


def summary_of(out) -> dict:
    """The run summary (gr.JSON) among a run event's outputs."""
    return next(value for value in out if isinstance(value, dict) and "state" in value)


def files_of(out) -> list[str]:
    """The downloads (gr.File, multiple) among a run event's outputs: local copies the client fetched."""
    return next(value for value in out if isinstance(value, list))


def statuses(job) -> list[str]:
    return [out[0] for out in job.outputs() if isinstance(out[0], str)]


def test_two_pages_both_get_their_run_and_it_equals_the_cli(served, tmp_path):
    """Two sessions press Generate at once: one runs, the other is shown its queue position, both
    finish. The page's run equals `generate` as the CLI calls it, bit for bit, and the GLB it serves
    is the run folder's file, a mesh trimesh reads."""
    import trimesh

    url, root, _ = served
    a, b = client(url), client(url)
    job_a = a.submit(**generate_args("a red cube"))
    job_b = b.submit(**generate_args("a blue sphere"))
    out_a, out_b = job_a.result(timeout=300), job_b.result(timeout=300)
    for out in (out_a, out_b):
        assert summary_of(out)["state"] == "done", out[0]
    queued = [any(s.startswith("**queued**: position 1") for s in statuses(job)) for job in (job_a, job_b)]
    assert sorted(queued) == [False, True], (statuses(job_a), statuses(job_b))

    summary = summary_of(out_a)
    run_dir = inside_root(root, summary["run"])
    glb = inside_root(root, summary["files"]["mesh.glb"])  # a path inside the output root
    assert glb == run_dir / "mesh.glb" and glb.is_file()
    served_glb = [Path(f) for f in files_of(out_a) if Path(f).name == "mesh.glb"]
    assert served_glb[0].read_bytes() == glb.read_bytes()  # what the page offers is that file
    mesh = trimesh.load(glb, force="mesh")
    assert len(mesh.faces) > 100
    assert {"mesh.glb", "mesh.obj", "mesh.ply", "turntable.mp4", "config.yaml"} <= set(summary["files"])
    assert 0.0 <= summary["metrics"]["iou_mean"] <= 1.0

    reference = generate(make_config("smoke", prompt="a red cube"), out=tmp_path / "cli", show_progress=False)
    assert_same_field(field_state(tmp_path / "cli"), field_state(run_dir))
    assert summary["metrics"]["iou_mean"] == pytest.approx(reference.metrics["iou_mean"], abs=0)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(prompt="a photograph of a giraffe"), "error: unknown prompt 'a photograph of a giraffe'"),
    (dict(prompt="a red cube", steps=-3), "error: bad value steps=-3"),
    (dict(prompt="a red cube", teacher="./no/such/teacher"), "error: teacher folder ./no/such/teacher does not exist"),
    (dict(prompt="a red cube", settings="lamda_z_variance=3"), "error: unknown setting lamda_z_variance"),
    (dict(prompt="a red cube", preset="fast"), "error: unknown preset 'fast'"),
])
def test_mistakes_come_back_as_one_line(served, kwargs, expected):
    url, root, _ = served
    before = sorted(p.name for p in root.iterdir())
    out = client(url).predict(**generate_args(**kwargs))
    status, summary = out[0], summary_of(out)
    assert status.startswith(expected), status
    assert "\n" not in status and "Traceback" not in status
    assert summary == {"state": "error", "message": status}
    assert sorted(p.name for p in root.iterdir()) == before  # nothing was made


def test_files_and_runs_outside_the_root_are_refused(served, tmp_path):
    import httpx

    url, root, _ = served
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the page")
    repo_file = Path(__file__).resolve().parents[1] / "pyproject.toml"
    (root / "link-out").symlink_to(tmp_path, target_is_directory=True)
    inside = root / "served.txt"
    inside.write_text("fine")
    for path in (secret, repo_file, root / "link-out" / "secret.txt", Path("/etc/passwd")):
        response = httpx.get(f"{url}gradio_api/file={path}")
        assert response.status_code == 403, (path, response.status_code)
    assert httpx.get(f"{url}gradio_api/file={inside}").text == "fine"  # the root itself is served

    c = client(url)
    for name in ("../", "link-out", str(tmp_path), "../../etc"):
        status = c.predict(name, api_name="/open_run")[0]
        assert status.startswith("error: refused") or "not a run folder" in status, (name, status)
    status = c.predict("../..", None, api_name="/resume")[0]
    assert status.startswith("error: refused"), status


def test_cancel_stops_at_the_next_step_and_resume_finishes(served):
    url, root, _ = served
    c = client(url)
    job = c.submit(**generate_args("a green torus", steps=2000, settings="checkpoint_every=1000\npreview_every=1000"))
    deadline = time.time() + 120
    while time.time() < deadline and not any("step " in str(out[1]) and "aria-valuenow=\"0\"" not in str(out[1])
                                               for out in job.outputs()):
        time.sleep(0.2)
    assert c.predict(api_name="/cancel").startswith("**cancelling**")
    out = job.result(timeout=120)
    summary = summary_of(out)
    assert summary["state"] == "stopped", out[0]
    stopped_at = summary["step"]
    assert 1 <= stopped_at < 2000
    run_dir = inside_root(root, summary["run"])
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == stopped_at
    assert not (run_dir / "mesh.glb").exists()

    names = [row for row in c.predict(api_name="/list_runs")[1].splitlines() if summary["run"] in row]
    assert names and f"stopped at step {stopped_at}/2000" in names[0]
    out = c.predict(summary["run"], stopped_at + 2, api_name="/resume")
    assert summary_of(out)["state"] == "done" and summary_of(out)["step"] == stopped_at + 2, out[0]
    assert (run_dir / "mesh.glb").is_file()


def test_students_tab_compares_a_student_with_its_teacher_from_the_same_noise(served):
    """A (tiny) KD student under <root>/students: the tab's two pictures are the student's one step and the
    teacher's DDIM-50 (trailing, clipped x0: EMBEDDED_DDIM) from the same x_T, drawn here with torch.randn
    from the seed; the NFE column says 1 and 100 (50 guided steps)."""
    import imageio.v2 as imageio

    from sds3d.diffusion.solvers import ddim_sample
    from sds3d.distill.students import METHODS, StudentConfig, StudentRun, load_student
    from sds3d.distill.students.kd import OneStepKD
    from sds3d.io import image_grid, to_uint8
    from tiny_teachers import tiny_teacher

    url, root, app = served
    config = StudentConfig(method="kd", nfe=1, steps=2, batch_size=4, warmup_steps=1, checkpoint_every=1000,
                           sample_every=0, guidance=2.0, options={"pairs": 4, "teacher_steps": 4, "pair_batch": 4})
    folder = root / "students" / "kd-nfe1-0"
    StudentRun(folder, config, OneStepKD, teacher=tiny_teacher(), log=lambda *a: None,
               prompts=["a red cube", "a blue sphere"]).train()
    app.students.teacher_loader = lambda spec: tiny_teacher()  # the folder's spec names the shipped teacher

    c = client(url)
    student_png, teacher_png, info = c.predict("students/kd-nfe1-0", "a red cube", 3, 2, api_name="/compare_students")
    assert "| student (kd) | 1 |" in info and "| 100 |" in info, info

    teacher = tiny_teacher()
    student, _, meta = load_student(folder, METHODS, teacher=teacher)
    cond = teacher.encode_prompt(["a red cube"] * 2)
    x_T = torch.randn((2, teacher.channels, teacher.resolution, teacher.resolution), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = teacher.decode(OneStepKD.one_step(student, x_T, cond))
    reference = ddim_sample(teacher, cond, 50, meta["guidance"], x_T=x_T, spacing="trailing", clip_x0=True).images
    for png, images in ((student_png, ours), (teacher_png, reference)):
        shown, grid = imageio.imread(png)[..., :3], to_uint8(image_grid(images, 2))
        zoom = shown.shape[0] // grid.shape[0]  # the page enlarges small images by a whole factor
        assert zoom >= 1 and (shown == grid.repeat(zoom, axis=0).repeat(zoom, axis=1)).all()

    _, _, refused = c.predict("../..", "a red cube", 0, 1, api_name="/compare_students")
    assert refused.startswith("error: "), refused


def test_the_launcher_serves_the_page_on_loopback_only(tmp_path):
    """`python apps/gradio_app.py` (= `sds3d app`) binds 127.0.0.1 by default and serves the page; a bad
    port is one error line. Asked for `--share` where Gradio's tunnel cannot be set up (no internet,
    as here and in CI), it keeps serving locally and says so in one line."""
    import subprocess
    import sys

    import httpx

    from sds3d.cli import build_parser, main

    assert build_parser().parse_args(["app"]).host == "127.0.0.1"
    assert main(["app", "--port", "70000"]) == 2

    port = free_port()
    launcher = Path(__file__).resolve().parents[1] / "apps" / "gradio_app.py"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    process = subprocess.Popen([sys.executable, str(launcher), "--port", str(port), "--out-root", str(tmp_path / "out"),
                                "--share"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    lines: list[str] = []
    import threading

    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    try:
        deadline, page = time.time() + 120, None
        while time.time() < deadline and process.poll() is None:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert page is not None and page.status_code == 200, process.stdout.read() if process.poll() is not None else ""
        assert "sds3d" in page.text
        listening = _listening_addresses(port)  # bound to the loopback address only
        assert listening and all(address.startswith("127.") for address in listening), listening
        while time.time() < deadline and not any("share link" in line for line in lines):
            time.sleep(0.2)  # Gradio tries its tunnel after the local server is up
    finally:
        process.terminate()
        process.wait(timeout=30)
    said = [line.rstrip("\n") for line in lines if "share link" in line and line.startswith("sds3d app:")]
    assert len(said) == 1, "".join(lines)
    assert said[0].startswith("sds3d app: public share link https://") or \
        said[0] == f"sds3d app: no public share link (Gradio could not set up its tunnel: no internet here?); " \
                   f"serving on http://127.0.0.1:{port} only", said


def _listening_addresses(port: int) -> list[str]:
    """Local addresses with a TCP socket listening on `port`, from /proc/net/tcp (IPv4) and tcp6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if int(hex_port, 16) != port or state != "0A":  # 0A: LISTEN
                continue
            if len(address) == 8:
                found.append(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
            else:
                found.append("ipv6:" + address)
    return found


def test_a_crashed_run_is_one_line_and_the_app_keeps_serving(served, monkeypatch):
    """A failure that is no user's mistake (here the teacher loader raising) ends that run with one line
    naming it, removes the folder it had just made, and the next request is served as usual."""
    url, root, app = served

    def broken(config):
        raise RuntimeError("simulated crash\nsecond line that must not reach the page")

    monkeypatch.setattr(app.teachers, "get", broken)
    before = sorted(p.name for p in root.iterdir())
    c = client(url)
    out = c.predict(**generate_args("a yellow cube"))
    status = out[0]
    assert status.startswith("the run failed (RuntimeError: simulated crash)"), status
    assert "\n" not in status and "second line" not in status and "Traceback" not in status
    assert sorted(p.name for p in root.iterdir()) == before
    monkeypatch.undo()
    table = c.predict(api_name="/list_runs")[1]  # still serving
    assert table.startswith("| run |") or table.startswith("No runs yet")
