"""Progressive distillation (sds3d/distill/students/progressive.py) and consistency distillation
(consistency.py): the progressive target against two hand-written DDIM steps, the consistency
boundary condition, both methods on a Gaussian-mixture teacher with a closed-form score against
its exact ODE samples, exact resumption, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sds3d.cli import main
from sds3d.diffusion.protocol import Cond
from sds3d.diffusion.schedule import make_schedule
from sds3d.diffusion.solvers import ddim_sample, ddim_timesteps, dpmpp_sample
from sds3d.distill.students import METHODS, StudentConfig, StudentModel, StudentRun, load_student
from sds3d.distill.students.consistency import ConsistencyDistillation, consistency_function
from sds3d.distill.students.progressive import ProgressiveDistillation, base_grid, progressive_target
from tiny_teachers import tiny_teacher

quiet = lambda *a: None  # noqa: E731


# --- a teacher with an exact score: a two-component Gaussian mixture ------------------------------

class MixtureNet(nn.Module):
    """v(x_t, t) of a 2-component isotropic Gaussian mixture in closed form (the exact posterior mean),
    plus a small MLP residual whose last layer starts at zero: the teacher is exact, and a student
    (a trainable copy) starts as the teacher and learns through the MLP."""

    def __init__(self, alphas_cumprod: torch.Tensor, means: torch.Tensor, std: float, hidden: int = 128):
        super().__init__()
        self.register_buffer("abar", alphas_cumprod.double())
        self.register_buffer("means", means.double())
        self.std = std
        dim = means.shape[1]
        self.mlp = nn.Sequential(nn.Linear(dim + 2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def exact_v(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t | component k ~ N(a mu_k, (a^2 s0^2 + s^2) I); E[x0 | x_t, k] = mu_k + a s0^2 / var (x_t - a mu_k)."""
        abar = self.abar[t].reshape(-1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        var = abar * self.std ** 2 + s ** 2
        diff = x[:, None, :] - a[:, None] * self.means[None]
        weights = torch.softmax(-(diff ** 2).sum(-1) / (2 * var), -1)
        x0 = (weights[..., None] * (self.means[None] + (a * self.std ** 2 / var)[:, None] * diff)).sum(1)
        eps = (x - a * x0) / s
        return a * eps - s * x0

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1).expand(x.shape[0]).long()
        flat = x.reshape(x.shape[0], -1)
        log_snr = (self.abar[t].log() - (1 - self.abar[t]).log()).float()
        residual = self.mlp(torch.cat([flat.float(), torch.stack([log_snr / 10, t.float() / 1000], 1)], 1))
        return (self.exact_v(flat.double(), t) + residual.double()).to(x.dtype).reshape(x.shape)


class MixtureTeacher:
    """The Teacher protocol on 2x2 RGB 'images' (12 numbers), v-prediction, cosine schedule with T = 1000
    (zero terminal SNR) like the embedded teacher; unconditional (every prompt is the same)."""

    resolution, channels, dtype, device = 2, 3, torch.float32, torch.device("cpu")

    def __init__(self, std: float = 0.25, seed: int = 0):
        self.schedule = make_schedule("cosine")
        g = torch.Generator().manual_seed(seed)
        mean = torch.where(torch.rand(12, generator=g) < 0.5, -0.5, 0.5)
        torch.manual_seed(seed)
        self.network = MixtureNet(self.schedule.alphas_cumprod, torch.stack([mean, -mean]), std)

    def encode_prompt(self, prompts, negative=None) -> Cond:
        zeros = torch.zeros(len(prompts), 1)
        return Cond(list(prompts), zeros, zeros)

    def encode(self, images):
        return images * 2 - 1

    def decode(self, x):
        return ((x + 1) / 2).clamp(0, 1)

    def predict_eps(self, x, t, cond, guidance_scale=1.0):
        t = torch.as_tensor(t).reshape(-1).expand(x.shape[0])
        return self.schedule.v_to_eps(x, self.network(x, t, cond.cond), t)


def toy_config(method: str, nfe: int, steps: int, **options) -> StudentConfig:
    return StudentConfig(method=method, nfe=nfe, steps=steps, batch_size=64, lr=3e-3, warmup_steps=10, guidance=1.0,
                         log_every=50, checkpoint_every=10_000, sample_every=0, options={"samples": 256, **options})


# --- (a) the progressive target -------------------------------------------------------------------

