"""Score distillation losses on images: the core shared by NeRFs and image students.

Every loss takes images in [0, 1] from any differentiable generator, asks a frozen teacher for a
noise prediction and returns a scalar whose gradient w.r.t. the images is the distillation
gradient. They use the Teacher protocol only (diffusion/protocol.py); VSD also needs the teacher's
`network`, which it copies into a camera-conditioned LoRA (distill/lora.py).

- sds_loss: DreamFusion's SDS (Poole et al., 2022, eq. (3)).
- nfsd_loss: Noise-Free Score Distillation (Katzir et al., ICLR 2024).
- vsd_loss + lora_diffusion_loss: ProlificDreamer's VSD (Wang et al., NeurIPS 2023, eq. (9)), in
  threestudio's form; with weighting="dmd" the same two functions train DMD's one-step image
  generators (distill/students/dmd.py), so a NeRF and an image student get one gradient. The teacher sees the view-dependent prompt ("a red cube, front view"), the
  LoRA the view-independent one ("a red cube") plus the camera. Recipe per step:

      cond = teacher.encode_prompt(view_prompts)           # one row per image, view suffix included
      lora_cond = teacher.encode_prompt([prompt] * B)      # the same prompt without the view suffix
      out = vsd_loss(teacher, lora, images, cond, c2w, generator=g, lora_cond=lora_cond)
      lora_loss = lora_diffusion_loss(teacher, lora, None, lora_cond, c2w, generator=g, encoded=out.encoded)
      (out.loss + lora_loss).backward()    # the two losses touch disjoint parameters
      generator_opt.step(); lora_opt.step()                # lora_opt = make_lora_optimizer(lora)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion.protocol import Cond, cfg_combine
from .lora import LoraNetwork, network_kind
from ..diffusion.schedule import sample_timesteps

NFSD_NEGATIVE_PROMPT = ("unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, "
                        "low-resolution, gloomy")
"""The negative prompt of the NFSD paper (Katzir et al., 2023, Sec. 4)."""
NFSD_T_THRESHOLD = 200
"""NFSD takes delta_D = eps(empty) below this timestep (of 1000) and eps(empty) - eps(negative) from it on."""


class NonFiniteGradientError(FloatingPointError):
    """Raised when the distillation gradient holds NaN or Inf, so training stops before parameters are ruined."""


@dataclass
class ScoreOutput:
    loss: torch.Tensor
    grad_norm: float
    timesteps: torch.Tensor
    encoded: torch.Tensor | None = None  # the teacher-space input, detached (VSD's LoRA trains on it)


def dreamfusion_weight(abar: torch.Tensor) -> torch.Tensor:
    """w(t) = 1 - abar_t, DreamFusion's weighting (sigma_t^2 of the VP process)."""
    return 1.0 - abar


