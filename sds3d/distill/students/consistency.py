"""Consistency distillation (Song, Dhariwal, Chen & Sutskever 2023, "Consistency models", ICML 2023,
arXiv:2303.01469, Algorithm 2), data-free, from a guided teacher at one fixed CFG scale.

**Grid.** N = n_grid time points t_1 < ... < t_N (default 18, their CIFAR-10 CD setting), EDM's
rho = 7 polynomial in sigma from sigma_max = 80 down to sigma(t = 0) ~ 0.006 snapped to discrete
timesteps, with t_N = T - 1 (pure noise on the zero-terminal-SNR schedule): `student_timesteps`.

**Consistency function** (their Sec. 3, eq. 5, with EDM's c_skip; `consistency_function`). In the
VE variable sigma = sqrt((1 - abar) / abar), z = x_t / alpha_t (alpha = sqrt(abar)),
    f(x_t, t) = c_skip(t) z + (1 - c_skip(t)) x0_student(x_t, t),
    c_skip(t) = sigma_data^2 / ((sigma_t - sigma_min)^2 + sigma_data^2),  sigma_min = sigma(t_1),
with sigma_data = 0.5. Their c_out multiplies a raw, unit-variance network output F; our network
is the teacher's copy and already predicts x0 (a denoiser D, EDM's c_skip x + c_out F), so the
skip is blended with that denoiser (Latent Consistency Models, Luo et al. 2023, also build f on
the x0 prediction, with c_out != 1 - c_skip).
(i) At t_1, c_skip = 1 exactly, so f(x, t_1) = x / alpha_{t_1}, the input in the VE variable (an
image with sigma_min ~ 0.006 of noise): the boundary condition f(x, sigma_min) = x of their eq. 3,
for any network output. (ii) Far from t_1 (sigma >> sigma_data) c_skip -> 0 and f is the student's
x0 prediction, so the student starts as the teacher's one-step denoiser.

**Training step** (Algorithm 2). Draw n uniform in 1..N-1, a training point x_{t_{n+1}} (below),
one guided-teacher ODE step t_{n+1} -> t_n (DDIM, or Heun: `solver`) giving x_hat_{t_n}, and
minimize d(f_theta(x_{t_{n+1}}, t_{n+1}), f_theta-(x_hat_{t_n}, t_n)) with f_theta- the target network,
an EMA of the student with decay mu = target_decay, kept here as the method's extra module
(checkpointed) and updated after every optimizer step (here: at the start of the next loss, which
is the same). The default mu = 0.95 is their ImageNet-64 / LSUN CD setting (N = 40); their
CIFAR-10 CD (N = 18) used mu = 0, the student itself without gradient (Table 3; in the official
code, openai/consistency_models_cifar10, `get_ema_scales_fn` gives CD no target EMA and the loss
falls back to target_params = params). With few training steps, as on a CPU, the slower-moving
target of mu = 0.95 gave the embedded teacher's student cleaner 1-NFE samples than mu = 0.
d is the squared L2 distance (mean over pixels) or the pseudo-Huber distance
sqrt(||a - b||^2 + c^2) - c with c = 0.00054 sqrt(dim) (Song & Dhariwal 2023, "Improved techniques
for training consistency models"); their CIFAR CD used LPIPS, which needs ImageNet features we do
not ship. The loop's own EMA (`ema_decay`, 0.9999 in the paper) is the copy that samples.

**Data-free training points.** The paper noises real data; here x_{t_{n+1}} = alpha x0 + sigma z
for a cached teacher image x0 (`progressive.teacher_samples`: guided DDIM-16 samples made once,
teacher_samples.pt in the run folder) and fresh noise z. That costs one guided teacher call (DDIM)
per step, against the n teacher steps that integrating the teacher's own trajectory from x_T
down to t_{n+1} would cost; noised samples of the teacher are draws from its own marginals.

With solver = heun the step out of t_N = T - 1 stays a DDIM (Euler) step: the trapezoid over
sigma ~ 2e4 -> 58 weights the end slope with half the interval it barely covers.

**Sampling** (Algorithm 1, multistep). x = f(x_T, t_N); then for each later point tau, re-noise
x_tau = alpha_tau x + sigma_tau z (z from the generator) and x = f(x_tau, tau). The nfe points
are grid points evenly spaced in index: t_N and t_{N - round(k (N - 1) / nfe)}, k = 1..nfe-1.

Options: n_grid (18), target_decay (0.95), solver (ddim | heun), distance (l2 | pseudo-huber),
sigma_data (0.5), samples (128), sample_steps (16), sample_batch (32).
"""

from __future__ import annotations

import copy
import math

import torch

from ...diffusion.schedule import NoiseSchedule
from ...diffusion.solvers import ddim_step, heun_step, initial_noise
from .common import StudentConfig, StudentModel, StudentSample, student_timesteps
from .progressive import alpha_sigma, teacher_samples

