"""DMD / Diff-Instruct (distill/students/dmd.py) on the score core that also trains NeRFs.

References are closed forms on Gaussians: for data N(mu, s^2) noised as x_t = alpha x + sigma eps,
the exact denoiser is eps*(x_t) = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2), the noised
marginal is N(alpha mu, alpha^2 s^2 + sigma^2), and the KL divergence of two such marginals is
known in closed form, so its gradient w.r.t. the generator's mu and s is too.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sds3d.diffusion.protocol import Cond
from sds3d.diffusion.schedule import NoiseSchedule
from sds3d.distill import score
from sds3d.distill.students import METHODS, StudentConfig, StudentRun, load_student
from sds3d.distill.students.dmd import DMD
from sds3d.teachers.unet import LeanUNet

from tiny_teachers import TINY_NET, tiny_teacher

PROMPTS = ["a red cube", "a blue sphere", "a green torus"]


def quiet(*args):
    pass


class GaussianScore:
    """The exact eps-prediction of N(mu, s^2 I) data under `schedule`. As a teacher (Teacher protocol:
    encode, schedule, predict_eps) and as a fake score (LoraNetwork's call interface)."""

    prediction_type = "epsilon"
    camera_dim = 16

    def __init__(self, mu: torch.Tensor, s: torch.Tensor, schedule: NoiseSchedule):
        self.mu, self.s, self.schedule = mu.detach().clone(), s.detach().clone(), schedule
        # vsd_loss first checks that the teacher has a network VSD could copy into a LoRA; never called here
        self.network = LeanUNet(TINY_NET)

    def coefficients(self, t):
        abar = self.schedule.abar(t).reshape(-1, 1).double()
        return abar.sqrt(), (1 - abar).sqrt()

    def predict_eps(self, x_t, t, cond=None, guidance_scale=1.0):
        alpha, sigma = self.coefficients(t)
        x = x_t.double()
        return (sigma * (x - alpha * self.mu) / (alpha ** 2 * self.s ** 2 + sigma ** 2)).to(x_t.dtype)

    def posterior_mean(self, x_t, t):
        """E[x | x_t] for Gaussian data: mu + alpha s^2 (x_t - alpha mu) / (alpha^2 s^2 + sigma^2)."""
        alpha, sigma = self.coefficients(t)
        return self.mu + alpha * self.s ** 2 * (x_t.double() - alpha * self.mu) / (alpha ** 2 * self.s ** 2 + sigma ** 2)

    def encode(self, images):
        return images

    def flatten_camera(self, camera):
        return camera.reshape(camera.shape[0], -1)

    def __call__(self, x_t, t, text, camera):
        return self.predict_eps(x_t, t)


def gaussian_kl(mu_q, s_q, mu_p, s_p, alpha, sigma):
    """KL(N(alpha mu_q, alpha^2 s_q^2 + sigma^2) || N(alpha mu_p, ...)), summed over dimensions."""
    var_q, var_p = alpha ** 2 * s_q ** 2 + sigma ** 2, alpha ** 2 * s_p ** 2 + sigma ** 2
    return (0.5 * torch.log(var_p / var_q) + (var_q + (alpha * (mu_q - mu_p)) ** 2) / (2 * var_p) - 0.5).sum()


def toy_setup(n: int, t: int, seed: int = 0):
    schedule = NoiseSchedule.cosine(1000)
    teacher = GaussianScore(torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64), torch.tensor([0.4, 0.6, 0.3], dtype=torch.float64), schedule)
    mu_g = torch.tensor([0.1, 0.2, -0.1], dtype=torch.float64, requires_grad=True)
    s_g = torch.tensor([0.7, 0.5, 0.45], dtype=torch.float64, requires_grad=True)
    fake = GaussianScore(mu_g, s_g, schedule)  # the generator's exact score: a perfectly trained fake
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 3, generator=g, dtype=torch.float64)
    cond = Cond(prompts=[""] * n, cond=torch.zeros(n, 1), uncond=torch.zeros(n, 1))
    return teacher, fake, mu_g, s_g, z, noise, cond, torch.full((n,), t, dtype=torch.long)


