"""The student framework (sds3d/distill/students/common.py), one-step KD, and `sds3d distill` /
`sds3d sample` on bad input; the 2-process accelerate run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sds3d.cli import main
from sds3d.diffusion.solvers import ddim_sample
from sds3d.distill.students import METHODS, StudentConfig, StudentFolderError, StudentModel, StudentRun, load_student
from sds3d.distill.students.common import student_timesteps
from sds3d.distill.students.kd import OneStepKD
from tiny_teachers import tiny_teacher

PROMPTS = ["a red cube", "a blue sphere", "a green cone"]
quiet = lambda *a: None  # noqa: E731


def kd_config(**kw) -> StudentConfig:
    base = dict(method="kd", nfe=1, steps=60, batch_size=8, lr=2e-3, warmup_steps=5, log_every=10,
                checkpoint_every=1000, sample_every=0, guidance=2.0, options={"pairs": 16, "teacher_steps": 8, "pair_batch": 16})
    base.update(kw)
    return StudentConfig(**base)


def test_a_fresh_student_is_its_teacher():
    """StudentModel runs the teacher's own code on a copy of its network: at init it predicts
    exactly the teacher's unguided eps, and training it never touches the teacher."""
    teacher = tiny_teacher()
    student = StudentModel(teacher)
    cond = teacher.encode_prompt(PROMPTS)
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([999, 500, 10])
    torch.testing.assert_close(student.predict_eps(x, t, cond), teacher.predict_eps(x, t, cond, 1.0))
    before = {k: v.clone() for k, v in teacher.network.state_dict().items()}
    student.predict_eps(x, t, cond).square().mean().backward()
    assert all(p.grad is None for p in teacher.network.parameters())
    with torch.no_grad():
        for p in student.network.parameters():
            p.add_(0.1)
    assert all(torch.equal(before[k], v) for k, v in teacher.network.state_dict().items())