DEFAULTS = {"n_grid": 18, "target_decay": 0.95, "solver": "ddim", "distance": "l2", "sigma_data": 0.5,
            "samples": 128, "sample_steps": 16, "sample_batch": 32}
SOLVERS = ("ddim", "heun")
DISTANCES = ("l2", "pseudo-huber")
INT_OPTIONS = ("n_grid", "samples", "sample_steps", "sample_batch")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_options(config: StudentConfig) -> dict:
    """config.options over DEFAULTS, each checked: one ValueError naming the option and what is allowed."""
    unknown = set(config.options) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown consistency option(s) {', '.join(sorted(unknown))}: allowed are {', '.join(DEFAULTS)}")
    o = {**DEFAULTS, **config.options}

    def need(ok: bool, key: str, rule: str):
        if not ok:
            raise ValueError(f"consistency option {key}={o[key]!r}: {rule}")

    for key in INT_OPTIONS:
        need(isinstance(o[key], int) and not isinstance(o[key], bool) and o[key] >= 1, key, "must be a positive integer")
    need(o["n_grid"] >= 2, "n_grid", "must be at least 2 (time points of the grid)")
    need(_number(o["target_decay"]) and 0 <= o["target_decay"] < 1, "target_decay", "must be a number in [0, 1)")
    need(_number(o["sigma_data"]) and o["sigma_data"] > 0, "sigma_data", "must be a positive number")
    need(o["solver"] in SOLVERS, "solver", f"allowed are {', '.join(SOLVERS)}")
    need(o["distance"] in DISTANCES, "distance", f"allowed are {', '.join(DISTANCES)}")
    if config.nfe > o["n_grid"] - 1:
        raise ValueError(f"a {config.nfe}-NFE consistency student needs n_grid >= {config.nfe + 1} "
                         f"(options.n_grid is {o['n_grid']})")
    return o


# --- the parametrization ---------------------------------------------------------------------------

def skip_coefficient(schedule: NoiseSchedule, t, t_min: int, sigma_data: float, like: torch.Tensor) -> torch.Tensor:
    """EDM's c_skip in the VE sigma shifted by sigma_min = sigma(t_min), per sample, broadcastable
    against `like`: exactly 1 at t_min (Song et al. 2023, Appendix C)."""
    t = torch.as_tensor(t, device=like.device).reshape(-1).expand(like.shape[0]).long()
    abar = schedule.alphas_cumprod.to(like.device, torch.float64)
    sigma = ((1 - abar[t]) / abar[t]).sqrt()
    sigma_min = ((1 - abar[t_min]) / abar[t_min]).sqrt()
    c_skip = sigma_data ** 2 / ((sigma - sigma_min) ** 2 + sigma_data ** 2)
    return c_skip.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def boundary_blend(schedule: NoiseSchedule, x_t: torch.Tensor, x0_pred: torch.Tensor, t, t_min: int,
                   sigma_data: float = 0.5) -> torch.Tensor:
    """f = c_skip x_t / alpha_t + (1 - c_skip) x0_pred: see the module docstring."""
    c_skip = skip_coefficient(schedule, t, t_min, sigma_data, x_t)
    alpha, _ = alpha_sigma(schedule, t, x_t)
    return c_skip * (x_t / alpha) + (1 - c_skip) * x0_pred


def consistency_function(model: StudentModel, x_t: torch.Tensor, t, cond, t_min: int,
                         sigma_data: float = 0.5) -> torch.Tensor:
    """f_theta(x_t, t) for a student (or its target network): the boundary blend of its x0 prediction."""
    t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0]).long()
    return boundary_blend(model.schedule, x_t, model.predict_x0(x_t, t, cond).to(x_t.dtype), t, t_min, sigma_data)


def sampling_points(grid: list[int], nfe: int) -> list[int]:
    """The nfe timesteps of multistep sampling: grid[0] = T - 1, then grid points evenly spaced in index."""
    return [grid[round(k * (len(grid) - 1) / nfe)] for k in range(nfe)]


# --- the method ------------------------------------------------------------------------------------