def test_progressive_target_turns_two_teacher_ddim_steps_into_one():
    """One DDIM step of the student aimed at the target x0 lands exactly on the teacher's two DDIM
    steps (Salimans & Ho 2022, Algorithm 2), for random states and random teacher eps; into the
    clean end the target is the teacher's own x0. DDIM is written out here (Song et al. 2021, eq. 12)."""
    schedule = make_schedule("cosine")
    abar = schedule.alphas_cumprod.double()

    def ddim(x, eps, t, t_next):
        a = abar[t].reshape(-1, 1, 1, 1)
        a_next = torch.where(t_next < 0, 1.0, abar[t_next.clamp(min=0)]).reshape(-1, 1, 1, 1)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps

    g = torch.Generator().manual_seed(0)
    t = torch.tensor([999, 999, 874, 600, 300, 61, 30, 2])
    t1 = torch.tensor([749, 499, 811, 450, 150, 30, 14, 1])
    t2 = torch.tensor([499, -1, 749, 300, 0, -1, -1, 0])
    x_t = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    eps1, eps2 = (torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    x_2 = ddim(ddim(x_t, eps1, t, t1), eps2, t1, t2)
    target = progressive_target(schedule, x_t, x_2, t, t2)
    a = abar[t].reshape(-1, 1, 1, 1)
    student_eps = (x_t - a.sqrt() * target) / (1 - a).sqrt()
    torch.testing.assert_close(ddim(x_t, student_eps, t, t2), x_2, rtol=0, atol=1e-9)
    clean = t2 < 0
    assert torch.equal(target[clean], x_2[clean])
    # The target is not the teacher's first x0 prediction (that would be one teacher step, not two).
    first_x0 = (x_t - (1 - a).sqrt() * eps1) / a.sqrt()
    assert (target - first_x0).abs().max() > 0.1


def test_progressive_grids_are_ddim_trailing_grids():
    """Every other point of the stage-0 grid is DDIM's trailing grid with half the steps, so a
    4-NFE student samples on diffusers' trailing DDIM-4 grid."""
    schedule = make_schedule("cosine")
    grid = base_grid(schedule, 16)
    assert grid == ddim_timesteps(1000, 16, "trailing") + [-1]
    for n in (8, 4, 2, 1):
        assert grid[:: 16 // n] == ddim_timesteps(1000, n, "trailing") + [-1]


# --- (b) the consistency boundary condition --------------------------------------------------------

def test_consistency_function_returns_its_input_at_t_min():
    """f(x, t_min) = x / alpha_{t_min} exactly (the VE variable: the boundary condition f(x, sigma_min)
    = x of Song et al. 2023, eq. 3), whatever the network says; far from t_min f is the x0 prediction."""
    teacher = tiny_teacher()
    student = StudentModel(teacher)
    with torch.no_grad():
        student.network.conv_out.weight.mul_(1e3).add_(1.0)  # a wild network
    cond = teacher.encode_prompt(["a red cube", "a snowman"])
    method = ConsistencyDistillation(StudentConfig(method="consistency", nfe=1))
    grid = method.grid(teacher.schedule)
    t_min = grid[-1]
    assert grid[0] == 999 and t_min == 0
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f = consistency_function(student, x, t_min, cond, t_min)
        assert torch.equal(f, x / teacher.schedule.alphas_cumprod[t_min].double().sqrt())
        x0 = student.predict_x0(x, torch.tensor([999, 999]), cond)
        torch.testing.assert_close(consistency_function(student, x, 999, cond, t_min), x0, rtol=0, atol=1e-4)
        mid = consistency_function(student, x, grid[9], cond, t_min)
    assert (mid - x / teacher.schedule.alphas_cumprod[grid[9]].double().sqrt()).abs().max() > 1.0


# --- (c) a teacher with a closed-form score ---------------------------------------------------------

@pytest.mark.parametrize("method, nfe, options", [
    ("progressive", 1, {"start_steps": 4}),  # two stages: 4 -> 2 (real teacher), 2 -> 1 (the stage-1 student)
    ("consistency", 1, {}),
])
def test_students_approach_the_exact_ode_map_of_a_mixture_teacher(tmp_path, method, nfe, options):
    """600 steps lower the error of the student's few-step samples against the exact probability-flow
    ODE samples of the closed-form teacher from the same x_T by more than 4x (the untrained student,
    the teacher's own few-step solver, lands between the modes)."""
    torch.set_num_threads(1)
    teacher = MixtureTeacher()
    cond = teacher.encode_prompt(["toy"] * 256)
    x_T = torch.randn(256, 3, 2, 2, generator=torch.Generator().manual_seed(5))
    exact = ddim_sample(teacher, cond, 1000, x_T=x_T).x  # DDIM on every timestep: the ODE solution
    assert float((dpmpp_sample(teacher, cond, 200, x_T=x_T).x - exact).pow(2).mean()) < 1e-5  # converged
    run = StudentRun(tmp_path / method, toy_config(method, nfe, 600, **options), METHODS[method], teacher=teacher,
                     log=quiet, prompts=["toy"])

    def error() -> float:
        return float((run.method.sample(run.student, cond, nfe, torch.Generator().manual_seed(0), x_T=x_T).x
                      - exact).pow(2).mean())

    before = error()
    run.train()
    after = error()
    assert after < before / 4, (before, after)


# --- checkpoints -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, nfe, options", [
    ("progressive", 1, {"start_steps": 4}),  # stages of 20 steps: the run is cut after the switch
    ("consistency", 2, {"solver": "heun", "distance": "pseudo-huber"}),
])
def test_resume_is_exact(tmp_path, method, nfe, options):
    """A run cut at step 27 and resumed ends with the same weights as one run straight through: the
    frozen previous-stage teacher (progressive) and the EMA target network (consistency) are checkpointed."""
    torch.set_num_threads(1)
    config = lambda: toy_config(method, nfe, 40, **options)  # noqa: E731
    straight = StudentRun(tmp_path / "a", config(), METHODS[method], teacher=MixtureTeacher(), log=quiet, prompts=["toy"])
    straight.train()
    first = StudentRun(tmp_path / "b", config(), METHODS[method], teacher=MixtureTeacher(), log=quiet, prompts=["toy"])
    first.train(max_steps=27)
    resumed = StudentRun(tmp_path / "b", config(), METHODS[method], teacher=MixtureTeacher(), log=quiet, prompts=["toy"])
    assert resumed.loop.step == 27
    resumed.train()
    a, b = straight.student.network.state_dict(), resumed.student.network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    extra = next(iter(straight.method.extra_modules.values())).state_dict()
    extra_b = next(iter(resumed.method.extra_modules.values())).state_dict()
    assert all(torch.equal(extra[k], extra_b[k]) for k in extra)