def sds_loss(teacher, images: torch.Tensor, cond: Cond, guidance_scale: float = 100.0, t_min: float = 0.02,
             t_max: float = 0.98, generator: torch.Generator | None = None,
             timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> ScoreOutput:
    """Score Distillation Sampling (DreamFusion, Poole et al., 2022, eq. (3)).

    grad = w(t) (eps_hat(x_t; y, t) - eps), eps_hat the teacher's CFG prediction at
    `guidance_scale` and eps the noise that made x_t, applied through the surrogate
    0.5 * |x - stopgrad(x - grad)|^2 summed per image and averaged over the batch (threestudio's form),
    so the gradient w.r.t. the teacher's input x is exactly `grad` and nothing flows through the teacher.
    """
    x = teacher.encode(images)
    schedule = teacher.schedule
    timesteps, noise = _draw(teacher, x, t_min, t_max, generator, timesteps, noise)
    with torch.no_grad():
        x_t = schedule.add_noise(x.detach(), noise, timesteps)
        eps_hat = teacher.predict_eps(x_t, timesteps, cond, guidance_scale)
        grad = _weight(schedule, timesteps, x) * (eps_hat - noise)
    return _surrogate("SDS", x, grad, timesteps)


def _surrogate(name: str, x: torch.Tensor, grad: torch.Tensor, timesteps: torch.Tensor) -> ScoreOutput:
    """NaN guard, then 0.5 |x - stopgrad(x - grad)|^2 summed per image and averaged over the batch
    (d loss / dx = grad / B)."""
    if not torch.isfinite(grad).all():
        raise NonFiniteGradientError(
            f"{name} gradient is not finite at timesteps {timesteps.tolist()}: "
            "the renders or the teacher produced NaN/Inf")
    target = (x - grad).detach()
    loss = 0.5 * ((x - target) ** 2).sum() / x.shape[0]
    return ScoreOutput(loss=loss, grad_norm=float(grad.flatten(1).norm(dim=1).mean()), timesteps=timesteps,
                       encoded=x.detach())


def _draw(teacher, x: torch.Tensor, t_min: float, t_max: float, generator, timesteps, noise):
    """Timesteps (on x's device) and noise for one step, drawn from `generator` unless given."""
    if timesteps is None:
        timesteps = sample_timesteps(x.shape[0], teacher.schedule.num_train_timesteps, t_min, t_max, generator)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return timesteps.to(x.device), noise.to(x.device, x.dtype)


def _weight(schedule, timesteps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return dreamfusion_weight(schedule.abar(timesteps)).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def nfsd_loss(teacher, images: torch.Tensor, cond: Cond, null_cond: Cond, guidance_scale: float = 7.5,
              t_min: float = 0.02, t_max: float = 0.98, generator: torch.Generator | None = None,
              timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None,
              t_threshold: int = NFSD_T_THRESHOLD) -> ScoreOutput:
    """Noise-Free Score Distillation (Katzir et al., ICLR 2024, arXiv 2310.17590, Sec. 4).

    grad = w(t) (delta_D + s delta_C), w = 1 - abar (the NFSD gradient), with
        delta_C = eps(x_t; y) - eps(x_t; empty)                 (the condition direction),
        delta_D = eps(x_t; empty)                              for t <  t_threshold (200 of 1000),
                = eps(x_t; empty) - eps(x_t; negative)          for t >= t_threshold
    (delta_D as their eq. (6) defines it). Why: the CFG prediction eps(empty) + s delta_C that SDS
    distills mixes an in-domain direction delta_D with a noise direction delta_N; NFSD keeps only
    delta_D + s delta_C, so there is no "- noise" term and the sampled noise enters only through x_t,
    which is what lets a nominal s (7.5) work where SDS needs ~100.

    The three prompts: `cond.cond` is the prompt y, `cond.uncond` the negative prompt
    (`teacher.encode_prompt(prompts, negative=[NFSD_NEGATIVE_PROMPT])`), and `null_cond.cond` the
    empty prompt (`teacher.encode_prompt([""] * B)`), one row per image. `cond.extra` is passed on.
    Two teacher calls: the guided pair (y, empty) at scale s gives eps(empty) + s delta_C; the
    negative prompt is evaluated only when some t >= t_threshold. `t_threshold` is in timesteps of a
    1000-step schedule and is rescaled for other lengths.
    """
    if cond.uncond is None or null_cond.cond is None:
        raise ValueError("nfsd_loss needs the negative prompt in cond.uncond and the empty prompt in null_cond.cond "
                         f"({type(teacher).__name__} gave None): encode them with teacher.encode_prompt")
    x = teacher.encode(images)
    schedule = teacher.schedule
    timesteps, noise = _draw(teacher, x, t_min, t_max, generator, timesteps, noise)
    threshold = t_threshold * schedule.num_train_timesteps / 1000
    with torch.no_grad():
        x_t = schedule.add_noise(x.detach(), noise, timesteps)
        guided = Cond(prompts=cond.prompts, cond=cond.cond, uncond=null_cond.cond, extra=cond.extra)
        direction = teacher.predict_eps(x_t, timesteps, guided, guidance_scale)  # eps(empty) + s delta_C
        late = (timesteps >= threshold).reshape(-1, *([1] * (x.dim() - 1)))
        if late.any():
            negative = Cond(prompts=cond.prompts, cond=cond.uncond, uncond=cond.uncond, extra=cond.extra)
            direction = direction - late.to(x.dtype) * teacher.predict_eps(x_t, timesteps, negative, 1.0)
        grad = _weight(schedule, timesteps, x) * direction
    return _surrogate("NFSD", x, grad, timesteps)


def _lora_eps(teacher, lora_network: LoraNetwork, x_t, timesteps, text, camera, guidance_scale: float):
    """The LoRA network's eps for view-independent `text`, guided over the CAMERA (threestudio's
    `compute_grad_vsd`): eps(text, 0) + s (eps(text, camera) - eps(text, 0)). At s = 1 that is the
    camera branch alone, evaluated once. The text is the same in both branches: the LoRA has no
    unconditional text branch."""
    if guidance_scale == 1.0:
        out = lora_network(x_t, timesteps, text, camera)
    else:
        both = lora_network(torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]), torch.cat([text, text]),
                            torch.cat([camera, torch.zeros_like(camera)]))
        out_camera, out_no_camera = both.chunk(2)
        out = cfg_combine(out_no_camera, out_camera, guidance_scale)
    return teacher.schedule.to_eps(x_t, out, timesteps, lora_network.prediction_type)


