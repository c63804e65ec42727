"""SIGKILL a real `sds3d generate` at random moments, `--resume` it, again and again: the final
checkpoint's field equals an uninterrupted run's bit for bit, and the temporary files of the
checkpoint writes that the kills cut short are gone.

The kills land mid-run (after one or two more checkpoint writes of the attempt) either while the
field computes or while `checkpoints/last.pt` is being written (its atomic temporary file is seen
on disk); the moments come from a seeded `random.Random`, so a failure can be replayed. The
reference is the same command run without interruption. The run stops being watched once its last
step's checkpoint and preview are written (`previews/step-NNNNN.png` follows the checkpoint), so
neither run pays for the export."""

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sds3d.io import ATOMIC_TEMPORARY

PROMPT = "a red cube"


def command(out: Path, steps: int, resume: bool) -> list[str]:
    base = [sys.executable, "-m", "sds3d", "generate", PROMPT, "--out", str(out), "--quiet", "--no-eval"]
    if resume:  # a resumed run keeps its config.yaml: no --set, no --steps
        return base + ["--resume"]
    # on the CPU everywhere: CUDA's atomic adds would make even two uninterrupted runs differ
    return base + ["--preset", "smoke", "--steps", str(steps), "--set", "checkpoint_every=1",
                   "--set", "preview_every=1000", "--set", "device=cpu"]


def start(out: Path, steps: int, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen(command(out, steps, resume), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=out.parent)


def temporaries(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*") if p.is_file() and ATOMIC_TEMPORARY.match(p.name)]


def checkpoint_identity(path: Path):
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns  # os.replace of a new temporary file changes both


def watch(proc: subprocess.Popen, run: Path, steps: int, rng: random.Random | None, mode: str | None = None,
          timeout: float = 240.0) -> str:
    """Follow one attempt. With `rng`: after 1-2 more checkpoint writes, SIGKILL it either at once
    when the next write's temporary file appears ("write") or a random moment of the next step
    ("compute"). Without: wait for the final step's checkpoint and preview, then stop it ("done").
    Returns what happened: "write", "compute", "done" or "exited" (the run finished on its own)."""
    checkpoint = run / "checkpoints" / "last.pt"
    final_preview = run / "previews" / f"step-{steps:05d}.png"
    writes_left = rng.choice([1, 2]) if rng else None
    mode = mode or (rng.choice(["write", "compute"]) if rng else None)
    last = checkpoint_identity(checkpoint)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return "exited"
        if final_preview.exists():
            proc.kill()
            proc.wait()
            return "done"
        now = checkpoint_identity(checkpoint)
        if now is not None and now != last:
            last = now
            if writes_left is not None:
                writes_left -= 1
        if writes_left is not None and writes_left <= 0:
            if mode == "write":
                if any(p.name.startswith(".last.") for p in temporaries(run / "checkpoints")):
                    proc.kill()  # SIGKILL mid-write: torch.save into the temporary file is under way
                    proc.wait()
                    return "write"
            else:
                time.sleep(rng.uniform(0.0, 0.12))
                proc.kill()
                proc.wait()
                return "compute"
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    raise AssertionError(f"{run}: no progress within {timeout} s")


def field(run: Path) -> tuple[int, dict]:
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    return state["step"], state["field"]


def uninterrupted(tmp_path: Path, steps: int) -> tuple[int, dict]:
    run = tmp_path / "straight"
    proc = start(run, steps, resume=False)
    assert watch(proc, run, steps, None) in ("done", "exited"), proc.stderr.read().decode()
    return field(run)


def kill_and_resume(tmp_path: Path, steps: int, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    reference_step, reference = uninterrupted(tmp_path, steps)
    assert reference_step == steps
    run = tmp_path / "killed"
    outcomes, left_behind = [], []
    for attempt in range(kills):
        proc = start(run, steps, resume=attempt > 0)
        outcome = watch(proc, run, steps, rng, mode="write" if attempt == 0 else None)  # one mid-write kill at least
        if outcome in ("done", "exited"):
            stderr = proc.stderr.read().decode()
            pytest.fail(f"attempt {attempt}: the run ended before kill {len(outcomes) + 1} of {kills} "
                        f"({outcome}); give it more steps\n{stderr}")
        outcomes.append(outcome)
        left_behind += temporaries(run)
    proc = start(run, steps, resume=True)
    outcome = watch(proc, run, steps, None)
    assert outcome in ("done", "exited"), proc.stderr.read().decode()
    if outcome == "exited":
        assert proc.returncode == 0, proc.stderr.read().decode()

    assert "write" in outcomes and left_behind, f"no kill landed during a checkpoint write: {outcomes}"
    assert not any(p.exists() for p in left_behind), "a killed write's temporary file survived the next start"
    step, state = field(run)
    assert step == steps
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(state[key], value), f"{key} differs from the uninterrupted run's after {outcomes}"


def test_three_kills_then_resume_equal_an_uninterrupted_run(tmp_path):
    """The default suite's share: three kills (one at least mid-write) on a 16-step run."""
    kill_and_resume(tmp_path, steps=16, kills=3, seed=3)


@pytest.mark.slow
def test_ten_kills_in_a_row_then_resume_equal_an_uninterrupted_run(tmp_path):
    kill_and_resume(tmp_path, steps=48, kills=10, seed=10)
