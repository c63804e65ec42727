"""The per-step solvers students call (sds3d/diffusion/solvers.py): ddim_step, dpmpp_step,
dpmpp_integrate, heun_step, polynomial_timesteps and the samplers' callback, against closed forms
(single-point and Gaussian data, whose probability-flow ODE is solved exactly), diffusers'
schedulers stepping on the same timesteps, and torch.autograd.gradcheck."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, HeunDiscreteScheduler

from sds3d.diffusion.protocol import Cond, model_to_pixels
from sds3d.diffusion.schedule import NoiseSchedule
from sds3d.diffusion.solvers import (CountingDenoiser, ddim_step, dpm_timesteps, dpmpp_integrate, dpmpp_sample,
                                     dpmpp_step, heun_step, polynomial_timesteps, sample)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 __array__ notes from diffusers

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def sd_schedule() -> NoiseSchedule:
    """Our schedule with diffusers' own float32 alphas_cumprod, so the two step on identical abar."""
    return NoiseSchedule(DDIMScheduler(**SD_BETAS).alphas_cumprod.clone())


def per_sample(values, like):
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.dim() - 1)))


def toy_eps(x, t):
    """A nonlinear, time-dependent stand-in for a network: what diffusers and we step on must agree for any eps."""
    return torch.sin(3 * x + per_sample(t, x).expand(x.shape[0], *([1] * (x.dim() - 1))) / 250) + 0.3 * x


# --- single-point data: DDIM, Heun and DPM-Solver++ are exact for any step ---------------------

class PointData:
    """Data x0 = c (one point). The exact eps is (x_t - sqrt(abar) c) / sqrt(1 - abar); along the
    probability-flow ODE eps stays constant, so x_t = sqrt(abar_t) c + sqrt(1 - abar_t) e exactly."""

    def __init__(self, schedule, c):
        self.schedule, self.c = schedule, c

    def ab(self, t, like):
        """sqrt(abar), sqrt(1 - abar) at t, float64, shaped (B, 1, ..., 1) against `like`."""
        t = torch.as_tensor(t).reshape(-1)
        abar = torch.where(t < 0, 1.0, self.schedule.alphas_cumprod.double()[t.clamp_min(0)])
        shape = (-1, *([1] * (like.dim() - 1)))
        return abar.sqrt().reshape(shape), (1 - abar).sqrt().reshape(shape)

    def eps(self, x, t):
        a, b = self.ab(t, x)
        return (x.double() - a * self.c) / b

    def at(self, e, t):
        """The exact ODE state at timestep(s) t (-1: the clean end) for conserved noise e."""
        a, b = self.ab(t, e)
        return a * self.c + b * e


@pytest.mark.parametrize("schedule", ["cosine", "scaled_linear"])
def test_ddim_step_is_exact_for_single_point_data(schedule):
    sched = getattr(NoiseSchedule, schedule)()
    g = torch.Generator().manual_seed(0)
    data = PointData(sched, torch.rand(1, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1)
    e = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    for t, t_next in [(999, 500), (900, -1), (600, 599), (300, 0), (50, 700)]:  # large, tiny, to clean, inversion
        x = data.at(e, t)
        out = ddim_step(sched, x, data.eps(x, t), t, t_next)
        assert out.dtype == torch.float64
        assert (out - data.at(e, t_next)).abs().max() < 1e-9
    # Per-sample timesteps: every sample its own interval, one of them to the clean image.
    t = torch.tensor([999, 700, 400, 100, 20])
    t_next = torch.tensor([10, -1, 399, 0, -1])
    x = data.at(e, t)
    out = ddim_step(sched, x, data.eps(x, t), t, t_next)
    assert (out - data.at(e, t_next)).abs().max() < 1e-9
    assert (out[1] - data.c[0]).abs().max() < 1e-9  # t_next = -1 returns x0 = c


@pytest.mark.parametrize("clip,use_clipped", [(False, False), (True, False), (True, True)])
def test_ddim_step_matches_diffusers_step_in_float32(clip, use_clipped):
    """One float32 step (a student's dtype) against DDIMScheduler.step, which goes to t - T // steps (set_alpha_to_one:
    abar = 1 below 0), including the clamp of x0 and the recomputed eps."""
    sched = sd_schedule()
    scheduler = DDIMScheduler(**SD_BETAS, clip_sample=clip, set_alpha_to_one=True)
    scheduler.set_timesteps(4)  # step ratio 250
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 1.5
    for t, t_next in [(900, 650), (600, 350), (200, -1)]:
        eps = toy_eps(x, t)
        ref = scheduler.step(eps, t, x, use_clipped_model_output=use_clipped)
        ours = ddim_step(sched, x, eps, t, t_next, clip_x0=clip, clipped_eps=use_clipped)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, ref.prev_sample, rtol=1e-5, atol=1e-5)
        if clip:
            assert (ref.pred_original_sample.abs() == 1).any()  # the clamp is exercised