class ConsistencyDistillation:
    name = "consistency"

    @staticmethod
    def supported_nfe(nfe: int) -> str | None:
        if isinstance(nfe, int) and nfe >= 1:
            return None  # the upper bound, n_grid - 1, is checked with the options
        return "a consistency student takes 1 to n_grid - 1 NFE (n_grid = 18 by default)"

    def __init__(self, config: StudentConfig):
        self.config = config
        self.options = check_options(config)
        self.sigma_data = float(self.options["sigma_data"])

    def grid(self, schedule: NoiseSchedule) -> list[int]:
        """The N grid timesteps, descending: t_N = T - 1 first, t_1 (sigma ~ 0.006) last."""
        return student_timesteps(schedule, self.options["n_grid"] - 1)

    # -- training ---------------------------------------------------------------------------------
    def attach(self, run) -> None:
        self.run = run
        o = self.options
        self.data = teacher_samples(run, o["samples"], o["sample_steps"], o["sample_batch"])
        self.ts = self.grid(run.teacher.schedule)
        self.target = copy.deepcopy(run.student.network).requires_grad_(False).eval()
        self.target_model = run.student.with_network(self.target)
        self.extra_modules = {"consistency_target": self.target}

    @torch.no_grad()
    def _update_target(self) -> None:
        """theta- <- stopgrad(mu theta- + (1 - mu) theta) (Algorithm 2), buffers copied."""
        mu = float(self.options["target_decay"])
        for e, p in zip(self.target.parameters(), self.run.student.network.parameters()):
            if mu == 0:
                e.copy_(p)
            else:
                e.lerp_(p, 1 - mu)
        for e, p in zip(self.target.buffers(), self.run.student.network.buffers()):
            e.copy_(p)

    def teacher_step(self, x: torch.Tensor, t_hi: torch.Tensor, t_lo: torch.Tensor, cond) -> torch.Tensor:
        """One guided-teacher ODE step t_{n+1} -> t_n per sample (no gradient)."""
        run = self.run
        schedule = run.teacher.schedule
        if self.options["solver"] == "ddim":
            return ddim_step(schedule, x, run.teacher_eps(x, t_hi, cond).to(x.dtype), t_hi, t_lo)
        calls = []

        def eps_fn(y, t):
            calls.append(run.teacher_eps(y, t, cond).to(y.dtype))
            return calls[-1]

        out = heun_step(eps_fn, schedule, x, t_hi, t_lo)
        # Out of T - 1 the Euler step (= DDIM) with the first call's slope; see the module docstring.
        first = (t_hi == schedule.num_train_timesteps - 1).reshape((-1,) + (1,) * (x.dim() - 1))
        return torch.where(first, ddim_step(schedule, x, calls[0], t_hi, t_lo), out)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.options["distance"] == "l2":
            return (a - b).pow(2).mean()
        dim = a[0].numel()
        c = 0.00054 * math.sqrt(dim)
        return ((a - b).pow(2).flatten(1).sum(1) + c * c).sqrt().sub(c).mean()

    def loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        run = self.run
        self._update_target()  # after the previous optimizer step (a no-op at step 0: theta- = theta)
        schedule = run.teacher.schedule
        ts = torch.tensor(self.ts)
        b = run.config.batch_size
        pick = torch.randint(self.data["x0"].shape[0], (b,), generator=generator)
        j = torch.randint(len(self.ts) - 1, (b,), generator=generator)  # t_{n+1} = ts[j], t_n = ts[j + 1]
        noise = torch.randn(self.data["x0"][pick].shape, generator=generator)
        device = run.teacher.device
        t_hi, t_lo = ts[j].to(device), ts[j + 1].to(device)
        x0 = self.data["x0"][pick].to(device, torch.float64)
        x_hi = schedule.add_noise(x0, noise.to(device, torch.float64), t_hi)
        cond = run.teacher.encode_prompt([run.prompts[k] for k in self.data["index"][pick].tolist()])
        t_min = self.ts[-1]
        with torch.no_grad():
            x_lo = self.teacher_step(x_hi, t_hi, t_lo, cond)
            target = consistency_function(self.target_model, x_lo, t_lo, cond, t_min, self.sigma_data)
        online = consistency_function(run.student, x_hi, t_hi, cond, t_min, self.sigma_data)
        return self.distance(online, target)

    # -- sampling ---------------------------------------------------------------------------------
    def sample(self, student: StudentModel, cond, nfe: int, generator: torch.Generator | None,
               x_T: torch.Tensor | None = None) -> StudentSample:
        """Multistep consistency sampling (Algorithm 1) on `sampling_points(grid, nfe)`."""
        grid = self.grid(student.schedule)
        if not isinstance(nfe, int) or not 1 <= nfe <= len(grid) - 1:
            raise ValueError(f"this consistency student (n_grid {len(grid)}) samples with 1 to {len(grid) - 1} NFE, not {nfe}")
        # float64 states: at T - 1 (alpha ~ 5e-5) a float32 eps -> x0 conversion would lose 3 digits.
        x = initial_noise(student.teacher, len(cond.prompts), generator, x_T).double()
        with torch.no_grad():
            for k, tau in enumerate(sampling_points(grid, nfe)):
                if k > 0:
                    z = initial_noise(student.teacher, x.shape[0], generator).double()
                    alpha, sigma = alpha_sigma(student.schedule, tau, x)
                    x = alpha * x + sigma * z
                x = consistency_function(student, x, tau, cond, grid[-1], self.sigma_data)
        x = x.float()
        return StudentSample(student.teacher.decode(x), x, nfe)
