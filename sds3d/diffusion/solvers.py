"""Solvers on the Teacher protocol: per-step DDIM, DPM-Solver++ and Heun updates, and the
whole-trajectory samplers (DDIM, DPM-Solver++ 2M/3M, Heun) built on them, with NFE accounting.

Two levels:

- Step functions, for students (SFD, progressive, consistency, one-step KD) and anything else that
  needs one update: `ddim_step`, `dpmpp_step`, `dpmpp_integrate` (DPM-Solver++ over any descending
  grid, from any x) and `heun_step`. They take the `NoiseSchedule` and either an eps already
  computed or a plain denoiser `eps_fn(x, t) -> eps` (t an int or a (B,) long tensor);
  timestep -1 stands for the clean end (abar = 1, sigma = 0). They are plain tensor arithmetic
  outside `torch.no_grad`, so students can backpropagate through them.
- Samplers (`ddim_sample`, `dpmpp_sample`, `dpmpp_2m_sample`, `dpmpp_3m_sample`, `heun_sample`,
  `sample`) start from noise, call the teacher through `CountingDenoiser` and return a
  `SampleResult`; `callback(i, t, x)` sees the sample after every step. They use only
  `teacher.schedule.alphas_cumprod`, `teacher.predict_eps`, `teacher.channels`,
  `teacher.resolution`, `teacher.device` and `teacher.decode`, so the oracle, the embedded network
  and a Stable Diffusion checkpoint sample the same way.

The formulas and timestep grids are diffusers' (DDIMScheduler, DPMSolverMultistepScheduler,
HeunDiscreteScheduler) and tests/test_solvers.py checks them against a hand loop over those
schedulers (tests/test_solver_steps.py checks the step functions); where diffusers has a quirk we
do not want as the default, an argument reproduces it (`prev_timestep="ratio"` for DDIM).

Precision: the sample handed to the network is float32 (what diffusers stores; CountingDenoiser
casts it); the samplers' updates are computed in float64 (CountingDenoiser returns float64 eps)
from the float32 `alphas_cumprod`. The step functions compute in the promoted dtype of x and eps,
with coefficients computed in float64 and rounded to it, so a float32 student stays in float32.
NFE counts network evaluations: a guided call (guidance != 1) is two (cond and uncond), an
unguided one is one.

Device: at an int timestep the step functions read abar as a 0-dim tensor, which every kernel
takes as a scalar (no copy, no host sync). Per-sample (B,) timesteps index
`schedule.alphas_cumprod` on t's device: keep the schedule there
(`NoiseSchedule(alphas_cumprod.to(device))`), or every call copies it. The samplers and
`dpmpp_integrate` read their coefficients on the host once, before the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

SPACINGS = ("leading", "trailing", "linspace")

EpsFn = Callable[[torch.Tensor, "int | torch.Tensor"], torch.Tensor]  # eps_fn(x, t) -> eps
Callback = Callable[[int, int, torch.Tensor], None]  # callback(step index, timestep evaluated, x after the step)


@dataclass
class SampleResult:
    """What every sampler returns."""

    images: torch.Tensor  # (B, 3, H, W) in [0, 1]: teacher.decode(x)
    x: torch.Tensor  # (B, C, R, R) float32: the final sample in the teacher's model space
    nfe: int  # network evaluations (2 per guided call, 1 per unguided call)
    timesteps: list[int]  # the discrete timesteps the network was called at, in order of the first call


def evaluations_per_call(guidance_scale: float) -> int:
    """CFG runs the network on cond and uncond; guidance 1 is the conditional model alone."""
    return 1 if guidance_scale == 1 else 2


class CountingDenoiser:
    """`teacher.predict_eps` for one prompt batch and guidance scale as a plain `eps_fn(x, t)`,
    counting network evaluations in `nfe` (2 per guided call, 1 per unguided call)."""

    def __init__(self, teacher, cond, guidance_scale: float):
        self.teacher, self.cond, self.guidance_scale = teacher, cond, float(guidance_scale)
        self.nfe = 0

    def __call__(self, x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """Guided eps as float64 at timestep t: an int, or a (B,) long tensor of per-sample timesteps.
        The network sees x as float32 (what diffusers stores), whatever dtype the caller computes in."""
        if isinstance(t, torch.Tensor):
            tt = t.to(device=x.device, dtype=torch.long).reshape(-1).expand(x.shape[0])
        else:
            tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        eps = self.teacher.predict_eps(x.float(), tt, self.cond, self.guidance_scale)
        self.nfe += evaluations_per_call(self.guidance_scale)
        return eps.double()


# --- timestep grids --------------------------------------------------------------------------

def _check_grid(num_train_timesteps: int, steps: int, spacing: str) -> None:
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}: allowed are {', '.join(SPACINGS)}")
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be an integer from 1 to {num_train_timesteps}, got {steps!r}")


def _as_list(ts: np.ndarray, num_train_timesteps: int) -> list[int]:
    out = [int(t) for t in np.asarray(ts).astype(np.int64)]
    if out and not (0 <= min(out) and max(out) < num_train_timesteps):
        raise ValueError(f"timesteps {out[0]}..{out[-1]} fall outside [0, {num_train_timesteps - 1}]: lower steps_offset")
    return out


def ddim_timesteps(num_train_timesteps: int, steps: int, spacing: str = "trailing", steps_offset: int = 0) -> list[int]:
    """Descending timesteps exactly as DDIMScheduler.set_timesteps makes them (Heun's integer spacings too).

    "trailing" starts at T - 1, the only grid that sees pure noise on a zero-terminal-SNR schedule
    (Lin et al. 2023); "leading" (+ steps_offset) is Stable Diffusion's; "linspace" spans 0..T-1."""
    _check_grid(num_train_timesteps, steps, spacing)
    T = num_train_timesteps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round()[::-1].copy()
    elif spacing == "leading":
        ts = (np.arange(0, steps) * (T // steps)).round()[::-1].copy().astype(np.int64) + steps_offset
    else:
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    return _as_list(ts, T)


def dpm_timesteps(num_train_timesteps: int, steps: int, spacing: str = "trailing", steps_offset: int = 0) -> list[int]:
    """Descending timesteps exactly as DPMSolverMultistepScheduler.set_timesteps makes them.

    Unlike DDIM, its "linspace" and "leading" divide the range into steps + 1 parts and drop the
    last point (t = 0), so the final step goes from t > 0 to sigma = 0."""
    _check_grid(num_train_timesteps, steps, spacing)
    T = num_train_timesteps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].copy()
    elif spacing == "leading":
        ts = (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    else:
        ts = np.arange(T, 0, -T / steps).round().astype(np.int64) - 1
    return _as_list(ts, T)


def _log_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """log sigma_t = log sqrt((1 - abar_t) / abar_t) for every timestep, float64 on the host."""
    abar = alphas_cumprod.detach().double().cpu()
    return (((1 - abar) / abar).sqrt()).log()


def _rho_sigmas(lo: torch.Tensor, hi: torch.Tensor, n: int, rho: float) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: n noise levels from hi down to lo, evenly spaced in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def _snap(sigmas: torch.Tensor, log_sigmas: torch.Tensor) -> list[int]:
    """The nearest discrete timestep to each sigma, in log sigma (k-diffusion's quantized discrete schedule)."""
    return [int(t) for t in (sigmas.log()[:, None] - log_sigmas[None, :]).abs().argmin(-1).tolist()]


def karras_timesteps(alphas_cumprod: torch.Tensor, steps: int, rho: float = 7.0,
                     sigma_max: float | None = 80.0) -> list[int]:
    """Karras et al.'s rho-spaced sigmas from min(sigma_max, the schedule's largest) down to its smallest,
    each snapped to the nearest discrete timestep in log sigma (k-diffusion's quantized discrete
    schedule), duplicates dropped: at most `steps` points (Heun's grid; students want exactly
    steps + 1 points and use `polynomial_timesteps`).

    EDM's cap sigma_max = 80 matters on zero-terminal-SNR schedules (cosine: sigma(T-1) ~ 2e4), where
    a second-order step across sigma 2e4 -> O(1) is meaningless. Snapping keeps the network at
    timesteps it was trained on and `predict_eps` exact; diffusers' use_karras_sigmas instead
    interpolates fractional timesteps, so this grid is not diffusers'."""
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    log_sigmas = _log_sigmas(alphas_cumprod)
    lo, hi = log_sigmas[0].exp(), log_sigmas[-1].exp()
    if sigma_max is not None:
        hi = hi.clamp(max=sigma_max)
    ts = _snap(_rho_sigmas(lo, hi, steps, rho), log_sigmas)
    return [t for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]


def polynomial_timesteps(alphas_cumprod: torch.Tensor, steps: int, rho: float = 7.0, sigma_min: float = 0.006,
                         sigma_max: float = 80.0) -> list[int]:
    """A student's time grid: exactly steps + 1 strictly decreasing discrete timesteps on Karras et
    al.'s rho-polynomial noise levels (EDM, eq. 5: sigma_i = (sigma_max^(1/rho) + i / steps
    (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..steps), each snapped to the nearest
    timestep in log sigma, so the network is only ever called at timesteps it was trained on.

    The ends are clamped to the schedule: the first point t_max is the timestep nearest to
    min(sigma_max, sigma(T - 1)) (EDM's cap 80 matters on zero-terminal-SNR schedules: on the cosine
    schedule sigma(T - 1) ~ 2e4 and t_max = 991; on Stable Diffusion's sigma(999) = 14.6 and
    t_max = 999), the last point t_min the timestep nearest to max(sigma_min, sigma(0)). The
    default sigma_min = 0.006 is about the smallest noise level of the cosine schedule
    (sigma(t = 0) = 0.0064), so there t_min is timestep 0 (also on the linear and Stable Diffusion
    schedules, whose sigma(0) is larger); EDM's continuous models use 0.002 (Karras et al. 2022, Table 1).

    Duplicates: where the grid is finer than the discrete schedule, several points snap to one
    timestep: near t_min on a fine grid, and on the cosine schedule near t_max too (sigma grows by
    ~10% per timestep there). They are not dropped (karras_timesteps does): walking up from t_min
    each point is raised to at least one above the next, then walking down from t_max each is
    lowered to at most one below the previous, so a crowded end becomes a run of consecutive
    timesteps and the rest is EDM's grid snapped. Both ends stay where they snapped;
    steps > t_max - t_min is an error.
    """
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")
    log_sigmas = _log_sigmas(alphas_cumprod)
    lo, hi = log_sigmas[0].exp().clamp(min=sigma_min), log_sigmas[-1].exp().clamp(max=sigma_max)
    if not lo < hi:
        raise ValueError(f"sigma_min={sigma_min} and sigma_max={sigma_max} leave no range on this schedule, whose "
                         f"sigma spans {log_sigmas[0].exp().item():.4g}..{log_sigmas[-1].exp().item():.4g}")
    ts = _snap(_rho_sigmas(lo, hi, steps + 1, rho), log_sigmas)
    t_max, t_min = ts[0], ts[-1]
    if steps > t_max - t_min:
        raise ValueError(f"steps must be at most {t_max - t_min} here: a grid needs steps + 1 distinct timesteps and "
                         f"only timesteps {t_min}..{t_max} lie between sigma {lo.item():.4g} and {hi.item():.4g}, "
                         f"got {steps}")
    for i in range(steps - 1, 0, -1):
        ts[i] = max(ts[i], ts[i + 1] + 1)
    for i in range(1, steps + 1):
        ts[i] = min(ts[i], ts[i - 1] - 1)
    return ts


# --- shared pieces ---------------------------------------------------------------------------

def _batch_size(cond) -> int:
    return len(cond.prompts)


def _noise_like(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard normal float32 noise drawn on the generator's device (CPU by default), then moved:
    the same seed gives the same noise whatever device the teacher is on (diffusers' randn_tensor)."""
    draw_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=draw_device, dtype=torch.float32).to(device)


def initial_noise(teacher, batch: int, generator: torch.Generator | None = None,
                  x_T: torch.Tensor | None = None) -> torch.Tensor:
    """x_T (B, C, R, R) float32 on the teacher's device: the given one, or drawn from `generator`."""
    shape = (batch, teacher.channels, teacher.resolution, teacher.resolution)
    if x_T is not None:
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape} (one noise image per prompt)")
        return x_T.detach().to(teacher.device, torch.float32).clone()
    return _noise_like(shape, generator, teacher.device)


def _grid(timesteps, make, num_train_timesteps: int, steps: int, spacing: str, steps_offset: int) -> list[int]:
    if timesteps is None:
        return make(num_train_timesteps, steps, spacing, steps_offset)
    ts = [int(t) for t in timesteps]
    if not ts or any(not 0 <= t < num_train_timesteps for t in ts):
        raise ValueError(f"custom timesteps must be a non-empty list in [0, {num_train_timesteps - 1}], got {ts}")
    return ts


def _result(teacher, x: torch.Tensor, denoiser: CountingDenoiser, ts: list[int]) -> SampleResult:
    x = x.float()
    return SampleResult(images=teacher.decode(x), x=x, nfe=denoiser.nfe, timesteps=list(ts))


def _check_timestep(t, num_train_timesteps: int, name: str, clean_ok: bool):
    """An int timestep in range (-1 allowed where `clean_ok`), or an integer tensor (not range-checked:
    that would cost a host sync per call). Returns the int or the tensor."""
    if isinstance(t, torch.Tensor):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer timesteps, got a {t.dtype} tensor")
        return t
    lo = -1 if clean_ok else 0
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not lo <= t < num_train_timesteps:
        clean = " (-1: the clean end, abar = 1)" if clean_ok else ""
        raise ValueError(f"{name} must be an integer timestep from {lo} to {num_train_timesteps - 1}{clean} "
                         f"or a (B,) long tensor, got {t!r}")
    return int(t)


def _abar(schedule, t, like: torch.Tensor) -> torch.Tensor:
    """abar at timestep(s) t in float64, with t = -1 meaning abar = 1 (a clean image).

    An int gives a 0-dim tensor: every kernel takes it as a scalar, so there is no device copy and
    no host sync. A tensor gives one value per sample, shaped (B, 1, ..., 1) against `like` and on
    its device; it indexes the table on t's device (a copy per call unless the schedule lives there)."""
    table = schedule.alphas_cumprod
    if isinstance(t, torch.Tensor):
        t = t.reshape(-1).long()
        a = table.to(t.device)[t.clamp_min(0)].double()
        a = torch.where(t < 0, torch.ones_like(a), a)
        return a.to(like.device).reshape(-1, *([1] * (like.dim() - 1)))
    if t < 0:
        return torch.ones((), dtype=torch.float64)
    return table[t].double()


def _vp_table(schedule, timesteps: list[int]) -> tuple[list[float], list[float], list[float]]:
    """VP alpha, sigma and lambda = log(alpha / sigma) at timesteps (all >= 0) as Python floats:
    one host read for a whole grid, so the loop that uses them never syncs."""
    abar = schedule.alphas_cumprod.detach().double().cpu()
    alpha, sigma, lam = _alpha_sigma_lambda(abar[list(timesteps)])
    return alpha.tolist(), sigma.tolist(), lam.tolist()


def _alpha_sigma_lambda(abar_t: torch.Tensor):
    """VP alpha, sigma and log-SNR/2 (lambda) from abar, via the VE sigma as diffusers computes them."""
    s = ((1 - abar_t) / abar_t).sqrt()
    alpha = 1 / (s ** 2 + 1).sqrt()
    sigma = s * alpha
    return alpha, sigma, alpha.log() - sigma.log()


def _descending(timesteps, num_train_timesteps: int) -> list[int]:
    """A grid for the multistep integrator: >= 2 strictly decreasing ints, the last may be -1 (clean)."""
    if isinstance(timesteps, torch.Tensor):
        timesteps = timesteps.tolist()
    ts = [int(t) for t in timesteps]
    T = num_train_timesteps
    if (len(ts) < 2 or any(not 0 <= t < T for t in ts[:-1]) or not -1 <= ts[-1] < T
            or any(a <= b for a, b in zip(ts, ts[1:]))):
        raise ValueError(f"timesteps must be at least 2 strictly decreasing integers in [0, {T - 1}] (the last may "
                         f"be -1: the clean end), got {ts}")
    return ts


# --- DDIM ------------------------------------------------------------------------------------

def ddim_step(schedule, x: torch.Tensor, eps: torch.Tensor, t: int | torch.Tensor, t_next: int | torch.Tensor, *,
              eta: float = 0.0, noise: torch.Tensor | None = None, clip_x0: bool = False,
              clipped_eps: bool = True) -> torch.Tensor:
    """One DDIM update (Song et al. 2021, eq. 12) of x at timestep t, given eps predicted there, to t_next:

        x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)
        x_next = sqrt(abar_next) x0 + sqrt(1 - abar_next - s^2) eps + s noise,
        s = eta sqrt((1 - abar_next) / (1 - abar_t) (1 - abar_t / abar_next)).

    With eta = 0 (the default) it is deterministic DDIM: Euler's method on the probability-flow ODE
    in x / sqrt(abar) against sigma (Song et al. 2021, eq. 14), exact whatever the step when the
    data are a single point (then eps stays constant along the path).

    t, t_next: ints, or (B,) long tensors of per-sample timesteps (mixing both is fine). t_next = -1
      is abar = 1: the step returns the predicted x0, the clean image. t_next > t steps toward noise
      (DDIM inversion).
    eta, noise: the ancestral noise scale and the standard normal noise it scales (x's shape;
      required when eta > 0; only toward lower noise, t_next < t). The samplers draw it; students
      wanting a deterministic map leave eta 0.
    clip_x0: clamp x0 to [-1, 1] (DDIMScheduler's clip_sample; pixel teachers). clipped_eps then
      recomputes eps from the clamped x0 (use_clipped_model_output=True), so the deterministic step
      stays consistent with the x0 it aims at; that eps is rounded to x's dtype, the embedded
      teacher's original float32 round trip on which its published figures depend.

    Differentiable in x and eps. Computed in the promoted dtype of x and eps (coefficients in
    float64, rounded to it) and returned in that dtype: a float32 student stays in float32; the
    samplers (float32 x, float64 eps) compute in float64 as before.
    """
    T = schedule.num_train_timesteps
    t = _check_timestep(t, T, "t", clean_ok=False)
    t_next = _check_timestep(t_next, T, "t_next", clean_ok=True)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0 and noise is None:
        raise ValueError("ddim_step with eta > 0 needs `noise` (standard normal, x's shape)")
    dtype = torch.promote_types(x.dtype, eps.dtype)
    a, a_next = _abar(schedule, t, x), _abar(schedule, t_next, x)
    sqrt_a, sqrt_1ma = a.sqrt().to(dtype), (1 - a).sqrt().to(dtype)
    if eta > 0:
        sigma = eta * ((1 - a_next) / (1 - a) * (1 - a / a_next)).sqrt()
        c_eps = (1 - a_next - sigma ** 2).clamp_min(0).sqrt().to(dtype)
    else:  # the same value as with sigma = 0, without the sqrt of a negative number when inverting (t_next > t)
        c_eps = (1 - a_next).clamp_min(0).sqrt().to(dtype)
    c_x0 = a_next.sqrt().to(dtype)
    xc, eps = x.to(dtype), eps.to(dtype)
    x0 = (xc - sqrt_1ma * eps) / sqrt_a
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        if clipped_eps:
            eps = ((xc - sqrt_a * x0) / sqrt_1ma).to(x.dtype).to(dtype)
    x_next = c_x0 * x0 + c_eps * eps
    if eta > 0:
        x_next = x_next + sigma.to(dtype) * noise.to(x_next.device, dtype)
    return x_next


@torch.no_grad()
def ddim_sample(teacher, cond, steps: int = 25, guidance: float = 1.0, generator: torch.Generator | None = None, *,
                x_T: torch.Tensor | None = None, eta: float = 0.0, spacing: str = "trailing", steps_offset: int = 0,
                timesteps: list[int] | None = None, prev_timestep: str = "next", clip_x0: bool = False,
                clipped_eps: bool = True, final_alpha_one: bool = True,
                callback: Callback | None = None) -> SampleResult:
    """DDIM (Song et al. 2021), eq. 12, one image per prompt in `cond`: `ddim_step` along the grid.

    eta: 0 is deterministic DDIM, 1 is DDPM-like ancestral noise (drawn from `generator` at every
      step, after x_T, as DDIMScheduler.step does).
    prev_timestep: "next" steps to the next timestep of the grid; "ratio" steps to t - T // steps as
      DDIMScheduler does, which differs from "next" where the grid is not evenly spaced by T // steps
      ("linspace", or "trailing" with T % steps != 0); there the state is evaluated at a
      slightly different noise level than it has.
    clip_x0, clipped_eps: see `ddim_step` (DDIMScheduler's clip_sample and use_clipped_model_output).
    final_alpha_one: the step after the last timestep goes to abar = 1, a clean image
      (set_alpha_to_one=True); False stops at abar_0.
    callback(i, t, x): after step i (network called at timestep t), with the float32 sample x.

    The embedded teacher's published figures used spacing="trailing", clip_x0=True (defaults
    otherwise); tests/test_solvers.py keeps that reproducible.
    """
    if prev_timestep not in ("next", "ratio"):
        raise ValueError(f"unknown prev_timestep {prev_timestep!r}: allowed are 'next', 'ratio'")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    schedule = teacher.schedule
    T = schedule.num_train_timesteps
    ts = _grid(timesteps, ddim_timesteps, T, steps, spacing, steps_offset)
    denoise = CountingDenoiser(teacher, cond, guidance)
    x = initial_noise(teacher, _batch_size(cond), generator, x_T)
    for i, t in enumerate(ts):
        eps = denoise(x, t)
        prev = (ts[i + 1] if i + 1 < len(ts) else -1) if prev_timestep == "next" else t - T // len(ts)
        if prev < 0:
            prev = -1 if final_alpha_one else 0  # abar = 1, or abar_0 (set_alpha_to_one=False)
        noise = _noise_like(x.shape, generator, x.device) if eta > 0 else None
        x = ddim_step(schedule, x, eps, t, prev, eta=eta, noise=noise, clip_x0=clip_x0, clipped_eps=clipped_eps).float()
        if callback is not None:
            callback(i, t, x)
    return _result(teacher, x, denoise, ts)


# --- DPM-Solver++ multistep ------------------------------------------------------------------

def _dpmpp_update(x: torch.Tensor, x0s: list[torch.Tensor], lams: list[float], alpha_next: float, sigma: float,
                  sigma_next: float, lam_next: float, order: int) -> torch.Tensor:
    """The DPM-Solver++ multistep update of order 1, 2 ("midpoint") or 3 from the last `order` data
    predictions x0s (at log-SNR/2 values lams, the last at x's own) to lam_next, exactly as
    diffusers' dpm_solver_first_order_update / multistep_dpm_solver_{second,third}_order_update write it."""
    h = lam_next - lams[-1]
    phi1 = math.expm1(-h)  # exp(-h) - 1
    x_next = (sigma_next / sigma) * x.to(x0s[-1].dtype) - alpha_next * phi1 * x0s[-1]
    if order == 2:
        r0 = (lams[-1] - lams[-2]) / h
        d1 = (x0s[-1] - x0s[-2]) / r0
        x_next = x_next - 0.5 * alpha_next * phi1 * d1
    elif order == 3:
        r0, r1 = (lams[-1] - lams[-2]) / h, (lams[-2] - lams[-3]) / h
        d1_0, d1_1 = (x0s[-1] - x0s[-2]) / r0, (x0s[-2] - x0s[-3]) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        x_next = (x_next + alpha_next * (phi1 / h + 1.0) * d1
                  - alpha_next * ((phi1 + h) / h ** 2 - 0.5) * d2)
    return x_next


def dpmpp_step(schedule, x: torch.Tensor, x0s: Sequence[torch.Tensor], timesteps: Sequence[int], t_next: int,
               order: int | None = None) -> torch.Tensor:
    """One DPM-Solver++ multistep update (Lu et al. 2022, "DPM-Solver++", data prediction; order 2 in
    the "midpoint" form of diffusers' DPMSolverMultistepScheduler, order 3 as its third-order update)
    of x at timesteps[-1] to t_next, in lambda = log(alpha / sigma):

        x_next = (sigma_next / sigma) x - alpha_next (exp(-h) - 1) D,   h = lambda_next - lambda,

    where D is x0s[-1] plus the finite-difference corrections that raise the order.

    x0s: the data predictions x0 = (x_s - sigma_s eps_s) / alpha_s at `timesteps` (oldest first, one
      per timestep, the last at x's own timestep). Multistep methods reuse them instead of extra
      network calls: order k uses the last k. Intervals may be uneven.
    t_next: any timestep below timesteps[-1], or -1 (sigma = 0, the clean end). There every order
      reduces to the first-order step, which returns x0s[-1] (diffusers' final_sigmas_type="zero"
      does the same; with h = infinity the higher-order terms would divide by r = h_prev / h = 0).
    order: 1, 2 or 3, at most len(x0s); default len(x0s).

    Differentiable in x and x0s; computed in their promoted dtype and returned in it. It reads the
    coefficients on the host (a GPU-resident schedule is copied back once per call);
    `dpmpp_integrate` reads them once per grid.
    """
    T = schedule.num_train_timesteps
    ts = [int(t) for t in timesteps]
    if len(ts) != len(x0s) or not ts:
        raise ValueError(f"dpmpp_step needs one timestep per x0 prediction, got {len(ts)} timesteps for {len(x0s)}")
    order = len(x0s) if order is None else order
    if order not in (1, 2, 3) or order > len(x0s):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3 and at most the {len(x0s)} x0 predictions given, "
                         f"got {order!r}")
    t_next = _check_timestep(t_next, T, "t_next", clean_ok=True)
    ts = ts[-order:]
    if (isinstance(t_next, torch.Tensor) or any(not 0 <= t < T for t in ts)
            or any(a <= b for a, b in zip(ts, ts[1:] + [t_next]))):
        raise ValueError(f"dpmpp_step needs strictly decreasing int timesteps in [0, {T - 1}] ending above t_next "
                         f"(-1: the clean end), got {ts} -> {t_next}")
    dtype = torch.promote_types(x.dtype, x0s[-1].dtype)
    x0s = [p.to(dtype) for p in x0s[-order:]]
    if t_next == -1:
        return x0s[-1]
    alpha, sigma, lam = _vp_table(schedule, ts + [t_next])
    return _dpmpp_update(x, x0s, lam[:-1], alpha[-1], sigma[-2], sigma[-1], lam[-1], order)


def dpmpp_integrate(eps_fn: EpsFn, schedule, x: torch.Tensor, timesteps: Sequence[int], order: int = 3, *,
                    lower_order_final: bool = True, callback: Callback | None = None) -> tuple[torch.Tensor, int]:
    """Integrate the probability-flow ODE with DPM-Solver++(order) multistep (Lu et al. 2022) from x at
    timesteps[0] through every listed timestep to timesteps[-1]; returns (x there, eps_fn calls).

    timesteps: any strictly decreasing ints in [0, T); the last may be -1 (sigma = 0: the last step
      returns the predicted x0, as dpmpp_sample ends). x is any state at timesteps[0], not only
      noise: SFD's teacher covers one student interval [t_i, t_{i+1}] with M sub-steps of
      DPM-Solver++(3M) by calling this on a sub-grid of M + 1 points from t_i to t_{i+1}.
    Warm-up: step i has order min(order, i + 1), from the data predictions of the previous calls
      of this grid (none carried in). The first step is thus first order, and its O(h^2) local
      error caps the global convergence of orders 2 and 3 at second order (as in diffusers; the
      Gaussian test in tests/test_solver_steps.py measures it). With lower_order_final and fewer
      than 15 steps, the last step is first order and the one before at most second, as
      DPMSolverMultistepScheduler does (also when the grid ends above sigma = 0, its
      final_sigmas_type="sigma_min"); on a short sub-grid that costs accuracy, so a student may
      pass False. A step into sigma = 0 is always first order (see `dpmpp_step`).
    eps_fn(x, t) -> eps at int t. The number of calls returned is len(timesteps) - 1; with a
      guided CountingDenoiser its `nfe` counts two network evaluations per call.
    callback(i, t, x): after step i (eps_fn called at timestep t), with the new state.

    The state keeps x's dtype between steps (float32 in the samplers, as diffusers stores it);
    each update is computed in the promoted dtype of x and eps. Not under torch.no_grad: wrap the
    call when the result is a target.
    """
    T = schedule.num_train_timesteps
    ts = _descending(timesteps, T)
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order!r}")
    n = len(ts) - 1
    alpha, sigma, lam = _vp_table(schedule, ts[:-1] if ts[-1] == -1 else ts)
    state_dtype = x.dtype
    x0s: list[torch.Tensor] = []
    lams: list[float] = []
    for i in range(n):
        eps = eps_fn(x, ts[i])
        dtype = torch.promote_types(x.dtype, eps.dtype)
        x0 = (x.to(dtype) - sigma[i] * eps.to(dtype)) / alpha[i]
        x0s, lams = (x0s + [x0])[-3:], (lams + [lam[i]])[-3:]
        if ts[i + 1] == -1:  # sigma_next = 0: the first-order step lands exactly on x0
            x = x0.to(state_dtype)
        else:
            k = min(order, i + 1)
            if lower_order_final and n < 15:
                k = 1 if i == n - 1 else min(k, 2) if i == n - 2 else k
            x = _dpmpp_update(x, x0s, lams, alpha[i + 1], sigma[i], sigma[i + 1], lam[i + 1], k).to(state_dtype)
        if callback is not None:
            callback(i, ts[i], x)
    return x, n


@torch.no_grad()
def dpmpp_sample(teacher, cond, steps: int = 25, guidance: float = 1.0, generator: torch.Generator | None = None, *,
                 order: int = 2, x_T: torch.Tensor | None = None, spacing: str = "trailing", steps_offset: int = 0,
                 timesteps: list[int] | None = None, lower_order_final: bool = True,
                 callback: Callback | None = None) -> SampleResult:
    """DPM-Solver++ multistep (Lu et al. 2022), data prediction, "midpoint" second order, ending at
    sigma = 0 (diffusers' final_sigmas_type="zero"): the last step returns the predicted x0.
    `dpmpp_integrate` over the grid followed by -1.

    Warm-up uses lower orders (step i has order min(order, i + 1)); with lower_order_final and fewer
    than 15 steps the second-to-last step is at most second order, as DPMSolverMultistepScheduler does.
    callback(i, t, x): after step i (network called at timestep t), with the float32 sample x.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order!r}")
    schedule = teacher.schedule
    ts = _grid(timesteps, dpm_timesteps, schedule.num_train_timesteps, steps, spacing, steps_offset)
    denoise = CountingDenoiser(teacher, cond, guidance)
    x = initial_noise(teacher, _batch_size(cond), generator, x_T)
    x, _ = dpmpp_integrate(denoise, schedule, x, ts + [-1], order, lower_order_final=lower_order_final,
                           callback=callback)
    return _result(teacher, x, denoise, ts)


def dpmpp_2m_sample(teacher, cond, steps: int = 25, guidance: float = 1.0, generator: torch.Generator | None = None,
                    **options) -> SampleResult:
    """DPM-Solver++(2M): diffusers' DPMSolverMultistepScheduler defaults (solver_order=2)."""
    return dpmpp_sample(teacher, cond, steps, guidance, generator, order=2, **options)


def dpmpp_3m_sample(teacher, cond, steps: int = 25, guidance: float = 1.0, generator: torch.Generator | None = None,
                    **options) -> SampleResult:
    """DPM-Solver++(3M): solver_order=3, meant for unguided or lightly guided sampling."""
    return dpmpp_sample(teacher, cond, steps, guidance, generator, order=3, **options)


# --- Heun (EDM) ------------------------------------------------------------------------------

def _heun_update(eps_fn: EpsFn, z: torch.Tensor, t, t_next, s, s_next, scale, scale_next) -> torch.Tensor:
    """Heun's step on dz/dsigma = eps in the VE variable z = x sqrt(1 + sigma^2) from sigma s (timestep
    t) to s_next (t_next); scale = sqrt(1 + s^2) maps z back to the network's x. Python floats with
    an int t_next (one call into t_next = -1, sigma 0), or per-sample tensors (always two calls;
    samples going to -1 keep the Euler step)."""
    d = eps_fn(z / scale, t)
    dt = s_next - s
    if not isinstance(t_next, torch.Tensor):
        if t_next == -1:  # no correction into sigma = 0 (Karras et al. Alg. 1, line 7)
            return z + dt * d
        return z + dt * (d + eps_fn((z + dt * d) / scale_next, t_next)) / 2
    euler = z + dt * d
    heun = z + dt * (d + eps_fn(euler / scale_next, t_next.clamp_min(0))) / 2
    return torch.where((t_next < 0).to(z.device).reshape(-1, *([1] * (z.dim() - 1))), euler, heun)


def heun_step(eps_fn: EpsFn, schedule, x: torch.Tensor, t: int | torch.Tensor,
              t_next: int | torch.Tensor) -> torch.Tensor:
    """One step of Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Alg. 1
    without churn, as heun_sample and HeunDiscreteScheduler) from timestep t to t_next, returning x_next.

    It works in the VE variable z = x / alpha = x sqrt(1 + sigma^2), where the ODE is dz/dsigma = eps
    (eq. 4 with sigma(t) = t, s(t) = 1):
        d = eps_fn(x, t);  z_E = z + (sigma' - sigma) d;
        z' = z + (sigma' - sigma) (d + eps_fn(z_E / sqrt(1 + sigma'^2), t')) / 2;  x_next = z' / sqrt(1 + sigma'^2).
    Two eps_fn calls; into sigma = 0 (t_next = -1, the clean end) one: the Euler step, whose
    correction would evaluate the network at sigma 0.

    t, t_next: ints, or (B,) long tensors of per-sample timesteps (consistency distillation's Heun
    teacher step t_{n+1} -> t_n). With a tensor t_next there are always two calls: samples going to
    -1 keep the Euler step and their second evaluation (at timestep 0) is discarded.
    Differentiable; computed in x's dtype (coefficients in float64, rounded to it) promoted with eps's.
    """
    T = schedule.num_train_timesteps
    t = _check_timestep(t, T, "t", clean_ok=False)
    t_next = _check_timestep(t_next, T, "t_next", clean_ok=True)
    a, a_next = _abar(schedule, t, x), _abar(schedule, t_next, x)
    s, s_next = ((1 - a) / a).sqrt(), ((1 - a_next) / a_next).sqrt()
    scale, scale_next = (1 + s ** 2).sqrt(), (1 + s_next ** 2).sqrt()
    s, s_next, scale, scale_next = (c.to(x.dtype) for c in (s, s_next, scale, scale_next))
    if isinstance(t_next, torch.Tensor):
        t_next = t_next.reshape(-1).long()
    z_next = _heun_update(eps_fn, x * scale, t, t_next, s, s_next, scale, scale_next)
    return z_next / scale_next


@torch.no_grad()
def heun_sample(teacher, cond, steps: int = 25, guidance: float = 1.0, generator: torch.Generator | None = None, *,
                x_T: torch.Tensor | None = None, spacing: str = "karras", steps_offset: int = 0, rho: float = 7.0,
                sigma_max: float | None = 80.0, timesteps: list[int] | None = None,
                callback: Callback | None = None) -> SampleResult:
    """Heun's second-order method on the probability-flow ODE in the VE variable z = x / alpha
    (Karras et al. 2022, Alg. 1 without churn): dz/dsigma = eps. 2 * steps - 1 calls (no correction
    into sigma = 0), as HeunDiscreteScheduler; the step is `heun_step`'s, with z carried in float64
    from step to step.

    spacing: "karras" (default) is `karras_timesteps(rho, sigma_max)`; "leading" / "trailing" /
    "linspace" are `ddim_timesteps`, and with "leading" or "trailing" this is diffusers'
    HeunDiscreteScheduler step for step. Avoid "trailing" on zero-terminal-SNR schedules: the first
    trapezoid spans sigma ~ 2e4 -> O(1) and the samples are noise (diffusers' too).
    z starts at x_T * sqrt(1 + sigma_0^2), the VP-consistent scale; diffusers uses that for "leading"
    but sigma_0 for "trailing"/"linspace" (k-diffusion's convention), a 1/(2 sigma_0^2) relative difference.
    callback(i, t, x): after step i (first call at timestep t), with the float32 sample x = z / sqrt(1 + sigma^2).
    """
    schedule = teacher.schedule
    T = schedule.num_train_timesteps
    if spacing == "karras" and timesteps is None:
        timesteps = karras_timesteps(schedule.alphas_cumprod, steps, rho, sigma_max)
    elif spacing not in SPACINGS + ("karras",):
        raise ValueError(f"unknown timestep spacing {spacing!r} for heun: allowed are karras, {', '.join(SPACINGS)}")
    ts = _grid(timesteps, ddim_timesteps, T, steps, spacing, steps_offset)
    denoise = CountingDenoiser(teacher, cond, guidance)
    x = initial_noise(teacher, _batch_size(cond), generator, x_T)
    abar = schedule.alphas_cumprod.detach().double().cpu()
    sig = [*(((1 - abar[ts]) / abar[ts]).sqrt().tolist()), 0.0]
    scale = [math.sqrt(1 + s ** 2) for s in sig]
    z = x.double() * scale[0]
    for i, t in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else -1
        z = _heun_update(denoise, z, t, t_next, sig[i], sig[i + 1], scale[i], scale[i + 1])
        if callback is not None:
            callback(i, t, (z / scale[i + 1]).float())
    return _result(teacher, z, denoise, ts)


# --- dispatch --------------------------------------------------------------------------------

SOLVERS = {"ddim": ddim_sample, "dpmpp-2m": dpmpp_2m_sample, "dpmpp-3m": dpmpp_3m_sample, "heun": heun_sample}


def check_solver(solver: str) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: allowed are {', '.join(SOLVERS)}")
    return solver


def sample(teacher, cond, solver: str = "ddim", steps: int = 25, guidance: float = 1.0,
           generator: torch.Generator | None = None, **options) -> SampleResult:
    """Sample one image per prompt in `cond` with the named solver; `options` go to that solver
    (x_T, spacing, steps_offset, timesteps, callback(i, t, x), and eta / clip_x0 for DDIM, rho / sigma_max
    for Heun, ...)."""
    return SOLVERS[check_solver(solver)](teacher, cond, steps, guidance, generator, **options)