def test_ddim_step_is_differentiable():
    sched = NoiseSchedule.cosine()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    t, t_next = torch.tensor([700, 300]), torch.tensor([400, -1])
    assert torch.autograd.gradcheck(lambda x, eps: ddim_step(sched, x, eps, t, t_next), (x, eps))
    assert torch.autograd.gradcheck(lambda x, eps: ddim_step(sched, x, eps, 650, 20), (x, eps))
    # Clamped x0: differentiable away from the clamp edges (x0 here lies well inside or well outside [-1, 1]).
    x0 = torch.tensor([0.3, -0.5, 2.0, -3.0], dtype=torch.float64).reshape(1, 1, 2, 2)
    x_t = sched.add_noise(x0, torch.zeros_like(x0), torch.tensor([500])).requires_grad_()
    eps_small = (torch.randn(1, 1, 2, 2, generator=g, dtype=torch.float64) * 1e-3).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, eps: ddim_step(sched, x, eps, 500, 100, clip_x0=True), (x_t, eps_small))
    # Heun and DPM-Solver++ steps too: gradients flow through the teacher's eps_fn and the x0 history.
    assert torch.autograd.gradcheck(lambda x: heun_step(toy_eps, sched, x, t, t_next), (x,))
    x0s = [torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda x, a, b, c: dpmpp_step(sched, x, [a, b, c], [900, 800, 650], 500),
                                    (x, *x0s))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_timesteps_equal_a_loop_of_scalar_steps(dtype):
    sched = NoiseSchedule.cosine()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 4, 4, generator=g).to(dtype)
    eps = torch.randn(4, 3, 4, 4, generator=g).to(dtype)
    noise = torch.randn(4, 3, 4, 4, generator=g).to(dtype)
    ts, nexts = [999, 640, 250, 30], [700, -1, 249, 0]
    t, t_next = torch.tensor(ts), torch.tensor(nexts)
    for options in [{}, {"clip_x0": True}, {"clip_x0": True, "clipped_eps": False}, {"eta": 0.6, "noise": noise}]:
        batched = ddim_step(sched, x, eps, t, t_next, **options)
        loop = torch.cat([ddim_step(sched, x[i:i + 1], eps[i:i + 1], ts[i], nexts[i],
                                    **{k: (v[i:i + 1] if k == "noise" else v) for k, v in options.items()})
                          for i in range(4)])
        assert batched.dtype == dtype and torch.equal(batched, loop), options
    heun_batched = heun_step(toy_eps, sched, x, t, t_next)
    heun_loop = torch.cat([heun_step(toy_eps, sched, x[i:i + 1], ts[i], nexts[i]) for i in range(4)])
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(heun_batched, heun_loop, rtol=tol, atol=tol)


