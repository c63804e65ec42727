"""SFD, SFD-v and the SFD second stage (sds3d/distill/students/sfd.py): the loss against a one-step
first-order teacher (exactly zero), AFS against its closed form, the grids against EDM's eq. 5, a
toy Gaussian-mixture teacher whose exact probability-flow ODE is integrated here, the step condition
of SFD-v (exact at init, folded exactly), and bad input."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sds3d.cli import main
from sds3d.diffusion.protocol import Cond
from sds3d.diffusion.schedule import NoiseSchedule
from sds3d.diffusion.solvers import dpmpp_integrate, polynomial_timesteps
from sds3d.distill.students import METHODS, StudentConfig, StudentModel, StudentRun
from sds3d.distill.students.common import make_method, student_timesteps
from sds3d.distill.students.sfd import (SFD, SFDSecondStage, SFDv, StepConditioned, fold_step_condition,
                                        load_sfd_student, sfd_timesteps, teacher_timesteps)
from tiny_teachers import tiny_teacher

PROMPTS = ["a red cube", "a blue sphere", "a green cone"]
quiet = lambda *a: None  # noqa: E731


def config(method="sfd", **kw) -> StudentConfig:
    base = dict(method=method, nfe=2, steps=2, batch_size=4, lr=1e-3, warmup_steps=1, log_every=1,
                checkpoint_every=1000, sample_every=0, guidance=1.0)
    base.update(kw)
    return StudentConfig(**base)


# --- the loss and the first step against closed forms ------------------------------------------

def test_one_first_order_teacher_step_per_interval_gives_zero_loss(tmp_path):
    """With no inserted points (M = 0) and order 1, the teacher's trajectory is DDIM on the student's
    own grid (DPM-Solver++(1) is DDIM, Lu et al. 2022 Sec. 4), so a student equal to its teacher
    (guidance 1) follows it exactly: the loss is 0. It is not 0 when the teacher sub-steps, nor with
    AFS (the teacher's first step is a network step, the student's analytic)."""
    torch.set_num_threads(1)
    teacher = tiny_teacher()
    losses = {}
    for name, options in {"exact": dict(sub_steps=0, teacher_order=1, afs=False),
                          "sub_steps": dict(sub_steps=1, teacher_order=1, afs=False),
                          "afs": dict(sub_steps=0, teacher_order=1, afs=True)}.items():
        run = StudentRun(tmp_path / name, config(nfe=3, options=options), SFD, teacher=teacher, log=quiet, prompts=PROMPTS)
        losses[name] = run.method.loss(0, torch.Generator().manual_seed(0)).item()
    assert losses["exact"] < 1e-6, losses
    assert losses["sub_steps"] > 1e-4 and losses["afs"] > 1e-4, losses


class Recorder(nn.Module):
    """A student network that records what it is called with and predicts v = 0."""

    config = SimpleNamespace(camera_dim=0)

    def __init__(self):
        super().__init__()
        self.calls = []
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, text, camera=None):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        return torch.zeros_like(x)


def test_analytic_first_step_matches_its_closed_form():
    """AFS (SFD Sec. 4.2): from x_T at t = T - 1, DDIM with eps = x_T to t_1, i.e.
    x_1 = sqrt(abar_1) (x_T - sqrt(1 - abar_T) x_T) / sqrt(abar_T) + sqrt(1 - abar_1) x_T, costing no
    evaluation; t_1 is the middle of EDM's 3-point rho = 7 grid from sigma 80 to sigma(0)."""
    teacher = tiny_teacher()
    recorder = Recorder()
    student = StudentModel(teacher, network=recorder)
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    out = SFD(config(nfe=1)).sample(student, teacher.encode_prompt(PROMPTS[:2]), 1, None, x_T=x_T)
    assert out.nfe == 1 and len(recorder.calls) == 1
    abar = teacher.schedule.alphas_cumprod.double()
    sigmas = ((1 - abar) / abar).sqrt()
    sigma_1 = ((80 ** (1 / 7) + sigmas[0].item() ** (1 / 7)) / 2) ** 7  # EDM eq. 5, i = 1 of 0..2
    t_1 = int((sigmas.log() - math.log(sigma_1)).abs().argmin())
    x, t = recorder.calls[0]
    assert t.tolist() == [t_1, t_1]
    a_T, a_1 = abar[999], abar[t_1]
    expected = a_1.sqrt() * (x_T.double() - (1 - a_T).sqrt() * x_T.double()) / a_T.sqrt() + (1 - a_1).sqrt() * x_T.double()
    torch.testing.assert_close(x.double(), expected, rtol=1e-5, atol=1e-5)


