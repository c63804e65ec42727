"""Adv-KD: adversarial knowledge distillation of a diffusion teacher into a small upsampling
generator (Mekonnen, Dall'Asen & Rota, "Adv-KD: Adversarial Knowledge Distillation for Faster
Diffusion Sampling", arXiv:2405.20675, ICIP 2024; official code github.com/kidist-amde/Adv-KD,
src/prodm/).

The student is not a copy of the teacher's network but a much smaller generator (`AdvKDGenerator`:
236k parameters for the embedded teacher's 3.40M, 1/14) made of 11 submodules. It starts from the
initial noise pooled to 4 x 4 and upsamples step by step to the teacher's resolution; every
submodule emits an image at its own resolution, and the last one is the sample. Submodule k is
supervised by its own Wasserstein critic with gradient penalty (WGAN-GP: Gulrajani et al. 2017,
"Improved training of Wasserstein GANs", eq. 3 and Algorithm 1) against the teacher's noisy image
x_t at the paper's timesteps, downsampled to the submodule's resolution. The whole chain is one
forward pass of one small network: one network evaluation per sample (NFE 1).

- **Timesteps.** t_n = 190 n - 10 n^2 + 80 for n = 0..10 in 1000-step DDPM indices (80, 260, 420,
  560, 680, 780, 860, 920, 960, 980, 980; the formula peaks at n = 9.5, so t_9 = t_10 = 980),
  mapped onto a teacher schedule of T steps as round(t T / 1000) (`adv_kd_timesteps`).
- **Pairing.** Submodule k (k = 0 the lowest resolution) learns x at t_{10 - k}: the chain walks
  the teacher's trajectory from noise to image, as in the official code, where submodule k is
  trained on the (k + 1)-th image a DDPM run of the teacher records, the first ones noisiest, the
  last one the final image. A noisy x_t holds only the low frequencies its noise level leaves
  visible, so low resolution suffices early; the finest submodules meet the cleanest targets.
- **Resolutions.** 4 x 4, then log2(R / 4) of the 11 submodules double the resolution, spread
  evenly (`submodule_resolutions`; for R = 32: 4, 4, 4, 8, 8, 16, 16, 16, 32, 32, 32), the rest
  keep it. Any power-of-two R >= 8 and any channel count (pixels or latents) work.
- **Targets x_t.** The teacher's guided DDIM samples x_0 from x_T (its evaluation sampler, as
  one-step KD; `pairs` of them, made once before training and cached in the run folder as
  `adv_kd_targets.pt`), noised forward with fresh noise at every step: x_t = sqrt(abar_t) x_0 +
  sqrt(1 - abar_t) z, then area-downsampled. Its law is exactly the marginal at t of the forward
  process started from the teacher's samples, which is what the paper's targets (intermediate
  states of the teacher's ancestral DDPM sampler) are draws of. We chose this over recording the
  deterministic DDIM states at t_n, because those would make the last submodule, and so the
  sample, an image still carrying noise (sigma = 0.14 at t = 80 on the cosine schedule).
- **Fakes.** Every submodule's head emits a clean-image estimate x0_k at its resolution (StyleGAN2's
  skip architecture: x0_k = upsample(x0_{k-1}) + toRGB_k(h_k); Karras et al. 2020, Fig. 7), and
  its critic sees it noised in the same way: sqrt(abar_t) x0_k + sqrt(1 - abar_t) pool(z'). The
  official code's student heads emit the noisy images themselves. We add the noise in closed form
  instead, because a conv net fed with 4 x 4 noise cannot make fine i.i.d. noise itself. Two noised
  laws are equal exactly when the clean laws are (Gaussian convolution is injective), so the
  Wasserstein game at t_n still pulls x0_k toward the teacher's samples (the argument of
  Diffusion-GAN, Wang et al. 2023). The last head's x0 is the sample, a clean image.
- **Submodule.** [nearest 2x upsampling], a 3x3 convolution plus the injected noise, GroupNorm,
  FiLM from the text, SiLU, on a residual path; `width` channels (half of them at full resolution,
  where pixels cost most). Noise strengths and image heads start at zero (as StyleGAN's noise):
  the untrained student draws a flat image, not speckle.
- **Noise input.** x_T, the teacher-shaped initial noise the benchmark hands every row, is
  average-pooled to each submodule's resolution and rescaled to unit variance (a mean of f^2
  i.i.d. standard normals times f is standard normal). The 4 x 4 one is the input. The finer ones
  are injected per submodule through a 1 x 1 convolution (StyleGAN's noise inputs), so the student
  is a deterministic function of x_T: equal noise gives equal samples.
- **Text.** The teacher's prompt encoding `cond.cond` (token states are mean-pooled), through a
  small MLP, scales and shifts every submodule's normalized features (FiLM). The critics are
  projection discriminators (Miyato & Koyama 2018): D(x, y) = w . phi(x) + <V y, phi(x)>. As in
  every student, the teacher's classifier-free guidance at `run.guidance` is in the targets, and
  the student is called unguided.
- **Training step** (`loss`). `n_critic` critic updates (Adam, betas (0, 0.9), lr `critic_lr`:
  WGAN-GP's Algorithm 1), each on the sum over submodules of D(fake) - D(real) + `gp_weight` *
  (||grad D(x_hat)|| - 1)^2. The critics are `extra_modules` (critics and their optimizer), so
  checkpoints carry them and a resumed run continues exactly. Then the generator's loss, which
  the shared loop backpropagates and steps, is the sum over submodules of -E[D_k(fake_k)], plus
  `kd_weight` times one-step KD's regression of the last image on the cached teacher sample of
  the same x_T (Luhman & Luhman 2021). The paper has no such term: default 0, an option.

Deliberate differences from the official code: all submodules train jointly on the summed losses,
where the official code trains them in 11 successive stages, the k-th one on submodules 0..k. Our
critic loss is the Wasserstein one with gradient penalty, where the official code uses a logistic
loss with gradient penalty and weight clipping. The critics see the prompt, not the input noise.
The generator's optimizer is the shared loop's AdamW (lr schedule with warm-up
and cosine decay) with the official code's betas (0.5, 0.999) (`optimizer_betas`). Under `accelerate` each process
keeps its own critics; the generator's gradients are all-reduced as usual.

Options: pairs (cached teacher samples, 512), teacher_steps (the teacher's DDIM steps, 50),
pair_batch (teacher batch, 64), n_critic (critic updates per step, 2), gp_weight (lambda, 10),
critic_lr (1e-4), kd_weight (0), width (generator channels, 48), critic_width (32).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ...diffusion.protocol import Cond
from ...diffusion.solvers import initial_noise
from .common import StudentConfig, StudentModel, StudentSample
from .kd import teacher_pairs
from .sfd import parse_options

NAME = "adv-kd"
SUBMODULES = 11  # n = 0..10
START_RESOLUTION = 4
TARGETS_FILE = "adv_kd_targets.pt"
DEFAULTS = {"pairs": 512, "teacher_steps": 50, "pair_batch": 64, "n_critic": 2, "gp_weight": 10.0,
            "critic_lr": 1e-4, "kd_weight": 0.0, "width": 48, "critic_width": 32}
INTEGER_LIMITS = {"pairs": (1, 1_000_000), "teacher_steps": (1, 1000), "pair_batch": (1, 4096), "n_critic": (1, 20),
                  "width": (8, 512), "critic_width": (8, 512)}


# --- the paper's schedule ----------------------------------------------------------------------

def adv_kd_timesteps(num_train_timesteps: int = 1000) -> list[int]:
    """The paper's t_n = 190 n - 10 n^2 + 80, n = 0..10, in 1000-step DDPM indices, mapped onto a
    schedule of `num_train_timesteps` steps as round(t_n T / 1000), clamped to [0, T - 1]."""
    T = int(num_train_timesteps)
    if T < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    table = [190 * n - 10 * n * n + 80 for n in range(SUBMODULES)]
    return [min(T - 1, max(0, math.floor(t * T / 1000 + 0.5))) for t in table]


def submodule_timesteps(num_train_timesteps: int = 1000) -> list[int]:
    """The target timestep of each submodule, lowest resolution first: submodule k learns x at
    t_{10 - k} (noisiest first, the last one the cleanest)."""
    return adv_kd_timesteps(num_train_timesteps)[::-1]


def submodule_resolutions(resolution: int) -> list[int]:
    """Each submodule's resolution: 4 x 4 at first, doubling at log2(R / 4) submodules spread evenly
    over the chain (submodule round((j + 1) (N - 1) / (L + 1)) doubles, j = 0..L-1), so that the
    last few run at the teacher's resolution R (a power of two >= 8)."""
    R = int(resolution)
    if R < 2 * START_RESOLUTION or R & (R - 1):
        raise ValueError(f"Adv-KD needs a teacher resolution that is a power of two >= 8, got {resolution}")
    levels = int(math.log2(R // START_RESOLUTION))
    if levels > SUBMODULES - 1:
        raise ValueError(f"Adv-KD's {SUBMODULES} submodules can upsample 4 px to at most "
                         f"{START_RESOLUTION << (SUBMODULES - 1)} px, not {R}")
    doubling = {math.floor((j + 1) * (SUBMODULES - 1) / (levels + 1) + 0.5) for j in range(levels)}
    out, r = [], START_RESOLUTION
    for k in range(SUBMODULES):
        r *= 2 if k in doubling else 1
        out.append(r)
    return out


def noise_at(x_T: torch.Tensor, resolution: int) -> torch.Tensor:
    """x_T (B, C, R, R) average-pooled to `resolution` and rescaled to unit variance: the mean of
    f x f i.i.d. standard normals has variance 1 / f^2, so f times it is standard normal again."""
    f = x_T.shape[-1] // resolution
    return F.avg_pool2d(x_T, f) * f if f > 1 else x_T


def text_features(cond: Cond) -> torch.Tensor:
    """The prompt encoding the student and critics read: `cond.cond` as (B, D), token states
    (B, L, D) (diffusers teachers) mean-pooled over the tokens."""
    text = cond.cond
    return (text.mean(1) if text.dim() == 3 else text).float()


# --- the student -----------------------------------------------------------------------------

class Pointwise(nn.Module):
    """A 1x1 convolution computed as a batched matrix product (as `teachers.unet.conv1x1`): oneDNN's
    1x1 convolution has a large fixed cost per backward call on CPU (several ms even at 4 x 4, which
    made the 33 of them half of a training step) and rounds differently at one thread and at several."""

    def __init__(self, c_in: int, c_out: int, bias: bool = True):
        super().__init__()
        conv = nn.Conv2d(c_in, c_out, 1, bias=bias)  # the Conv2d initialization
        self.weight = nn.Parameter(conv.weight.detach().flatten(1).clone())
        self.bias = nn.Parameter(conv.bias.detach().clone()) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        out = torch.matmul(self.weight, x.flatten(2))
        if self.bias is not None:
            out = out + self.bias[:, None]
        return out.view(b, -1, h, w)


class Submodule(nn.Module):
    """One stage: [nearest 2x upsampling] -> conv 3x3 + noise injection -> GroupNorm -> FiLM(text)
    -> SiLU, with a residual path; and its toRGB head (1x1 conv) giving the image residual."""

    def __init__(self, c_in: int, c_out: int, channels: int, emb_dim: int, upsample: bool):
        super().__init__()
        self.upsample = upsample
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.noise = Pointwise(channels, c_out, bias=False)
        self.norm = nn.GroupNorm(8 if c_out % 8 == 0 else 1, c_out, affine=False)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.skip = nn.Identity() if c_in == c_out else Pointwise(c_in, c_out, bias=False)
        self.head = Pointwise(c_out, channels)
        # Zero noise strengths (as StyleGAN's) and zero image residuals at initialization: the untrained
        # student draws a flat image rather than per-pixel speckle; both learn from there.
        nn.init.zeros_(self.noise.weight)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, h: torch.Tensor, noise: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.upsample:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        y = self.norm(self.conv(h) + self.noise(noise))
        h = self.skip(h) + F.silu(y * (1 + scale) + shift)
        return h, self.head(h)


class AdvKDGenerator(nn.Module):
    """The Adv-KD student: x_T (B, C, R, R) and text (B, text_dim) -> the 11 submodules' images,
    lowest resolution first, in the teacher's model space; the last one, (B, C, R, R), is the sample.

    Not the teacher network's call signature: `AdvKD.sample` calls it directly."""

    def __init__(self, resolution: int, channels: int, text_dim: int, width: int = 48, emb_dim: int = 32):
        super().__init__()
        self.resolution, self.channels = int(resolution), int(channels)
        self.resolutions = submodule_resolutions(resolution)
        self.text_mlp = nn.Sequential(nn.Linear(text_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        # Half the channels at full resolution, where a convolution costs 4x the pixels of the one below.
        widths = [width if r < self.resolution else max(8, width // 2) for r in self.resolutions]
        previous = [START_RESOLUTION] + self.resolutions[:-1]
        self.blocks = nn.ModuleList(Submodule(c_in, c, channels, emb_dim, r > p)
                                    for c_in, c, r, p in zip([width] + widths[:-1], widths, self.resolutions, previous))

    def forward(self, x_T: torch.Tensor, text: torch.Tensor) -> list[torch.Tensor]:
        if x_T.shape[-1] != self.resolution or x_T.shape[1] != self.channels:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected (B, {self.channels}, {self.resolution}, "
                             f"{self.resolution})")
        emb = self.text_mlp(text.to(x_T.dtype))
        noise = {r: noise_at(x_T, r) for r in dict.fromkeys([START_RESOLUTION, *self.resolutions])}
        h = self.conv_in(noise[START_RESOLUTION])
        images, image = [], None
        for block, r in zip(self.blocks, self.resolutions):
            h, residual = block(h, noise[r], emb)
            if image is not None and image.shape[-1] != r:
                image = F.interpolate(image, scale_factor=2, mode="bilinear", align_corners=False)
            image = residual if image is None else image + residual
            images.append(image)
        return images


# --- the critics -------------------------------------------------------------------------------

class Critic(nn.Module):
    """A WGAN critic at one resolution, a projection discriminator on the prompt (Miyato & Koyama
    2018): phi = conv net down to 4 x 4 and summed over its pixels, D(x, y) = w . phi + <V y, phi>.
    No normalization layers: the gradient penalty is per sample (Gulrajani et al. 2017, Sec. 4)."""

    def __init__(self, channels: int, resolution: int, text_dim: int, width: int = 32):
        super().__init__()
        # stride-2 3x3 convolutions (the first one straight on the image: cheap at full resolution)
        # down to 4 x 4, then one more 3x3 convolution there
        layers, c_in, r = [], channels, resolution
        while r > START_RESOLUTION:
            layers += [nn.Conv2d(c_in, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c_in, r = width, r // 2
        layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(width, 1)
        self.embed = nn.Linear(text_dim, width, bias=False)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        phi = self.features(x).sum(dim=(2, 3))
        return self.out(phi).squeeze(1) + (self.embed(text) * phi).sum(1)


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None = None,
                     alpha: torch.Tensor | None = None) -> torch.Tensor:
    """WGAN-GP's penalty (Gulrajani et al. 2017, eq. 3): E[(||grad_x D(x_hat)||_2 - 1)^2] at
    x_hat = alpha real + (1 - alpha) fake, alpha ~ U[0, 1] per sample (drawn from `generator`
    unless given, shape (B, 1, ..., 1)). `critic` is a function of x alone; differentiable in its
    parameters (create_graph), so the penalty trains the critic."""
    if alpha is None:
        alpha = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), generator=generator).to(real)
    x_hat = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    norm = (grad.flatten(1).pow(2).sum(1) + 1e-12).sqrt()  # + 1e-12: a finite derivative at grad = 0
    return (norm - 1).pow(2).mean()


def critic_loss(critic: Critic, real: torch.Tensor, fake: torch.Tensor, text: torch.Tensor, gp_weight: float,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[D(fake)] - E[D(real)] + gp_weight * penalty, the Wasserstein-1 estimate E[D(real)] - E[D(fake)])."""
    gap = critic(real, text).mean() - critic(fake.detach(), text).mean()
    penalty = gradient_penalty(lambda x: critic(x, text), real, fake, generator)
    return -gap + gp_weight * penalty, gap.detach()


# --- the method --------------------------------------------------------------------------------

def _check_options(given: dict) -> dict:
    options = parse_options(NAME, given, DEFAULTS)
    for key, value in options.items():
        is_int = isinstance(value, int) and not isinstance(value, bool)
        is_real = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        if key in INTEGER_LIMITS:
            lo, hi = INTEGER_LIMITS[key]
            if not (is_int and lo <= value <= hi):
                raise ValueError(f"{NAME} option {key}={value!r}: must be an integer from {lo} to {hi}")
        elif key == "critic_lr" and not (is_real and value > 0):
            raise ValueError(f"{NAME} option {key}={value!r}: must be a positive number")
        elif key in ("gp_weight", "kd_weight") and not (is_real and value >= 0):
            raise ValueError(f"{NAME} option {key}={value!r}: must be a number >= 0")
    return options


class AdversarialKD:
    name = NAME
    optimizer_betas = (0.5, 0.999)  # the generator's Adam betas in the official code (GAN practice)

    @staticmethod
    def supported_nfe(nfe: int) -> str | None:
        return None if nfe == 1 else ("Adv-KD makes 1-NFE students only (its submodule chain is one forward pass of "
                                      "one small network; use --nfe 1)")

    def __init__(self, config: StudentConfig):
        self.options = _check_options(config.options)
        self.config = config

    def student_network(self, teacher) -> AdvKDGenerator:
        """The small generator for this teacher's resolution, channels and prompt encoding."""
        text_dim = text_features(teacher.encode_prompt([""])).shape[-1]
        network = AdvKDGenerator(teacher.resolution, teacher.channels, text_dim, width=self.options["width"])
        return network.to(getattr(teacher, "device", "cpu"))

    # -- training ---------------------------------------------------------------------------------
    def attach(self, run) -> None:
        self.run = run
        teacher = run.teacher
        network: AdvKDGenerator = run.student.network
        self.timesteps = submodule_timesteps(teacher.schedule.num_train_timesteps)
        self.resolutions = network.resolutions
        abar = teacher.schedule.alphas_cumprod.double()
        self.abar = [float(abar[t]) for t in self.timesteps]
        o = self.options
        targets = teacher_pairs(run, o["pairs"], o["teacher_steps"], o["pair_batch"], TARGETS_FILE)
        self.x_T, self.x_0, self.index = targets["x_T"].float(), targets["x_0"].float(), targets["index"]
        # the clean targets area-downsampled to each submodule's resolution (noised at every step)
        self.real = {r: F.avg_pool2d(self.x_0, self.x_0.shape[-1] // r) for r in dict.fromkeys(self.resolutions)}
        text_dim = network.text_mlp[0].in_features
        with torch.random.fork_rng(devices=[]):  # the critics' initialization is a function of the seed alone
            torch.manual_seed(run.config.seed + 1)
            self.critics = nn.ModuleList(Critic(teacher.channels, r, text_dim, self.options["critic_width"])
                                         for r in self.resolutions).to(self.x_0.device)
        self.critic_optimizer = torch.optim.Adam(self.critics.parameters(), lr=self.options["critic_lr"],
                                                 betas=(0.0, 0.9))
        self.extra_modules = {"adv_kd_critics": self.critics, "adv_kd_critic_optimizer": self.critic_optimizer}
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        student, critics, big = count(network), count(self.critics), count(teacher.network)
        run.log(f"{NAME}: student {student:,} parameters, teacher {big:,} ({big / student:.1f}x), "
                f"critics {critics:,} (training only); submodules at {self.resolutions} px learn t = {self.timesteps}")

    def _noised(self, x0: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        """x0 at submodule k's resolution r, noised to its timestep as the teacher's x_t downsampled
        from R: sqrt(abar) x0 + sqrt(1 - abar) pool(z), pool(z) ~ N(0, 1 / f^2), f = R / r."""
        f = self.x_0.shape[-1] // x0.shape[-1]
        z = torch.randn(x0.shape, generator=generator).to(x0) / f
        return math.sqrt(self.abar[k]) * x0 + math.sqrt(1 - self.abar[k]) * z

    def _batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices of cached teacher samples, their prompts' text features, fresh x_T for the fakes)."""
        run = self.run
        b = run.config.batch_size
        pick = torch.randint(self.x_0.shape[0], (b,), generator=generator)
        cond = run.teacher.encode_prompt([run.prompts[j] for j in self.index[pick].tolist()])
        return pick, text_features(cond).to(self.x_0.device), initial_noise(run.teacher, b, generator)

    def loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        run, o = self.run, self.options
        self.critics.requires_grad_(True)
        for _ in range(o["n_critic"]):
            pick, text, x_T = self._batch(generator)
            with torch.no_grad():
                fakes = run.student.network(x_T, text)
            total, gaps = 0.0, []
            for k, (critic, fake, r) in enumerate(zip(self.critics, fakes, self.resolutions)):
                real = self._noised(self.real[r][pick], k, generator)
                fake = self._noised(fake, k, generator)
                value, gap = critic_loss(critic, real, fake, text, o["gp_weight"], generator)
                total, gaps = total + value, gaps + [float(gap)]
            self.critic_optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.critic_optimizer.step()
        self.critics.requires_grad_(False)  # the generator's backward (in the loop) leaves them alone
        if run.config.log_every and step % run.config.log_every == 0:
            run.log(f"{NAME} step {step}: critics' W1 estimates " + " ".join(f"{g:.3f}" for g in gaps))
        pick, text, x_T = self._batch(generator)
        # Through the student view's network: under accelerate that is the DDP wrapper, which all-reduces gradients.
        network = run.student.running_network
        fakes = network(x_T, text)
        loss = sum(-critic(self._noised(fake, k, generator), text).mean()
                   for k, (critic, fake) in enumerate(zip(self.critics, fakes)))
        if o["kd_weight"] > 0:
            last = network(self.x_T[pick], text)[-1]
            loss = loss + o["kd_weight"] * (last - self.x_0[pick]).pow(2).mean()
        return loss

    # -- sampling ---------------------------------------------------------------------------------
    def sample(self, student: StudentModel, cond: Cond, nfe: int, generator: torch.Generator | None,
               x_T: torch.Tensor | None = None) -> StudentSample:
        why = self.supported_nfe(nfe)
        if why:
            raise ValueError(f"this {NAME} student cannot sample with {nfe} NFE: {why}")
        x = initial_noise(student.teacher, len(cond.prompts), generator, x_T)
        with torch.no_grad():
            x0 = student.network(x, text_features(cond).to(x.device))[-1]
        return StudentSample(student.teacher.decode(x0), x0, 1)
