"""`sds3d batch`: prompt files, the manifest, resume after a kill, the local pool against `generate`.

The reference for a batch line is `sds3d generate` of the same prompt and settings, run as its own
command with the same thread count: a batch adds scheduling, not another result.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sds3d.cli import main
from sds3d.pipelines.prompt_file import read_prompt_file

ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def sds3d(*argv, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "sds3d", *argv], env=env or ENV, capture_output=True, text=True,
                          **kwargs)


def read_records(batch: Path) -> list[dict]:
    return [json.loads(line) for line in (batch / "manifest.jsonl").read_text().splitlines()]


def test_prompt_file_syntax(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\n\na red cube\n  a snowman | seed=3 steps=400 teacher=oracle  \n"
                    "a red cube | azimuth_range=[-90,90] negative_prompt=\"a blurry image\" preset=smoke\n")
    lines = read_prompt_file(path)
    assert [(line.number, line.prompt) for line in lines] == [(3, "a red cube"), (4, "a snowman"), (5, "a red cube")]
    assert lines[0].overrides == {}
    assert lines[1].overrides == {"seed": 3, "steps": 400, "teacher": "oracle"}
    assert lines[2].overrides == {"azimuth_range": [-90, 90], "negative_prompt": "a blurry image", "preset": "smoke"}


@pytest.mark.parametrize("text,words", [
    ("", ["holds no prompt"]),
    ("# only a comment\n\n", ["holds no prompt"]),
    ("a red cube\n| seed=3\n", ["line 2", "no prompt"]),
    ("a red cube | seed\n", ["line 1", "FIELD=VALUE"]),
    ("a red cube\n\na red cube | nosuch=1\n", ["line 3", "nosuch"]),
    ("a red cube | seed=abc\n", ["line 1", "seed"]),
    ("a red cube | steps=0\n", ["line 1", "steps"]),
    ("a photograph of a giraffe\n", ["line 1", "unknown prompt"]),
    ('a red cube | negative_prompt="open\n', ["line 1", "quote"]),
    ("a red cube | \n", ["line 1", "nothing after the bar"]),
    ("a red cube | preset=turbo\n", ["line 1", "preset"]),
])
def test_bad_prompt_files_stop_before_anything_runs(capsys, tmp_path, text, words):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    code, err = run_cli(capsys, "batch", str(path), "--out", str(tmp_path / "batch"))
    assert code == 2 and len(err) == 1, err
    assert all(word in err[0] for word in words), err[0]
    assert not (tmp_path / "batch").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["missing file", "unknown override", "unreachable ray", "bad ray address",
                                  "workers 0", "exists", "resume not a batch"])
def test_bad_batch_arguments(capsys, tmp_path, case):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube | preset=smoke\n")
    out = tmp_path / "batch"
    argv = ["batch", str(prompts), "--out", str(out)]
    expect = {"missing file": "not found", "unknown override": "nosuch", "unreachable ray": "cannot reach",
              "bad ray address": "HOST:PORT", "workers 0": "--workers", "exists": "--resume",
              "resume not a batch": "not a batch folder"}[case]
    if case == "missing file":
        argv[1] = str(tmp_path / "nothing.txt")
    elif case == "unknown override":
        argv += ["--set", "nosuch=3"]
    elif case == "unreachable ray":
        argv += ["--ray", f"127.0.0.1:{_free_port()}"]
    elif case == "bad ray address":
        argv += ["--ray", "my-cluster"]
    elif case == "workers 0":
        argv += ["--workers", "0"]
    elif case in ("exists", "resume not a batch"):
        out.mkdir()
        (out / "mine.txt").write_text("a user's file")
        argv += ["--resume"] if case == "resume not a batch" else []
    code, err = run_cli(capsys, *argv)
    assert code == 2 and len(err) == 1 and expect in err[0], err
    if case in ("exists", "resume not a batch"):
        assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
        assert (out / "mine.txt").read_text() == "a user's file"
    else:
        assert not out.exists()


def test_batch_matches_generate_and_a_failing_line_does_not_stop_the_others(tmp_path):
    """Two world prompts and one line whose teacher folder cannot load, on two workers of one
    thread each: the good lines score exactly what `sds3d generate` scores for the same settings at
    one thread, the bad line is recorded failed with its error line, and the folder has what people
    look at (contact sheets, loss curves, summaries, index.html)."""
    broken = tmp_path / "broken-teacher"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a red cube | seed=1\n# the next line fails when it loads its teacher\n"
                       f"a red cube | teacher={broken}\na blue sphere\n")
    batch = tmp_path / "batch"
    result = sds3d("batch", str(prompts), "--out", str(batch), "--preset", "smoke", "--workers", "2", timeout=600)
    assert result.returncode == 1, result.stderr
    assert "1 of 3 line(s) failed" in result.stderr
    records = read_records(batch)
    assert [(r["line"], r["state"], r["threads"], r["attempts"]) for r in records] == \
        [(1, "done", 1, 1), (3, "failed", 1, 1), (4, "done", 1, 1)]
    assert "broken-teacher" in records[1]["error"] and "Traceback" not in records[1]["error"]

    reference = tmp_path / "reference"
    generated = sds3d("generate", "a red cube", "--preset", "smoke", "--seed", "1", "--out", str(reference),
                      env={**ENV, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert generated.returncode == 0, generated.stderr
    truth = json.loads((reference / "metrics.json").read_text())
    for key in ("iou_mean", "color_error_mean", "chamfer"):
        assert records[0]["metrics"][key] == truth[key], key

    for record in (records[0], records[2]):
        run = batch / record["run_dir"]
        from PIL import Image

        assert Image.open(run / "contact_sheet.png").size == (8 * 128, 2 * 128)  # 8 views, the truth below
        assert len((run / "loss.csv").read_text().splitlines()) == 1 + 20  # header + the smoke preset's steps
        assert (run / "loss_curve.png").is_file()
        summary = (run / "summary.md").read_text()
        assert record["prompt"] in summary and f"{record['metrics']['iou_mean']:.4g}" in summary
        assert Path(batch / record["files"]["glb"]).is_file()
    page = (batch / "index.html").read_text()
    assert all(f'{r["run_dir"]}/' in page for r in (records[0], records[2]))
    assert "2 done, 1 failed" in page and "broken-teacher" in page


def test_sigkill_mid_batch_then_resume_finishes_every_line_once(tmp_path):
    """SIGKILL the driver while line 2 runs; the manifest parses as JSON Lines at every moment we
    look; `--resume` runs what is left: every line done, line 1 not run again."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere | steps=200 checkpoint_every=10\na green cone\n")
    batch = tmp_path / "batch"
    driver = subprocess.Popen([sys.executable, "-m", "sds3d", "batch", str(prompts), "--out", str(batch),
                               "--preset", "smoke"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen, deadline = set(), time.time() + 300
    try:
        while time.time() < deadline:
            if (batch / "manifest.jsonl").exists():
                records = read_records(batch)  # must parse whenever we read it
                seen.add(tuple(r["state"] for r in records))
                checkpoint = batch / records[1]["run_dir"] / "checkpoints" / "last.pt"
                if records[1]["state"] == "running" and checkpoint.exists():
                    break
            time.sleep(0.05)
        else:
            pytest.fail(f"line 2 never got a checkpoint; states seen {seen}")
    finally:
        driver.kill()
        driver.wait()
    time.sleep(1.0)  # the kernel delivers PR_SET_PDEATHSIG to the line's process
    records = read_records(batch)
    assert [r["state"] for r in records] == ["done", "running", "queued"]
    first_mesh = batch / records[0]["run_dir"] / "mesh.glb"
    first_mtime = first_mesh.stat().st_mtime_ns
    leftover = [line for line in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
                if "sds3d-batch-line" in line or str(batch) in line]
    assert not leftover, leftover  # no orphan still writing into the batch

    resumed = sds3d("batch", str(prompts), "--out", str(batch), "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "3 line(s), 2 to run (1 done before)" in resumed.stdout
    records = read_records(batch)
    assert [(r["state"], r["attempts"]) for r in records] == [("done", 1), ("done", 2), ("done", 1)]
    assert first_mesh.stat().st_mtime_ns == first_mtime
    assert all(r["metrics"]["iou_mean"] > 0 for r in records)


@pytest.mark.slow
def test_ray_batch_matches_the_local_pool(tmp_path):
    """Three smoke lines as Ray tasks on a local Ray instance give the local pool's manifest:
    the same lines, states and metrics for the same seeds and thread counts."""
    pytest.importorskip("ray")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere | seed=2\na snowman | teacher=oracle\n")
    local = sds3d("batch", str(prompts), "--out", str(tmp_path / "local"), "--preset", "smoke", "--workers", "2",
                  timeout=900)
    assert local.returncode == 0, local.stderr
    on_ray = sds3d("batch", str(prompts), "--out", str(tmp_path / "ray"), "--preset", "smoke", "--workers", "2",
                   "--ray", timeout=900)
    assert on_ray.returncode == 0, on_ray.stderr
    a, b = read_records(tmp_path / "local"), read_records(tmp_path / "ray")
    assert [r["worker"] for r in b] == ["ray"] * 3
    for x, y in zip(a, b):
        assert (x["line"], x["prompt"], x["state"], x["threads"], x["run_dir"]) == \
            (y["line"], y["prompt"], y["state"], y["threads"], y["run_dir"])
        assert {k: v for k, v in x["metrics"].items() if not k.endswith("_seconds")} == \
            {k: v for k, v in y["metrics"].items() if not k.endswith("_seconds")}  # all but the timings


@pytest.mark.slow
def test_ctrl_c_stops_lines_with_a_checkpoint_and_resume_finishes(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube | steps=400 checkpoint_every=50\na blue sphere\n")
    batch = tmp_path / "batch"
    driver = subprocess.Popen([sys.executable, "-m", "sds3d", "batch", str(prompts), "--out", str(batch),
                               "--preset", "smoke", "--workers", "2"], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (batch / "manifest.jsonl").exists():
            records = read_records(batch)
            if records[0]["state"] == "running" and (batch / records[0]["run_dir"] / "previews").exists():
                break
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 130, err
    records = read_records(batch)
    assert records[0]["state"] == "interrupted"
    assert (batch / records[0]["run_dir"] / "checkpoints" / "last.pt").exists()
    resumed = sds3d("batch", str(prompts), "--out", str(batch), "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["state"] for r in read_records(batch)] == ["done", "done"]


@pytest.mark.slow
def test_a_line_stopped_by_its_own_signal_leaves_the_batch_unfinished(tmp_path):
    """SIGINT to one line's process (not the driver: `kill -INT PID`, or a Ctrl-C that reaches the
    lines before the driver) stops that line with a checkpoint; the batch exits 130 (not finished),
    and --resume finishes it."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube | steps=400 checkpoint_every=50\n")
    batch = tmp_path / "batch"
    driver = subprocess.Popen([sys.executable, "-m", "sds3d", "batch", str(prompts), "--out", str(batch),
                               "--preset", "smoke"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (batch / "manifest.jsonl").exists():
            record = read_records(batch)[0]
            if record["state"] == "running" and (batch / record["run_dir"] / "checkpoints" / "last.pt").exists():
                break
        time.sleep(0.1)
    os.kill(int(record["worker"].split()[-1]), signal.SIGINT)
    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 130, err
    assert "--resume" in err
    record = read_records(batch)[0]
    assert record["state"] == "interrupted"
    resumed = sds3d("batch", str(prompts), "--out", str(batch), "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert read_records(batch)[0]["state"] == "done"