def test_student_timesteps_are_a_strictly_decreasing_polynomial_grid():
    teacher = tiny_teacher()
    for intervals in (1, 2, 3, 4, 8):
        ts = student_timesteps(teacher.schedule, intervals)
        assert len(ts) == intervals + 1 and ts[0] == 999 and ts[-1] == 0
        assert all(a > b for a, b in zip(ts, ts[1:]))
    # The interior follows EDM's rho = 7 polynomial in sigma (eq. 5), snapped to the schedule.
    abar = teacher.schedule.alphas_cumprod.double()
    sig = lambda t: float(((1 - abar[t]) / abar[t]).sqrt())  # noqa: E731
    lo, hi = max(0.006, sig(0)), 80.0
    for i, t in enumerate(student_timesteps(teacher.schedule, 4)[1:-1], start=1):
        want = (hi ** (1 / 7) + i / 4 * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
        assert abs(math.log(sig(t) / want)) < 0.05, (i, t, sig(t), want)


def test_kd_learns_the_teachers_ddim_map(tmp_path):
    """A few dozen steps of one-step KD bring the student's one-step output closer to the teacher's
    DDIM output from the same noise (the regression target, computed independently here)."""
    torch.set_num_threads(1)
    teacher = tiny_teacher()
    run = StudentRun(tmp_path / "kd", kd_config(), OneStepKD, teacher=teacher, log=quiet, prompts=PROMPTS)
    pairs = run.method.pairs
    cond = teacher.encode_prompt([PROMPTS[i] for i in pairs["index"].tolist()])
    expected = ddim_sample(teacher, cond, 8, 2.0, x_T=pairs["x_T"], spacing="trailing", clip_x0=True).x
    torch.testing.assert_close(pairs["x_0"], expected)  # the cached pairs are the teacher's own DDIM map

    def error():
        with torch.no_grad():
            return float((OneStepKD.one_step(run.student, pairs["x_T"], cond) - expected).pow(2).mean())

    before = error()
    run.train()
    after = error()
    assert after < 0.5 * before, (before, after)
    meta = json.loads((tmp_path / "kd" / "student.json").read_text())
    assert meta["nfe"] == 1 and meta["steps_done"] == 60 and meta["format"] == "sds3d-student"
    assert (tmp_path / "kd" / "loss_curve.png").stat().st_size > 1000
    assert (tmp_path / "kd" / "MODEL_CARD.md").exists() and list((tmp_path / "kd" / "samples").glob("*.png"))
    # load_student rebuilds the same student, and refuses another teacher.
    student, method, _ = load_student(tmp_path / "kd", METHODS, teacher=teacher)
    with torch.no_grad():
        torch.testing.assert_close(OneStepKD.one_step(student, pairs["x_T"], cond),
                                   OneStepKD.one_step(run.student, pairs["x_T"], cond))
    with pytest.raises(StudentFolderError, match="another teacher"):
        load_student(tmp_path / "kd", METHODS, teacher=tiny_teacher(seed=1))


def test_student_resume_is_exact(tmp_path):
    torch.set_num_threads(1)
    teacher = tiny_teacher()
    straight = StudentRun(tmp_path / "a", kd_config(steps=12), OneStepKD, teacher=teacher, log=quiet, prompts=PROMPTS)
    straight.train()
    first = StudentRun(tmp_path / "b", kd_config(steps=12), OneStepKD, teacher=teacher, log=quiet, prompts=PROMPTS)
    first.train(max_steps=7)  # as if interrupted at step 7
    resumed = StudentRun(tmp_path / "b", kd_config(steps=12), OneStepKD, teacher=teacher, log=quiet, prompts=PROMPTS)
    assert resumed.loop.step == 7
    resumed.train()
    a, b = straight.student.network.state_dict(), resumed.student.network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("argv, message", [
    (["distill", "--method", "magic", "--nfe", "1"], "unknown method 'magic'"),
    (["distill", "--method", "kd", "--nfe", "2"], "cannot make a 2-NFE student"),
    (["distill", "--method", "kd", "--nfe", "1", "--set", "options.pairz=3"], "unknown kd option"),
    (["distill", "--method", "kd", "--nfe", "1", "--set", "lr=-1"], "lr"),
])
def test_distill_refuses_bad_input_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "student"
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not out.exists()


def test_sample_refuses_a_folder_that_is_not_a_student(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("prompt: a red cube\n")
    assert main(["sample", "a red cube", "--student", str(tmp_path / "run"), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a student folder" in err[0]
    assert not (tmp_path / "x.png").exists()


ACCELERATE_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from accelerate import PartialState
from sds3d.distill.students import StudentRun, StudentConfig
from sds3d.distill.students.common import make_accelerator
from sds3d.distill.students.kd import OneStepKD
from tiny_teachers import tiny_teacher
torch.set_num_threads(1)
acc = make_accelerator()
assert acc is not None and acc.num_processes == 2
config = StudentConfig(method="kd", nfe=1, steps=6, batch_size=4, lr=2e-3, warmup_steps=1, log_every=3,
                       checkpoint_every=1000, sample_every=0, guidance=2.0,
                       options={{"pairs": 8, "teacher_steps": 4, "pair_batch": 8}})
run = StudentRun({out!r}, config, OneStepKD, teacher=tiny_teacher(), log=lambda *a: None,
                 prompts=["a red cube", "a blue sphere"], accelerator=acc)
run.train()
torch.save(run.student.network.state_dict(), {out!r} + f"/replica{{acc.process_index}}.pt")
"""


def test_two_accelerate_processes_train_one_student_with_identical_replicas(tmp_path):
    """`accelerate launch --num_processes 2` on CPU (gloo): the run completes and both replicas end
    with the same weights, which differ from the initial ones (gradients were all-reduced)."""
    script = tmp_path / "train.py"
    out = tmp_path / "student"
    out.mkdir()
    script.write_text(ACCELERATE_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    a = torch.load(out / "replica0.pt", weights_only=True)
    b = torch.load(out / "replica1.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    initial = tiny_teacher().network.state_dict()
    assert any(not torch.equal(a[k], initial[k].to(a[k].dtype)) for k in a)
    assert (out / "checkpoints" / "last.pt").exists() and (out / "student.json").exists()


@pytest.mark.parametrize("method", ["sfd", "progressive", "consistency", "kd"])
def test_every_method_distils_a_latent_diffusers_teacher_with_the_same_code(tmp_path, method):
    """A Stable Diffusion pipeline (latent space, eps-prediction, CLIP token states) is a teacher
    like any other: each method trains a few steps on it and samples latents of its shape that the
    VAE decodes to images, through the same StudentRun, with no special case."""
    from sds3d.teachers import load_teacher
    from tiny_sd import build_tiny_sd_pipeline

    torch.set_num_threads(1)
    teacher = load_teacher(str(build_tiny_sd_pipeline(tmp_path / "sd", "epsilon", seed=0)))
    nfe = {"sfd": 1, "progressive": 2, "consistency": 1, "kd": 1}[method]
    options = {"sfd": {}, "progressive": {"start_steps": 4, "samples": 4, "sample_steps": 4},
               "consistency": {"n_grid": 6, "samples": 4, "sample_steps": 4}, "kd": {"pairs": 4, "teacher_steps": 4}}[method]
    config = StudentConfig(method=method, teacher="tiny-sd", nfe=nfe, steps=4, batch_size=2, lr=1e-4, warmup_steps=1,
                           log_every=2, checkpoint_every=1000, sample_every=0, guidance=2.0, options=options)
    run = StudentRun(tmp_path / method, config, METHODS[method], teacher=teacher, log=quiet, prompts=PROMPTS)
    before = {k: v.clone() for k, v in run.student.network.state_dict().items()}
    result = run.train()
    assert result["step"] == 4
    assert any(not torch.equal(before[k], v) for k, v in run.student.network.state_dict().items())
    out = run.method.sample(run.student, teacher.encode_prompt(PROMPTS[:2]), nfe, torch.Generator().manual_seed(0))
    assert out.x.shape == (2, teacher.channels, teacher.resolution, teacher.resolution) and teacher.channels == 4
    assert out.images.shape == (2, 3, teacher.vae_resolution, teacher.vae_resolution)
    assert torch.isfinite(out.images).all() and out.nfe == nfe


def test_kd_moves_a_toy_students_one_step_samples_to_the_exact_ode(tmp_path):
    """One-step KD on the Gaussian-mixture teacher of test_students_sfd (exact eps, exact RK4 ODE):
    a few hundred steps bring the student's 1-NFE samples several times closer to the exact ODE
    solution from the same noise than the untrained student (the teacher's own one DDIM step)."""
    from test_students_sfd import MixtureTeacher, exact_ode, rms

    torch.set_num_threads(1)
    teacher = MixtureTeacher()
    abar = teacher.schedule.alphas_cumprod.double()
    sigmas = ((1 - abar) / abar).sqrt()
    x_T = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    exact = exact_ode(x_T, sigmas[999].item(), sigmas[0].item())
    cond = teacher.encode_prompt(["toy"] * 256)
    config = StudentConfig(method="kd", nfe=1, steps=300, batch_size=64, lr=1e-2, warmup_steps=10, log_every=50,
                           checkpoint_every=1000, sample_every=0, grad_clip=None, guidance=1.0,
                           options={"pairs": 512, "teacher_steps": 100, "pair_batch": 512})
    run = StudentRun(tmp_path / "kd", config, OneStepKD, teacher=teacher, log=quiet, prompts=["toy"])
    before = rms(run.method.sample(run.student, cond, 1, None, x_T=x_T).x, exact)
    run.train()
    after = rms(run.method.sample(run.student, cond, 1, None, x_T=x_T).x, exact)
    assert before > 0.15 and after < 0.4 * before, (before, after)


def test_a_student_of_an_earlier_shipped_teacher_still_loads(tmp_path, monkeypatch):
    """A student distilled from "embedded" keeps loading after the package ships a new default teacher
    and the earlier one under its own name (SHIPPED_TEACHERS); with the earlier one gone, the one-line
    error says it was made from another teacher."""
    from sds3d import teachers
    from sds3d.distill.students.common import network_sha256

    torch.set_num_threads(1)
    old, new = tiny_teacher(seed=0), tiny_teacher(seed=1)
    old.save(tmp_path / "old", prompt_table=PROMPTS)
    new.save(tmp_path / "new", prompt_table=PROMPTS)
    monkeypatch.setitem(teachers.SHIPPED_TEACHERS, "embedded", tmp_path / "old")
    StudentRun(tmp_path / "kd", kd_config(steps=3, teacher="embedded"), OneStepKD, log=quiet, prompts=PROMPTS).train()
    monkeypatch.setitem(teachers.SHIPPED_TEACHERS, "embedded", tmp_path / "new")
    monkeypatch.setitem(teachers.SHIPPED_TEACHERS, "embedded-v1", tmp_path / "old")
    student, _, meta = load_student(tmp_path / "kd", METHODS)
    shipped = {name: network_sha256(teachers.load_teacher(str(tmp_path / name)).network) for name in ("old", "new")}
    assert network_sha256(student.teacher.network) == meta["teacher"]["network_sha256"] == shipped["old"] != shipped["new"]
    monkeypatch.setitem(teachers.SHIPPED_TEACHERS, "embedded-v1", tmp_path / "missing")
    with pytest.raises(StudentFolderError, match="another teacher"):
        load_student(tmp_path / "kd", METHODS)