# --- Heun ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t,t_next", [(900, 600), (400, 390), (120, -1)])
def test_heun_step_matches_diffusers(t, t_next):
    """One heun_step against HeunDiscreteScheduler on custom timesteps [t, t_next] (two scheduler calls, first order
    then the correction) or [t] (one call into sigma 0); diffusers' sample is our z = x sqrt(1 + sigma^2)."""
    sched = sd_schedule()
    scheduler = HeunDiscreteScheduler(**SD_BETAS)
    scheduler.set_timesteps(timesteps=[t] if t_next == -1 else [t, t_next])
    sigmas = sched.sigma(torch.tensor([t, max(t_next, 0)])).double()
    s_next = 0.0 if t_next == -1 else sigmas[1].item()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 0.8
    calls = []

    def eps_fn(x_in, tt):
        calls.append(int(tt))
        return toy_eps(x_in.float(), tt).double()

    ours = heun_step(eps_fn, sched, x.double(), t, t_next)
    assert calls == ([t] if t_next == -1 else [t, t_next])
    z = (x.double() * (1 + sigmas[0] ** 2).sqrt()).float()
    for tt in scheduler.timesteps[:1 if t_next == -1 else 2]:
        z = scheduler.step(toy_eps(scheduler.scale_model_input(z, tt), tt), tt, z).prev_sample
    torch.testing.assert_close(ours * (1 + s_next ** 2) ** 0.5, z.double(), rtol=2e-5, atol=2e-5)


def test_heun_step_is_exact_for_single_point_data():
    sched = NoiseSchedule.cosine()
    g = torch.Generator().manual_seed(5)
    data = PointData(sched, torch.rand(1, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1)
    e = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64)
    t, t_next = torch.tensor([990, 500, 60]), torch.tensor([300, -1, 59])
    out = heun_step(data.eps, sched, data.at(e, t), t, t_next)
    assert (out - data.at(e, t_next)).abs().max() < 1e-9
    assert (heun_step(data.eps, sched, data.at(e[:1], 990), 990, -1) - data.c).abs().max() < 1e-9


# --- DPM-Solver++ ----------------------------------------------------------------------------------

def diffusers_dpm(x, timesteps, order, final, lower_order_final, schedule_kwargs=SD_BETAS):
    """DPMSolverMultistepScheduler stepping on custom timesteps from x, to sigma 0 ("zero") or to timestep 0's
    sigma ("sigma_min"): the two ends it offers."""
    scheduler = DPMSolverMultistepScheduler(**schedule_kwargs, solver_order=order, final_sigmas_type=final,
                                            lower_order_final=lower_order_final)
    scheduler.set_timesteps(timesteps=timesteps)
    for t in scheduler.timesteps:
        x = scheduler.step(toy_eps(x, t), t, x).prev_sample
    return x


def relative_error(ours, ref):
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("grid", [[700, 610, 480, 300, 150], list(range(640, 0, -40))])  # + the end: 5 and 16 steps
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_dpmpp_integrate_matches_diffusers_on_a_sub_grid(order, grid, lower_order_final):
    """From a given x (not noise) at an intermediate timestep: ending at timestep 0 (diffusers' sigma_min end) and
    at the clean end (its zero end), with both of diffusers' lower-order-final rules."""
    sched = sd_schedule()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6)) * 0.9

    def eps_fn(x_in, t):
        assert isinstance(t, int)
        return toy_eps(x_in, t).double()

    ours = {}
    for end, final in [(0, "sigma_min"), (-1, "zero")]:
        ours[end], calls = dpmpp_integrate(eps_fn, sched, x, grid + [end], order, lower_order_final=lower_order_final)
        ref = diffusers_dpm(x, grid, order, final, lower_order_final)
        assert calls == len(grid) and ours[end].dtype == torch.float32
        assert relative_error(ours[end], ref) < 1e-5, (end, relative_error(ours[end], ref))
    # The lower-order rule matters (so the match above checks it) on the short grid only, at orders above 1.
    flipped, _ = dpmpp_integrate(eps_fn, sched, x, grid + [0], order, lower_order_final=not lower_order_final)
    assert (relative_error(flipped, ours[0]) > 1e-4) == (len(grid) < 15 and order > 1)