def vsd_loss(teacher, lora_network: LoraNetwork, images: torch.Tensor | None, cond: Cond, c2w: torch.Tensor | None,
             guidance_scale: float = 7.5, lora_guidance_scale: float = 1.0, t_min: float = 0.02, t_max: float = 0.98,
             generator: torch.Generator | None = None, timesteps: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, lora_cond: Cond | None = None, weighting: str = "dreamfusion",
             latents: torch.Tensor | None = None) -> ScoreOutput:
    """Variational Score Distillation (ProlificDreamer, Wang et al., 2023, eq. (9)), threestudio's form.

        grad = w(t) (eps_teacher - eps_lora),  w = 1 - abar,
        eps_teacher = eps(x_t; y_neg) + s (eps(x_t; y_view) - eps(x_t; y_neg))       (text CFG)
        eps_lora    = eps_phi(x_t; y, 0) + s_lora (eps_phi(x_t; y, c) - eps_phi(x_t; y, 0))  (camera CFG)

    The teacher is the pretrained score of p(x | y_view): `cond.cond` is the view-dependent prompt
    ("a red cube, front view"), `cond.uncond` its negative, guided at `guidance_scale`. The LoRA
    (make_lora_network) estimates the score of the renders' own distribution q(x | c, y): it sees the
    view-independent prompt y = `lora_cond.cond` ("a red cube"; `lora_cond.uncond` is not used) and
    the camera c = `c2w` (B, 4, 4), and its guidance at `lora_guidance_scale` (default 1: camera
    branch only) runs between the camera and the zero camera, never over text. Both outputs are
    converted to eps by their prediction_type. `lora_cond` defaults to `cond` (the LoRA then sees
    the view-dependent text, which threestudio does not do). Train the LoRA alongside on
    `lora_diffusion_loss` with the same `lora_cond` (pass `encoded=out.encoded` to skip a second
    encode). Same surrogate and NaN guard as sds_loss. ProlificDreamer anneals t_max 0.98 -> 0.5
    over training: pass `annealing.annealed_range(...)`.

    The same function trains DMD's one-step image generators (distill/students/dmd.py; Yin et al.,
    CVPR 2024, "One-step Diffusion with Distribution Matching Distillation", eq. (7)), whose
    gradient is the same difference of a real (teacher) and a fake (LoRA) score, only weighted
    otherwise. An image generator has no camera (`c2w=None`: the zero camera, "no camera") and
    produces model-space samples, passed as `latents` (with their graph) instead of `images`.
    `weighting`: "dreamfusion" (w = 1 - abar, above) or "dmd" (`dmd_weight`).
    """
    network_kind(teacher)  # one-line refusal for the oracle and unsupported networks
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}: allowed are {', '.join(WEIGHTINGS)}")
    x = teacher.encode(images) if latents is None else latents
    schedule = teacher.schedule
    timesteps, noise = _draw(teacher, x, t_min, t_max, generator, timesteps, noise)
    camera = _lora_camera(lora_network, c2w, x)
    lora_text = (cond if lora_cond is None else lora_cond).cond
    with torch.no_grad():
        x_t = schedule.add_noise(x.detach(), noise, timesteps)
        eps_teacher = teacher.predict_eps(x_t, timesteps, cond, guidance_scale)
        eps_lora = _lora_eps(teacher, lora_network, x_t, timesteps, lora_text, camera, lora_guidance_scale)
        if weighting == "dmd":
            weight = dmd_weight(schedule, timesteps, x.detach(), x_t, eps_teacher)
        else:
            weight = _weight(schedule, timesteps, x)
        grad = weight * (eps_teacher - eps_lora)
    return _surrogate("VSD", x, grad, timesteps)