def test_grids_count_evaluations_and_nest_in_the_polynomial_grid():
    """A k-NFE grid has k + 1 intervals with AFS, k without; the teacher's grid with M inserted points
    is EDM's (M + 1) K + 1-point polynomial grid (eq. 5) with the student's points at every (M + 1)-th."""
    schedule = NoiseSchedule.cosine()
    for nfe in (1, 2, 4):
        assert len(sfd_timesteps(schedule, nfe, True)) == nfe + 2 and len(sfd_timesteps(schedule, nfe, False)) == nfe + 1
    grid = student_timesteps(schedule, 3)
    fine, marks = teacher_timesteps(schedule, grid, 3)
    assert [fine[m] for m in marks] == grid and marks == [0, 4, 8, 12]
    assert fine[1:] == polynomial_timesteps(schedule.alphas_cumprod, 12)[1:]  # t_0 = T - 1 instead of sigma 80


# --- a toy teacher with an exact ODE -----------------------------------------------------------

MEANS = torch.tensor([[0.6, 0.2, -0.4, 0.5], [-0.5, -0.3, 0.4, -0.6]], dtype=torch.float64)
WEIGHTS = torch.tensor([0.3, 0.7], dtype=torch.float64)
STD = 0.3


def mixture_eps(x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """E[eps | x_t] for x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, x0 ~ sum_k w_k N(mu_k, STD^2 I):
    each component gives x_t ~ N(sqrt(abar) mu_k, v I), v = abar STD^2 + 1 - abar, so
    E[eps | x_t] = sqrt(1 - abar) sum_k r_k(x_t) (x_t - sqrt(abar) mu_k) / v."""
    abar = torch.as_tensor(abar, dtype=torch.float64).reshape(-1, 1, 1)
    a, b = abar.sqrt(), (1 - abar).sqrt()
    var = a ** 2 * STD ** 2 + b ** 2
    d = x.double().flatten(1)[:, None, :] - a * MEANS[None]
    r = torch.softmax(WEIGHTS.log()[None] - 0.5 * (d ** 2).sum(-1) / var[:, :, 0], dim=1)[:, :, None]
    return (b * (r * d).sum(1, keepdim=True) / var).reshape(x.shape)


class Residual(nn.Module):
    """A small MLP with the teacher network's call signature, zero at init."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 4))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x, t, text, camera=None):
        t = torch.as_tensor(t).reshape(-1).expand(x.shape[0]).float()[:, None] / 1000 * torch.arange(1, 5) * math.pi
        return self.net(torch.cat([x.flatten(1), t.sin(), t.cos()], 1)).reshape(x.shape)


class MixtureTeacher:
    """Teacher protocol on 1 x 2 x 2 "images" from a 2-component Gaussian mixture: eps is the exact
    posterior mean plus sqrt(abar) times its network, a residual in v (zero for the teacher), which
    its students train."""

    channels, resolution, dtype, device = 1, 2, torch.float32, torch.device("cpu")

    def __init__(self):
        self.schedule = NoiseSchedule.cosine()
        torch.manual_seed(0)
        self.network = Residual()

    def encode_prompt(self, prompts, negative=None):
        z = torch.zeros(len(prompts), 1)
        return Cond(list(prompts), z, z)

    def encode(self, images):
        return images.mean(1, keepdim=True) * 2 - 1

    def decode(self, x):
        return ((x + 1) / 2).clamp(0, 1).repeat(1, 3, 1, 1)

    def predict_eps(self, x_t, t, cond, guidance_scale=1.0):
        t = torch.as_tensor(t).reshape(-1).expand(x_t.shape[0])
        abar = self.schedule.alphas_cumprod.double()[t]
        residual = abar.sqrt().reshape(-1, 1, 1, 1) * self.network(x_t, t, cond.cond).double()
        return (mixture_eps(x_t, abar) + residual).float()


def exact_ode(x_T: torch.Tensor, sigma_start: float, sigma_end: float, steps: int = 600) -> torch.Tensor:
    """The mixture's probability-flow ODE, RK4 in log sigma: with z = x sqrt(1 + sigma^2),
    dz / d log sigma = sigma eps(z / sqrt(1 + sigma^2)) (Karras et al. 2022, eq. 4 in VE form)."""
    def f(z, log_sigma):
        s = math.exp(log_sigma)
        return s * mixture_eps(z / math.sqrt(1 + s * s), torch.tensor(1 / (1 + s * s)))

    z = x_T.double() * math.sqrt(1 + sigma_start ** 2)
    l0, h = math.log(sigma_start), (math.log(sigma_end) - math.log(sigma_start)) / steps
    for i in range(steps):
        ls = l0 + i * h
        k1 = f(z, ls)
        k2 = f(z + h / 2 * k1, ls + h / 2)
        k3 = f(z + h / 2 * k2, ls + h / 2)
        k4 = f(z + h * k3, ls + h)
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return z / math.sqrt(1 + sigma_end ** 2)


def rms(a, b) -> float:
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


@pytest.fixture(scope="module")
def toy_sfd(tmp_path_factory):
    """A 2-NFE SFD student of the mixture teacher (AFS, M = 8), 200 steps; the exact ODE samples."""
    torch.set_num_threads(1)
    teacher = MixtureTeacher()
    abar = teacher.schedule.alphas_cumprod.double()
    sigmas = ((1 - abar) / abar).sqrt()
    x_T = torch.randn(512, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    exact = exact_ode(x_T, sigmas[999].item(), sigmas[0].item())
    cond = teacher.encode_prompt(["toy"] * 512)
    cfg = config(nfe=2, steps=200, batch_size=64, lr=1e-2, warmup_steps=10, log_every=50, grad_clip=None,
                 options={"sub_steps": 8})
    folder = tmp_path_factory.mktemp("toy") / "sfd"
    run = StudentRun(folder, cfg, SFD, teacher=teacher, log=quiet, prompts=["toy"])
    before = run.method.sample(run.student, cond, 2, None, x_T=x_T).x
    run.train()
    after = run.method.sample(run.student, cond, 2, None, x_T=x_T).x
    return SimpleNamespace(teacher=teacher, run=run, folder=folder, x_T=x_T, exact=exact, cond=cond,
                           before=before, after=after)


def test_sfd_moves_a_toy_students_samples_to_the_exact_ode(toy_sfd):
    """The teacher's target (DPM-Solver++(3) on the fine grid) is close to the exact ODE; 200 SFD
    steps bring the 2-NFE student's samples several times closer to it than the untrained student
    (the teacher's own 2-NFE DDIM with AFS)."""
    t = toy_sfd
    grid = sfd_timesteps(t.teacher.schedule, 2, True)
    fine, _ = teacher_timesteps(t.teacher.schedule, grid, 8)
    with torch.no_grad():
        target, _ = dpmpp_integrate(lambda x, s: t.teacher.predict_eps(x, s, t.cond), t.teacher.schedule, t.x_T, fine, 3)
    assert rms(target, t.exact) < 0.01
    before, after = rms(t.before, t.exact), rms(t.after, t.exact)
    assert before > 0.15 and after < 0.4 * before, (before, after)


def test_second_stage_learns_the_first_stage_in_one_evaluation(toy_sfd, tmp_path):
    """sfd-2 starts from the first stage's weights, and 200 steps bring its 1-NFE samples closer to
    the first stage's own 2-NFE samples (its targets) by a clear factor."""
    t = toy_sfd
    cfg = config("sfd-2", nfe=1, steps=200, batch_size=64, lr=1e-2, warmup_steps=10, log_every=50, grad_clip=None,
                 options={"from_student": str(t.folder)})
    run = StudentRun(tmp_path / "sfd2", cfg, SFDSecondStage, teacher=t.teacher, log=quiet, prompts=["toy"])
    first, _, _ = load_sfd_student(t.folder, t.teacher)
    assert all(torch.equal(a, b) for a, b in zip(run.student.network.state_dict().values(),
                                                first.network.state_dict().values()))
    before = rms(run.method.sample(run.student, t.cond, 1, None, x_T=t.x_T).x, t.after)
    run.train()
    out = run.method.sample(run.student, t.cond, 1, None, x_T=t.x_T)
    assert out.nfe == 1
    after = rms(out.x, t.after)
    assert after < 0.5 * before, (before, after)


# --- SFD-v -------------------------------------------------------------------------------------

def test_sfd_v_starts_as_its_teacher_and_keeps_its_step_condition(tmp_path):
    """The zero-initialised step embedding makes the SFD-v student exactly its teacher at every NFE;
    training reaches the embedding; a saved run reloads with it, and the condition folds exactly
    into a plain network for the second stage (W (text + e) + b = W text + (W e + b))."""
    torch.set_num_threads(1)
    teacher = tiny_teacher()
    cfg = config("sfd-v", nfe=2, options={"nfe_choices": [1, 2, 3], "sub_steps": 1})
    run = StudentRun(tmp_path / "v", cfg, SFDv, teacher=teacher, log=quiet, prompts=PROMPTS)
    assert isinstance(run.student.network, StepConditioned)
    cond = teacher.encode_prompt(PROMPTS)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 600, 20])
    reference = teacher.predict_eps(x, t, cond, 1.0)
    for nfe in (1, 2, 3):
        assert torch.equal(run.student.predict_eps(x, t, run.student.network.condition(cond, nfe)), reference)
    run.method.loss(0, torch.Generator().manual_seed(0)).backward()
    assert run.student.network.step_embedding.weight.grad.abs().sum() > 0
    run.train()
    loaded, method, meta = load_sfd_student(tmp_path / "v", teacher)
    assert meta["config"]["method"] == "sfd-v" and isinstance(loaded.network, StepConditioned)
    assert all(torch.equal(a, b) for a, b in zip(loaded.network.state_dict().values(),
                                                run.student.network.state_dict().values()))
    assert method.supported_nfe(3) is None and "[1, 2, 3]" in method.supported_nfe(4)
    with pytest.raises(ValueError, match="cannot sample with 4 NFE"):
        method.sample(loaded, cond, 4, None)
    # Folding: a random embedding, so the check means something.
    wrapper = loaded.network
    with torch.no_grad():
        wrapper.step_embedding.weight.normal_()
    folded = fold_step_condition(wrapper, 2)
    torch.testing.assert_close(folded(x, t, cond.cond), wrapper(x, t, wrapper.condition(cond, 2).cond), rtol=1e-4, atol=1e-5)