@pytest.mark.parametrize("t", [200, 500, 800])
def test_dmd_gradient_is_the_closed_form_kl_gradient(t):
    """With the real and fake scores exact, the generator gradient of vsd_loss (the function DMD calls)
    is E[(s_fake - s_real)(x_t) dx/dtheta] scaled by w(t) sigma / alpha, i.e. the gradient of the
    closed-form KL(q_t || p_t) (Yin et al. 2024, eq. (7)): checked for both parameters, Monte Carlo
    over 400k samples."""
    teacher, fake, mu_g, s_g, z, noise, cond, timesteps = toy_setup(400_000, t)
    x = mu_g + s_g * z
    out = score.vsd_loss(teacher, fake, None, cond, None, guidance_scale=1.0, timesteps=timesteps, noise=noise,
                         latents=x, weighting="dreamfusion")
    out.loss.backward()
    alpha, sigma = (v.item() for v in fake.coefficients(timesteps[:1]))
    scale = sigma ** 3 / alpha  # w(t) = sigma^2 times d(loss)/dx = sigma (s_q - s_p); dKL/dx carries alpha
    mu_ref, s_ref = mu_g.detach().clone().requires_grad_(), s_g.detach().clone().requires_grad_()
    gaussian_kl(mu_ref, s_ref, teacher.mu, teacher.s, alpha, sigma).backward()
    torch.testing.assert_close(mu_g.grad / scale, mu_ref.grad, rtol=0.03, atol=0.003)
    torch.testing.assert_close(s_g.grad / scale, s_ref.grad, rtol=0.03, atol=0.003)


def test_dmd_weighting_is_the_papers_x0_form():
    """weighting='dmd': per sample, d(loss)/dx * B = (mu_fake - mu_real) / mean|mu_real - x| with mu the
    posterior means (x0-predictions) of the two distributions at x_t (DMD, eq. (8)), computed here
    from the Gaussians' posterior means, not from eps."""
    teacher, fake, mu_g, s_g, z, noise, cond, timesteps = toy_setup(8, 0)
    timesteps = torch.tensor([30, 150, 300, 450, 600, 750, 900, 970])
    x = (mu_g + s_g * z).detach().requires_grad_()
    out = score.vsd_loss(teacher, fake, None, cond, None, guidance_scale=1.0, timesteps=timesteps, noise=noise,
                         latents=x, weighting="dmd")
    out.loss.backward()
    abar = teacher.schedule.abar(timesteps).reshape(-1, 1).double()
    x_t = abar.sqrt() * x.detach() + (1 - abar).sqrt() * noise
    mu_real, mu_fake = teacher.posterior_mean(x_t, timesteps), fake.posterior_mean(x_t, timesteps)
    expected = (mu_fake - mu_real) / (mu_real - x.detach()).abs().mean(1, keepdim=True)
    torch.testing.assert_close(x.grad * x.shape[0], expected, rtol=1e-9, atol=1e-12)


class AffineScore(torch.nn.Module):
    """eps(x_t, t) = a_t * x_t + b_t per timestep and dimension: the family that holds the exact
    denoiser of Gaussian data, so the denoising loss's minimiser is that denoiser."""

    prediction_type = "epsilon"
    camera_dim = 16

    def __init__(self, timesteps: int, dim: int):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(timesteps, dim))
        self.b = torch.nn.Parameter(torch.zeros(timesteps, dim))

    def flatten_camera(self, camera):
        return camera.reshape(camera.shape[0], -1)

    def forward(self, x_t, t, text, camera):
        return self.a[t] * x_t + self.b[t]