class GaussianData:
    """x0 ~ N(mu, s^2 I): eps(x_t) = b (x_t - a mu) / (a^2 s^2 + b^2), and the probability-flow ODE maps x_t0 to
    x_t1 = a1 mu + sqrt(a1^2 s^2 + b1^2) (x_t0 - a0 mu) / sqrt(a0^2 s^2 + b0^2) (the monotone affine map between
    the Gaussian marginals)."""

    mu, s = 0.3, 0.5

    def __init__(self, schedule):
        self.schedule = schedule

    def ab(self, t):
        abar = self.schedule.alphas_cumprod.double()[t]
        return abar.sqrt(), (1 - abar).sqrt()

    def eps(self, x, t):
        a, b = self.ab(t)
        return b * (x.double() - a * self.mu) / (a ** 2 * self.s ** 2 + b ** 2)

    def flow(self, x, t0, t1):
        (a0, b0), (a1, b1) = self.ab(t0), self.ab(t1)
        mu, s = self.mu, self.s
        return a1 * mu + (a1 ** 2 * s ** 2 + b1 ** 2).sqrt() * (x - a0 * mu) / (a0 ** 2 * s ** 2 + b0 ** 2).sqrt()


def test_dpmpp_integrate_reaches_any_timestep_against_the_exact_flow():
    """SFD's use: one interval [600, 300] of the cosine schedule covered by M sub-steps, ending at a timestep > 0
    (diffusers cannot stop there). Against the exact ODE the error falls with M: first order for order 1, second
    order for 2 and 3 (a fresh grid starts with one first-order step, whose O(h^2) local error caps order 3's global
    rate at 2, as in diffusers); a hand loop of dpmpp_step (carrying the x0 history) is the same integrator."""
    sched = NoiseSchedule.cosine()
    data = GaussianData(sched)
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    exact = data.flow(x, 600, 300)
    errors = {}
    for order in (1, 2, 3):
        for m in (5, 10, 20):
            grid = list(range(600, 299, -300 // m))
            out, calls = dpmpp_integrate(data.eps, sched, x, grid, order, lower_order_final=False)
            assert calls == m and out.dtype == torch.float64
            errors[order, m] = (out - exact).abs().max().item()
    assert all(1.8 < errors[1, m] / errors[1, 2 * m] < 2.2 for m in (5, 10))  # first order
    assert all(errors[k, m] / errors[k, 2 * m] > 3.5 for k in (2, 3) for m in (5, 10))  # second order
    assert all(errors[k, m] < errors[1, m] / 5 for k in (2, 3) for m in (5, 10, 20)) and errors[3, 20] < 5e-4
    # The step function: the same update, given the history of x0 predictions and their timesteps.
    grid = list(range(600, 299, -25))
    y, x0s, seen = x, [], []
    for i, (t, t_next) in enumerate(zip(grid, grid[1:])):
        a, b = data.ab(t)
        x0s, seen = (x0s + [(y - b * data.eps(y, t)) / a])[-3:], (seen + [t])[-3:]
        y = dpmpp_step(sched, y, x0s, seen, t_next, order=min(3, i + 1))
    integrated, _ = dpmpp_integrate(data.eps, sched, x, grid, 3, lower_order_final=False)
    torch.testing.assert_close(y, integrated, rtol=1e-12, atol=1e-12)


# --- samplers: the integrator on the full grid, and callbacks ----------------------------------------

class ToyTeacher:
    """The Teacher protocol around an eps function (no network, no text)."""

    channels, resolution, dtype, device, network = 3, 4, torch.float32, torch.device("cpu"), None

    def __init__(self, schedule, eps_fn):
        self.schedule, self.eps_fn = schedule, eps_fn

    def predict_eps(self, x_t, t, cond, guidance_scale=1.0):
        assert x_t.dtype == torch.float32 and t.dtype == torch.long and t.shape == (x_t.shape[0],)
        return self.eps_fn(x_t, t)

    def decode(self, x):
        return model_to_pixels(x)


COND = Cond(["a", "b"], None, None)


@pytest.mark.parametrize("order", [2, 3])
def test_dpmpp_sample_is_the_integrator_on_the_full_grid(order):
    sched = sd_schedule()
    teacher = ToyTeacher(sched, toy_eps)
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(8))
    result = dpmpp_sample(teacher, COND, 10, 1.0, order=order, x_T=x_T)
    grid = dpm_timesteps(1000, 10)
    with torch.no_grad():
        x, calls = dpmpp_integrate(CountingDenoiser(teacher, COND, 1.0), sched, x_T, grid + [-1], order)
    assert torch.equal(result.x, x) and calls == result.nfe == 10 and result.timesteps == grid


@pytest.mark.parametrize("solver", ["ddim", "dpmpp-2m", "dpmpp-3m", "heun"])
def test_samplers_call_back_once_per_step_with_the_intermediate_sample(solver):
    """On single-point data every solver is exact, so after step i the sample is the closed-form ODE state at the
    next grid point (the clean image after the last step)."""
    sched = NoiseSchedule.cosine()
    g = torch.Generator().manual_seed(9)
    data = PointData(sched, torch.rand(1, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1)
    teacher = ToyTeacher(sched, data.eps)
    x_T = torch.randn(2, 3, 4, 4, generator=g)
    seen = []
    tolerance = 2e-6  # the float32 state's rounding
    result = sample(teacher, COND, solver, 6, 1.0, x_T=x_T, callback=lambda i, t, x: seen.append((i, t, x.clone())))
    ts = result.timesteps
    assert [(i, t) for i, t, _ in seen] == list(enumerate(ts))
    e = data.ab(ts[0], x_T)
    e = (x_T.double() - e[0] * data.c) / e[1]  # x_T is the state at ts[0]; its noise is conserved
    for i, t, x in seen:
        assert x.dtype == torch.float32 and x.shape == x_T.shape
        expected = data.at(e, ts[i + 1] if i + 1 < len(ts) else -1)
        assert (x.double() - expected).abs().max() < tolerance, (i, t, (x.double() - expected).abs().max())
    assert torch.equal(seen[-1][2], result.x)
    assert result.nfe == (2 * len(ts) - 1 if solver == "heun" else len(ts))


def test_counting_denoiser_takes_per_sample_timesteps():
    sched = NoiseSchedule.cosine()
    calls = []

    def eps_fn(x, t):
        calls.append(t.clone())
        return x * per_sample(t, x) / 1000

    denoise = CountingDenoiser(ToyTeacher(sched, eps_fn), COND, 3.0)
    x = torch.ones(2, 3, 4, 4, dtype=torch.float64)
    out = denoise(x, torch.tensor([10, 500]))
    assert out.dtype == torch.float64 and denoise.nfe == 2 and calls[0].tolist() == [10, 500]
    assert torch.allclose(out[:, 0, 0, 0], torch.tensor([0.01, 0.5], dtype=torch.float64))
    denoise(x, 7)
    assert calls[1].tolist() == [7, 7] and denoise.nfe == 4


# --- polynomial timesteps --------------------------------------------------------------------------

def reference_polynomial(abar, steps, rho=7.0, sigma_min=0.006, sigma_max=80.0):
    """EDM eq. 5 in numpy, each sigma snapped to the nearest timestep in log sigma (duplicates kept)."""
    log_sigmas = np.log(np.sqrt((1 - abar) / abar))
    hi, lo = min(sigma_max, np.exp(log_sigmas[-1])), max(sigma_min, np.exp(log_sigmas[0]))
    ramp = np.arange(steps + 1) / steps
    sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return np.abs(np.log(sigmas)[:, None] - log_sigmas[None, :]).argmin(1).tolist()


@pytest.mark.parametrize("schedule,t_max", [("cosine", 991), ("scaled_linear", 999), ("linear", 930)])
def test_polynomial_timesteps(schedule, t_max):
    sched = getattr(NoiseSchedule, schedule)()
    abar = sched.alphas_cumprod.double().numpy()
    sigma = np.sqrt((1 - abar) / abar)
    assert np.abs(np.log(sigma) - np.log(min(80.0, sigma[-1]))).argmin() == t_max  # the capped max
    for steps in (1, 2, 4, 8, 18, 40, 200):
        ts = polynomial_timesteps(sched.alphas_cumprod, steps)
        ref = reference_polynomial(abar, steps)
        assert len(ts) == steps + 1 and ts[0] == t_max and ts[-1] == 0
        assert all(a > b for a, b in zip(ts, ts[1:]))
        if all(a > b for a, b in zip(ref, ref[1:])):
            assert ts == ref  # no duplicates: exactly EDM's grid snapped
        else:  # duplicates: a crowded end became consecutive timesteps from t_max down or up to t_min
            down = [i for i in range(steps + 1) if ts[i] < ref[i]]
            up = [i for i in range(steps + 1) if ts[i] > ref[i]]
            assert up or down
            if down:
                assert ts[:down[-1] + 1] == list(range(t_max, t_max - down[-1] - 1, -1))
            if up:
                assert ts[up[0]:] == list(range(ts[up[0]], -1, -1))
    # On the cosine schedule sigma(0) ~ 0.0064, about EDM's sigma_min, so t_min is timestep 0; a larger sigma_min
    # moves it to the timestep of that noise level.
    if schedule == "cosine":
        assert 0.006 < sigma[0] < 0.0065
        ts = polynomial_timesteps(sched.alphas_cumprod, 5, sigma_min=0.05, sigma_max=10.0, rho=3.0)
        assert ts == reference_polynomial(abar, 5, 3.0, 0.05, 10.0)
        assert ts[-1] == np.abs(np.log(sigma / 0.05)).argmin() > 0
        with pytest.raises(ValueError, match="steps must be at most 991 here"):
            polynomial_timesteps(sched.alphas_cumprod, 992)
        assert len(set(polynomial_timesteps(sched.alphas_cumprod, 991))) == 992
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        polynomial_timesteps(sched.alphas_cumprod, 0)
    with pytest.raises(ValueError, match="need 0 < sigma_min < sigma_max"):
        polynomial_timesteps(sched.alphas_cumprod, 4, sigma_min=1.0, sigma_max=0.5)


# --- user mistakes -----------------------------------------------------------------------------------

def test_step_errors_name_the_problem():
    sched = NoiseSchedule.cosine()
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"t must be an integer timestep from 0 to 999 .*got 1000"):
        ddim_step(sched, x, x, 1000, 10)
    with pytest.raises(ValueError, match=r"t_next must be an integer timestep from -1 to 999 \(-1: the clean end"):
        ddim_step(sched, x, x, 10, -2)
    with pytest.raises(ValueError, match="t must hold integer timesteps, got a torch.float32 tensor"):
        ddim_step(sched, x, x, torch.tensor([10.0]), 5)
    with pytest.raises(ValueError, match="eta > 0 needs `noise`"):
        ddim_step(sched, x, x, 10, 5, eta=1.0)
    with pytest.raises(ValueError, match=r"strictly decreasing integers in \[0, 999\].*got \[500, 500, 100\]"):
        dpmpp_integrate(toy_eps, sched, x, [500, 500, 100])
    with pytest.raises(ValueError, match="order must be 1, 2 or 3, got 4"):
        dpmpp_integrate(toy_eps, sched, x, [500, 100], order=4)
    with pytest.raises(ValueError, match="at most the 1 x0 predictions given, got 2"):
        dpmpp_step(sched, x, [x], [500], 100, order=2)
    with pytest.raises(ValueError, match=r"ending above t_next.*got \[500\] -> 600"):
        dpmpp_step(sched, x, [x], [500], 600)
    with pytest.raises(ValueError, match="t_next must be an integer timestep"):
        heun_step(toy_eps, sched, x, 500, 1000)