WEIGHTINGS = ("dreamfusion", "dmd")


def dmd_weight(schedule, timesteps: torch.Tensor, x: torch.Tensor, x_t: torch.Tensor,
               eps_teacher: torch.Tensor) -> torch.Tensor:
    """DMD's weighting of (eps_real - eps_fake) (Yin et al., 2024, eq. (8)), per image.

    DMD descends on (mu_fake - mu_real) / mean|mu_real - x|, with mu the x0-predictions of the fake
    and the real score at x_t and the mean over the image's C*H*W values. Since mu = (x_t - sigma eps)
    / alpha, mu_fake - mu_real = (sigma / alpha) (eps_real - eps_fake), so the weight of the eps
    difference is (sigma_t / alpha_t) / mean|mu_real - x|: the normalisation makes the step size
    the same at every t and for every image, whatever the score magnitudes.
    """
    abar = schedule.abar(timesteps).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    mu_real = (x_t - sigma * eps_teacher) / alpha
    scale = (mu_real - x).abs().flatten(1).mean(1).clamp_min(1e-6).reshape(-1, *([1] * (x.dim() - 1)))
    return sigma / alpha / scale


def _lora_camera(lora_network: LoraNetwork, c2w: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The flattened camera the LoRA sees; None (an image generator) is the zero camera, "no camera"."""
    if c2w is None:
        return torch.zeros(x.shape[0], lora_network.camera_dim, device=x.device, dtype=x.dtype)
    return lora_network.flatten_camera(c2w).to(x.device, x.dtype)


def drop_camera(camera: torch.Tensor, prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per image, replace the (flattened) camera by zeros with probability `prob` (CFG-style dropout)."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"camera_drop_prob must be in [0, 1], got {prob}")
    keep = torch.rand(camera.shape[0], generator=generator) >= prob
    return camera * keep.to(camera.device, camera.dtype).reshape(-1, *([1] * (camera.dim() - 1)))


def lora_diffusion_loss(teacher, lora_network: LoraNetwork, images: torch.Tensor | None, cond: Cond, c2w: torch.Tensor | None,
                        generator: torch.Generator | None = None, camera_drop_prob: float = 0.1,
                        timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                        encoded: torch.Tensor | None = None) -> torch.Tensor:
    """The LoRA network's own denoising loss on the detached renders (VSD's inner problem: the
    diffusion objective that fits ProlificDreamer's eps_phi(x_t; y, c) to the renders).

    t uniform over all train timesteps [0, T), target eps / v / x0 per the network's
    prediction_type, MSE averaged over all elements (threestudio's `train_lora`). The text is
    `cond.cond`: pass the VIEW-INDEPENDENT prompt, the `lora_cond` given to vsd_loss. The camera is
    zeroed per image with probability `camera_drop_prob` (drawn from `generator` after t and noise),
    which trains the zero-camera branch that vsd_loss's camera guidance needs (threestudio drops the
    whole batch's camera with probability 0.1; per image is the same rate per sample).
    `encoded` (vsd_loss's `out.encoded`) replaces `images` to skip re-encoding. Gradients reach only
    the LoRA and camera parameters; optimize them with `make_lora_optimizer(lora_network)`.
    `c2w=None` (an image generator: DMD's fake score) trains the zero-camera branch only.
    """
    with torch.no_grad():
        x = (encoded if encoded is not None else teacher.encode(images)).detach()
    schedule = teacher.schedule
    timesteps, noise = _draw(teacher, x, 0.0, 1.0, generator, timesteps, noise)
    camera = drop_camera(_lora_camera(lora_network, c2w, x), camera_drop_prob, generator)
    x_t = schedule.add_noise(x, noise, timesteps)
    if lora_network.prediction_type == "epsilon":
        target = noise
    elif lora_network.prediction_type == "v_prediction":
        target = schedule.velocity(x, noise, timesteps)
    elif lora_network.prediction_type == "sample":
        target = x
    else:
        raise ValueError(f"unknown prediction_type {lora_network.prediction_type!r}: "
                         "allowed are 'epsilon', 'sample', 'v_prediction'")
    pred = lora_network(x_t, timesteps, cond.cond, camera)
    return torch.nn.functional.mse_loss(pred.float(), target.float())