def test_fake_score_trained_on_a_fixed_generator_converges_to_its_score():
    """lora_diffusion_loss (the fake score's loss in DMD, the LoRA's in VSD) on samples of a fixed
    Gaussian generator drives an affine per-timestep score to the generator's exact denoiser."""
    schedule = NoiseSchedule.cosine(10)
    generator_mu, generator_s = torch.tensor([0.8, -0.4]), torch.tensor([0.5, 1.2])
    fake = AffineScore(10, 2)
    optimizer = torch.optim.Adam(fake.parameters(), lr=0.03)
    holder = type("Teacher", (), {"schedule": schedule})()
    g = torch.Generator().manual_seed(0)
    cond = Cond(prompts=[""] * 2048, cond=torch.zeros(2048, 1), uncond=None)
    for step in range(2000):
        for group in optimizer.param_groups:
            group["lr"] = 0.03 if step < 1000 else 0.005 if step < 1500 else 0.001
        samples = generator_mu + generator_s * torch.randn(2048, 2, generator=g)
        loss = score.lora_diffusion_loss(holder, fake, None, cond, None, generator=g, camera_drop_prob=0.0,
                                         encoded=samples)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # compared where the loss can identify a score: on x_t drawn from the generator's noised marginal
    exact = GaussianScore(generator_mu.double(), generator_s.double(), schedule)
    t = torch.arange(10).repeat_interleave(2000)
    samples = generator_mu + generator_s * torch.randn(t.shape[0], 2, generator=g)
    x_t = schedule.add_noise(samples, torch.randn(samples.shape, generator=g), t)
    error = (fake(x_t, t, None, None) - exact.predict_eps(x_t.double(), t).float()).detach()
    rms_per_t = error.pow(2).reshape(10, -1).mean(1).sqrt()
    assert rms_per_t.max() < 0.02, rms_per_t
    # and an untrained score is far off: the bound is not loose
    assert (exact.predict_eps(x_t.double(), t).float() - x_t).pow(2).reshape(10, -1).mean(1).sqrt().max() > 0.3


