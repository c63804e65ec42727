"""Samplers on the Teacher protocol: DDIM, DPM-Solver++ (2M, 3M) and Heun, with NFE accounting.

Each sampler is one plain function that uses only `teacher.schedule.alphas_cumprod`,
`teacher.predict_eps`, `teacher.channels`, `teacher.resolution`, `teacher.device` and
`teacher.decode`, so the oracle, the embedded network and a Stable Diffusion checkpoint sample
the same way. The formulas and timestep grids are diffusers' (DDIMScheduler,
DPMSolverMultistepScheduler, HeunDiscreteScheduler) and tests/test_solvers.py checks them
against a hand loop over those schedulers; where diffusers has a quirk we do not want as the
default, an argument reproduces it (`prev_timestep="ratio"` for DDIM).

Precision: the sample handed to the network is float32 (what diffusers stores); the updates are
computed in float64 from the float32 `alphas_cumprod`. NFE counts network evaluations: a guided
call (guidance != 1) is two (cond and uncond), an unguided one is one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SPACINGS = ("leading", "trailing", "linspace")


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
    """`teacher.predict_eps` for one prompt batch and guidance scale, counting network evaluations."""

    def __init__(self, teacher, cond, guidance_scale: float):
        self.teacher, self.cond, self.guidance_scale = teacher, cond, float(guidance_scale)
        self.nfe = 0

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Guided eps at integer timestep t for a float32 sample x, as float64."""
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        eps = self.teacher.predict_eps(x, tt, self.cond, self.guidance_scale)
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


def karras_timesteps(alphas_cumprod: torch.Tensor, steps: int, rho: float = 7.0,
                     sigma_max: float | None = 80.0) -> list[int]:
    """Karras et al.'s rho-spaced sigmas from min(sigma_max, the schedule's largest) down to its smallest,
    each snapped to the nearest discrete timestep in log sigma (k-diffusion's quantized discrete
    schedule), duplicates dropped.

    EDM's cap sigma_max = 80 matters on zero-terminal-SNR schedules (cosine: sigma(T-1) ~ 2e4), where
    a second-order step across sigma 2e4 -> O(1) is meaningless. Snapping keeps the network at
    timesteps it was trained on and `predict_eps` exact; diffusers' use_karras_sigmas instead
    interpolates fractional timesteps, so this grid is not diffusers'."""
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    abar = alphas_cumprod.double().cpu()
    log_sigmas = (((1 - abar) / abar).sqrt()).log()
    lo, hi = log_sigmas[0].exp(), log_sigmas[-1].exp()
    if sigma_max is not None:
        hi = hi.clamp(max=sigma_max)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    ts = (sigmas.log()[:, None] - log_sigmas[None, :]).abs().argmin(-1).tolist()
    return [int(t) for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]


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


# --- DDIM ------------------------------------------------------------------------------------