def test_sfd_v_resumes_exactly_with_its_ema(tmp_path):
    """The step-conditioned network and its EMA copy, which attach swaps in, are what the loop saves
    and restores: 2 + 2 resumed steps end where 4 straight ones do, bit for bit."""
    torch.set_num_threads(1)
    cfg = lambda: config("sfd-v", nfe=2, steps=4, ema_decay=0.9, options={"nfe_choices": [1, 2], "sub_steps": 1})  # noqa: E731
    straight = StudentRun(tmp_path / "a", cfg(), SFDv, teacher=tiny_teacher(), log=quiet, prompts=PROMPTS)
    straight.train()
    first = StudentRun(tmp_path / "b", cfg(), SFDv, teacher=tiny_teacher(), log=quiet, prompts=PROMPTS)
    first.loop.train(first.method.loss, max_steps=2)
    resumed = StudentRun(tmp_path / "b", cfg(), SFDv, teacher=tiny_teacher(), log=quiet, prompts=PROMPTS)
    assert resumed.loop.step == 2
    resumed.train()
    for name in ("model", "ema"):
        a, b = straight.loop.state()[name], resumed.loop.state()[name]
        assert "step_embedding.weight" in a and all(torch.equal(a[k], b[k]) for k in a), name
    assert straight.loop.state()["model"]["step_embedding.weight"].abs().sum() > 0