def test_a_trained_student_folder_samples_the_same(tmp_path):
    """load_student (what `sds3d sample --student` uses) rebuilds the student: same samples as the run's."""
    torch.set_num_threads(1)
    teacher = tiny_teacher()
    prompts = ["a red cube", "a blue sphere"]
    for method, nfe, options in (("progressive", 2, {"start_steps": 4, "samples": 4, "sample_steps": 2}),
                                 ("consistency", 2, {"n_grid": 5, "samples": 4, "sample_steps": 2})):
        config = StudentConfig(method=method, nfe=nfe, steps=3, batch_size=2, lr=1e-3, warmup_steps=1, guidance=2.0,
                               checkpoint_every=1000, sample_every=0, options=options)
        run = StudentRun(tmp_path / method, config, METHODS[method], teacher=teacher, log=quiet, prompts=prompts)
        run.train()
        student, loaded, meta = load_student(tmp_path / method, METHODS, teacher=teacher)
        cond = teacher.encode_prompt(prompts)
        ours = run.method.sample(run.student, cond, nfe, torch.Generator().manual_seed(3))
        theirs = loaded.sample(student, cond, nfe, torch.Generator().manual_seed(3))
        assert ours.nfe == theirs.nfe == nfe and meta["steps_done"] == 3
        torch.testing.assert_close(theirs.x, ours.x)


# --- (d) bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--method", "progressive", "--nfe", "3"], "cannot make a 3-NFE student: progressive distillation halves"),
    (["--method", "progressive", "--nfe", "4", "--set", "options.start_step=32"], "unknown progressive option(s) start_step"),
    (["--method", "progressive", "--nfe", "16"], "start_steps=16: must be a power of two from 2 x nfe = 32"),
    (["--method", "progressive", "--nfe", "2", "--set", "options.steps_per_stage=-1"], "steps_per_stage=-1"),
    (["--method", "consistency", "--nfe", "18"], "needs n_grid >= 19"),
    (["--method", "consistency", "--nfe", "1", "--set", "options.solver=rk4"], "solver='rk4': allowed are ddim, heun"),
    (["--method", "consistency", "--nfe", "1", "--set", "options.target_decay=1.5"], "target_decay=1.5"),
])
def test_bad_input_gives_one_clear_error_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "student"
    assert main(["distill", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not out.exists()


def test_sampling_with_an_unsupported_nfe_is_refused():
    teacher = tiny_teacher()
    student = StudentModel(teacher)
    cond = teacher.encode_prompt(["a red cube"])
    progressive = ProgressiveDistillation(StudentConfig(method="progressive", nfe=2, options={"start_steps": 8}))
    with pytest.raises(ValueError, match="up to start_steps / 2 = 4 NFE, not 8"):
        progressive.sample(student, cond, 8, None)
    consistency = ConsistencyDistillation(StudentConfig(method="consistency", nfe=2, options={"n_grid": 5}))
    with pytest.raises(ValueError, match="samples with 1 to 4 NFE, not 5"):
        consistency.sample(student, cond, 5, None)