def test_dmd_moves_a_gaussian_generator_to_the_teachers_distribution():
    """The whole DMD loop on a toy: generator x = mu + s z, real score exact, fake score an affine
    network trained alongside by lora_diffusion_loss, generator updated by vsd_loss with DMD's
    weighting. It reaches the teacher's mean and spread (closed form: the minimiser of the KL)."""
    schedule = NoiseSchedule.cosine(20)
    teacher = GaussianScore(torch.tensor([0.6, -0.5], dtype=torch.float64), torch.tensor([0.3, 0.8], dtype=torch.float64), schedule)
    mu = torch.zeros(2, requires_grad=True)
    log_s = torch.zeros(2, requires_grad=True)
    fake = AffineScore(20, 2)
    with torch.no_grad():  # start the fake at the generator's exact score (as DMD starts it at the teacher's)
        start = GaussianScore(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), schedule)
        alpha, sigma = start.coefficients(torch.arange(20))
        fake.a.copy_((sigma / (alpha ** 2 + sigma ** 2)).expand(20, 2))
    generator_opt = torch.optim.Adam([mu, log_s], lr=0.01)
    fake_opt = torch.optim.Adam(fake.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(1)
    n = 256
    cond = Cond(prompts=[""] * n, cond=torch.zeros(n, 1), uncond=torch.zeros(n, 1))
    for _ in range(800):
        for _ in range(2):  # DMD2's two-time-scale update
            with torch.no_grad():
                samples = mu + log_s.exp() * torch.randn(n, 2, generator=g)
            fake_loss = score.lora_diffusion_loss(teacher, fake, None, cond, None, generator=g, camera_drop_prob=0.0,
                                                  encoded=samples)
            fake_opt.zero_grad()
            fake_loss.backward()
            fake_opt.step()
        x = mu + log_s.exp() * torch.randn(n, 2, generator=g)
        out = score.vsd_loss(teacher, fake, None, cond, None, guidance_scale=1.0, t_min=0.02, t_max=0.98, generator=g,
                             latents=x, weighting="dmd")
        generator_opt.zero_grad()
        out.loss.backward()
        generator_opt.step()
    torch.testing.assert_close(mu.detach(), teacher.mu.float(), atol=0.08, rtol=0)
    torch.testing.assert_close(log_s.exp().detach(), teacher.s.float(), atol=0.1, rtol=0)


# --- one core for the NeRF and the image student ---------------------------------------------------

def calls_of(functions, run) -> set[str]:
    """The names of `functions` whose very code objects execute during run()."""
    codes = {f.__code__: f.__name__ for f in functions}
    seen = set()

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in codes:
            seen.add(codes[frame.f_code])

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return seen


def dmd_config(**overrides) -> StudentConfig:
    values = dict(method="dmd", nfe=1, steps=4, batch_size=4, lr=1e-4, warmup_steps=1, log_every=100,
                  checkpoint_every=2, sample_every=0, options={"pairs": 4, "teacher_steps": 2, "pair_batch": 4})
    values.update(overrides)
    return StudentConfig(**values)


def test_a_nerf_vsd_step_and_a_dmd_step_call_the_same_score_functions(tmp_path):
    """`generate --loss vsd` and a DMD student run the same code objects of distill/score.py for the
    gradient (vsd_loss) and the fake score's loss (lora_diffusion_loss): a copy in either path fails."""
    from sds3d.config import make_config
    from sds3d.pipelines.text_to_3d import generate

    core = (score.vsd_loss, score.lora_diffusion_loss, score.dmd_weight)
    config = make_config("smoke", prompt="a red cube", teacher="embedded", loss="vsd", steps=1, render_resolution=32,
                         num_samples=16, checkpoint_every=1, preview_every=1)
    nerf = calls_of(core, lambda: generate(config, out=tmp_path / "nerf", show_progress=False, evaluate=False))
    assert nerf == {"vsd_loss", "lora_diffusion_loss"}  # the NeRF keeps DreamFusion's weighting

    def dmd():
        StudentRun(tmp_path / "dmd", dmd_config(steps=1), DMD, teacher=tiny_teacher(), log=quiet, prompts=PROMPTS).train()

    assert calls_of(core, dmd) == {"vsd_loss", "lora_diffusion_loss", "dmd_weight"}


# --- the student -----------------------------------------------------------------------------------

@pytest.mark.parametrize("nfe", [1, 2])
def test_dmd_student_trains_resumes_exactly_and_loads_back(tmp_path, nfe):
    teacher = tiny_teacher()
    straight = StudentRun(tmp_path / "a", dmd_config(nfe=nfe), DMD, teacher=teacher, log=quiet, prompts=PROMPTS)
    straight.train()
    first = StudentRun(tmp_path / "b", dmd_config(nfe=nfe), DMD, teacher=teacher, log=quiet, prompts=PROMPTS)
    first.train(max_steps=2)
    resumed = StudentRun(tmp_path / "b", dmd_config(nfe=nfe), DMD, teacher=teacher, log=quiet, prompts=PROMPTS)
    assert resumed.loop.step == 2
    resumed.train()
    for a, b in ((straight.student.network, resumed.student.network), (straight.method.fake, resumed.method.fake)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    # the fake score trained (its LoRA weights moved off their zero init) and the teacher did not
    assert any(v.abs().sum() > 0 for k, v in straight.method.fake.state_dict().items() if "lora_B" in k)
    student, method, meta = load_student(tmp_path / "a", METHODS, teacher=teacher)
    assert meta["config"]["method"] == "dmd" and meta["nfe"] == nfe
    cond = teacher.encode_prompt(PROMPTS)
    x_T = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    a = method.sample(student, cond, nfe, torch.Generator().manual_seed(5), x_T=x_T)
    b = straight.method.sample(straight.student, cond, nfe, torch.Generator().manual_seed(5), x_T=x_T)
    assert a.nfe == nfe
    torch.testing.assert_close(a.x, b.x)


@pytest.mark.parametrize("argv,message", [
    (["--nfe", "3"], "1-, 2- or 4-step"),
    (["--nfe", "1", "--set", "options.fake_steps=0"], "fake_steps=0: must be a positive integer"),
    (["--nfe", "1", "--set", "options.regression=-1"], "regression=-1.0: must be >= 0"),
    (["--nfe", "1", "--set", "options.t_max=2"], "need 0 <= t_min < t_max <= 1"),
    (["--nfe", "1", "--set", "options.lr_fake=1"], "unknown dmd option(s) lr_fake: allowed are regression"),
])
def test_distill_dmd_refuses_bad_options_and_writes_nothing(tmp_path, argv, message):
    out = tmp_path / "student"
    proc = subprocess.run([sys.executable, "-m", "sds3d", "distill", "--method", "dmd", *argv, "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists()