# --- bad input ---------------------------------------------------------------------------------

def test_methods_are_registered():
    assert METHODS["sfd"] is SFD and METHODS["sfd-v"] is SFDv and METHODS["sfd-2"] is SFDSecondStage


@pytest.mark.parametrize("method_cls, cfg, message", [
    (SFD, config(nfe=9), "SFD makes students of 1 to 8 NFE"),
    (SFD, config(nfe=2, options={"sub_step": 3}), "unknown sfd option.*sub_step.*allowed are sub_steps"),
    (SFD, config(nfe=2, options={"afs": "yes"}), "afs='yes': must be true or false"),
    (SFD, config(nfe=2, options={"loss": "l3"}), "loss='l3': must be one of l1, l2"),
    (SFDv, config("sfd-v", nfe=5), r"nfe=5 is not one of options.nfe_choices \[1, 2, 3, 4\]"),
    (SFDv, config("sfd-v", nfe=2, options={"nfe_choices": [2, 2]}), "distinct integers from 1 to 8"),
    (SFDSecondStage, config("sfd-2", nfe=2), "1-NFE students only"),
    (SFDSecondStage, config("sfd-2", nfe=1), "needs option.*from_student"),
])
def test_bad_settings_are_one_clear_error(method_cls, cfg, message):
    with pytest.raises(ValueError, match=message):
        make_method(method_cls, cfg)


@pytest.mark.parametrize("argv, message", [
    (["--nfe", "0"], "nfe"),
    (["--nfe", "9"], "1 to 8 NFE"),
    (["--nfe", "2", "--set", "options.sub_step=3"], "unknown sfd option"),
])
def test_distill_cli_refuses_bad_sfd_input_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main(["distill", "--method", "sfd", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