@torch.no_grad()
def ddim_sample(teacher, cond, steps: int = 25, guidance: float = 1.0, generator: torch.Generator | None = None, *,
                x_T: torch.Tensor | None = None, eta: float = 0.0, spacing: str = "trailing", steps_offset: int = 0,
                timesteps: list[int] | None = None, prev_timestep: str = "next", clip_x0: bool = False,
                clipped_eps: bool = True, final_alpha_one: bool = True) -> SampleResult:
    """DDIM (Song et al. 2021), eq. 12, one image per prompt in `cond`.

    eta: 0 is deterministic DDIM, 1 is DDPM-like ancestral noise (drawn from `generator` at every
      step, after x_T, as DDIMScheduler.step does).
    prev_timestep: "next" steps to the next timestep of the grid; "ratio" steps to t - T // steps as
      DDIMScheduler does, which differs from "next" where the grid is not evenly spaced by T // steps
      ("linspace", or "trailing" with T % steps != 0); there the state is evaluated at a
      slightly different noise level than it has.
    clip_x0: clamp the predicted x0 to [-1, 1] (DDIMScheduler's clip_sample; pixel teachers);
      clipped_eps then recomputes eps from the clamped x0 (use_clipped_model_output=True), so the
      deterministic step stays consistent with the x0 it aims at.
    final_alpha_one: the step after the last timestep goes to abar = 1, a clean image
      (set_alpha_to_one=True); False stops at abar_0.

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
    abar = schedule.alphas_cumprod.double()
    final = torch.tensor(1.0, dtype=torch.float64) if final_alpha_one else abar[0]
    for i, t in enumerate(ts):
        eps = denoise(x, t)
        prev = (ts[i + 1] if i + 1 < len(ts) else -1) if prev_timestep == "next" else t - T // len(ts)
        a = abar[t]
        a_prev = abar[prev] if prev >= 0 else final
        x0 = (x.double() - (1 - a).sqrt() * eps) / a.sqrt()
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            if clipped_eps:
                # The float32 round trip is the embedded teacher's original code; it keeps its figures exact.
                eps = ((x.double() - a.sqrt() * x0) / (1 - a).sqrt()).float().double()
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        x_next = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp_min(0).sqrt() * eps
        if eta > 0:
            x_next = x_next + sigma * _noise_like(x.shape, generator, x.device).double()
        x = x_next.float()
    return _result(teacher, x, denoise, ts)


# --- DPM-Solver++ multistep ------------------------------------------------------------------

def _alpha_sigma_lambda(abar_t: torch.Tensor):
    """VP alpha, sigma and log-SNR/2 (lambda) from abar, via the VE sigma as diffusers computes them."""
    s = ((1 - abar_t) / abar_t).sqrt()
    alpha = 1 / (s ** 2 + 1).sqrt()
    sigma = s * alpha
    return alpha, sigma, alpha.log() - sigma.log()


@torch.no_grad()
def dpmpp_sample(teacher, cond, steps: int = 25, guidance: float = 1.0, generator: torch.Generator | None = None, *,
                 order: int = 2, x_T: torch.Tensor | None = None, spacing: str = "trailing", steps_offset: int = 0,
                 timesteps: list[int] | None = None, lower_order_final: bool = True) -> SampleResult:
    """DPM-Solver++ multistep (Lu et al. 2022), data prediction, "midpoint" second order, ending at
    sigma = 0 (diffusers' final_sigmas_type="zero"): the last step returns the predicted x0.

    Warm-up uses lower orders (step i has order min(order, i + 1)); with lower_order_final and fewer
    than 15 steps the second-to-last step is at most second order, as DPMSolverMultistepScheduler does.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order!r}")
    schedule = teacher.schedule
    ts = _grid(timesteps, dpm_timesteps, schedule.num_train_timesteps, steps, spacing, steps_offset)
    n = len(ts)
    denoise = CountingDenoiser(teacher, cond, guidance)
    x = initial_noise(teacher, _batch_size(cond), generator, x_T)
    alpha, sigma, lam = _alpha_sigma_lambda(schedule.alphas_cumprod.double().cpu()[ts])
    alpha, sigma, lam = alpha.tolist(), sigma.tolist(), lam.tolist()
    x0s: list[torch.Tensor] = []
    for i, t in enumerate(ts):
        eps = denoise(x, t)
        x0 = (x.double() - sigma[i] * eps) / alpha[i]
        x0s = (x0s + [x0])[-3:]
        if i == n - 1:  # sigma_next = 0: the first-order step lands exactly on x0
            x = x0.float()
            break
        k = min(order, i + 1)
        if lower_order_final and n < 15 and i == n - 2:
            k = min(k, 2)
        h = lam[i + 1] - lam[i]
        phi1 = math.expm1(-h)  # exp(-h) - 1
        x_next = (sigma[i + 1] / sigma[i]) * x.double() - alpha[i + 1] * phi1 * x0
        if k == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d1 = (x0s[-1] - x0s[-2]) / r0
            x_next = x_next - 0.5 * alpha[i + 1] * phi1 * d1
        elif k == 3:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            d1_0, d1_1 = (x0s[-1] - x0s[-2]) / r0, (x0s[-2] - x0s[-3]) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x_next = (x_next + alpha[i + 1] * (phi1 / h + 1.0) * d1
                      - alpha[i + 1] * ((phi1 + h) / h ** 2 - 0.5) * d2)
        x = x_next.float()
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

@torch.no_grad()
def heun_sample(teacher, cond, steps: int = 25, guidance: float = 1.0, generator: torch.Generator | None = None, *,
                x_T: torch.Tensor | None = None, spacing: str = "karras", steps_offset: int = 0, rho: float = 7.0,
                sigma_max: float | None = 80.0, timesteps: list[int] | None = None) -> SampleResult:
    """Heun's second-order method on the probability-flow ODE in the VE variable z = x / alpha
    (Karras et al. 2022, Alg. 1 without churn): dz/dsigma = eps. 2 * steps - 1 calls (no correction
    into sigma = 0), as HeunDiscreteScheduler.

    spacing: "karras" (default) is `karras_timesteps(rho, sigma_max)`; "leading" / "trailing" /
    "linspace" are `ddim_timesteps`, and with "leading" or "trailing" this is diffusers'
    HeunDiscreteScheduler step for step. Avoid "trailing" on zero-terminal-SNR schedules: the first
    trapezoid spans sigma ~ 2e4 -> O(1) and the samples are noise (diffusers' too).
    z starts at x_T * sqrt(1 + sigma_0^2), the VP-consistent scale; diffusers uses that for "leading"
    but sigma_0 for "trailing"/"linspace" (k-diffusion's convention), a 1/(2 sigma_0^2) relative difference.
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
    abar = schedule.alphas_cumprod.double().cpu()
    sig = [*(((1 - abar[ts]) / abar[ts]).sqrt().tolist()), 0.0]

    def eps_at(z: torch.Tensor, i: int) -> torch.Tensor:
        return denoise((z / math.sqrt(1 + sig[i] ** 2)).float(), ts[i])

    z = x.double() * math.sqrt(1 + sig[0] ** 2)
    for i in range(len(ts)):
        d = eps_at(z, i)
        dt = sig[i + 1] - sig[i]
        if sig[i + 1] == 0:
            z = z + dt * d
        else:
            z = z + dt * (d + eps_at(z + dt * d, i + 1)) / 2
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
    (x_T, spacing, steps_offset, timesteps, and eta / clip_x0 for DDIM, rho / sigma_max for Heun, ...)."""
    return SOLVERS[check_solver(solver)](teacher, cond, steps, guidance, generator, **options)
