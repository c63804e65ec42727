"""Distribution Matching Distillation (Yin et al., CVPR 2024, "One-step Diffusion with Distribution
Matching Distillation"; the same gradient as Diff-Instruct, Luo et al., NeurIPS 2023), with DMD2's
two-time-scale update as an option (Yin et al., NeurIPS 2024, "Improved Distribution Matching
Distillation for Fast Image Synthesis", Sec. 4.1).

The generator G is the teacher's network, copied and trained: a sample is one DDIM step of it from
pure noise x_T at t = T - 1 to a clean image (its x0 prediction there, as in one-step KD). DMD
minimises KL(p_fake || p_real) between the generator's distribution and the teacher's, noised at
every t; its gradient w.r.t. a sample x = G(x_T) is the difference of two scores at x_t, the
teacher's (real) and that of a "fake" network trained alongside on the generator's own samples
(eq. (7)). That is VSD's gradient: it is computed by `distill.score.vsd_loss`, the very function
that trains a NeRF under `sds3d generate --loss vsd`, with DMD's weighting (`score.dmd_weight`,
eq. (8)), no camera, and the fake score trained by `score.lora_diffusion_loss`, the LoRA's
denoising loss. The fake score is a LoRA of the teacher's network (`distill.lora`), so at step 0
it equals the unguided teacher; the real score is the teacher guided at the distilled scale.

Per generator step (`loss`):
  1. `fake_steps` updates of the fake score on fresh, detached generator samples (DMD: 1; DMD2's
     two-time-scale update: 5, which keeps the fake score tracking a moving generator);
  2. the generator's loss: DMD's distribution-matching term (vsd_loss's surrogate averaged over the
     sample's values, DMD's `0.5 * mse(x, x - grad)`), plus `regression` times the mean squared
     error between G(x_T) and the teacher's DDIM image of the same x_T (DMD's regression loss,
     eq. (9), with MSE in model space in place of LPIPS, which has no network for 32 px world images;
     the pairs are made once and cached, as for one-step KD). `regression=0` is pure DMD /
     Diff-Instruct, the DMD2 recipe.

NFE 2 and 4 follow DMD2's multi-step generator (Sec. 4.4): the student denoises at a fixed grid of
timesteps (`student_timesteps`), each output noised again with fresh noise to the next grid point;
training feeds the generator its own (no-gradient) samples at a random grid point ("backward
simulation"), so what it learns at step k is what it is given at step k when sampling.

Options: regression (0.25), pairs (512), teacher_steps (50), pair_batch (64), fake_steps (1),
fake_lr (1e-3), lora_rank (16), t_min (0.02), t_max (0.98).
"""

from __future__ import annotations

import torch

from ...diffusion.solvers import initial_noise
from .. import score
from ..lora import make_lora_network, make_lora_optimizer
from .common import StudentConfig, StudentModel, StudentSample, student_timesteps
from .kd import student_x0, teacher_pairs

DEFAULTS = {"regression": 0.25, "pairs": 512, "teacher_steps": 50, "pair_batch": 64, "fake_steps": 1,
            "fake_lr": 1e-3, "lora_rank": 16, "t_min": 0.02, "t_max": 0.98}
INTEGER_OPTIONS = ("pairs", "teacher_steps", "pair_batch", "fake_steps", "lora_rank")
SUPPORTED_NFE = (1, 2, 4)


def check_options(given: dict) -> dict:
    """DEFAULTS updated with `given`, each value checked; one-line ValueError naming the bad one."""
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown dmd option(s) {', '.join(unknown)}: allowed are {', '.join(DEFAULTS)}")
    options = {**DEFAULTS, **given}
    for key in INTEGER_OPTIONS:
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"dmd option {key}={value!r}: must be a positive integer")
    for key in ("regression", "fake_lr", "t_min", "t_max"):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"dmd option {key}={value!r}: must be a number")
        options[key] = float(value)
    if options["regression"] < 0:
        raise ValueError(f"dmd option regression={options['regression']!r}: must be >= 0 (0: no regression loss)")
    if options["fake_lr"] <= 0:
        raise ValueError(f"dmd option fake_lr={options['fake_lr']!r}: must be > 0")
    if not 0 <= options["t_min"] < options["t_max"] <= 1:
        raise ValueError(f"dmd options t_min={options['t_min']!r}, t_max={options['t_max']!r}: "
                         "need 0 <= t_min < t_max <= 1 (fractions of the schedule)")
    return options


def multistep_sample(student: StudentModel, cond, grid: list[int], x_T: torch.Tensor, steps: int,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, int]:
    """DMD2's multi-step generator run for `steps` grid points from x_T: denoise at grid[k], noise the
    output to grid[k + 1] with fresh noise, ... Returns (x at grid[steps], or the last clean image
    when steps == len(grid) - 1, and the number of evaluations)."""
    x = x_T
    for k in range(steps):
        x0 = student_x0(student, x, grid[k], cond)
        if k + 1 == len(grid) - 1:
            return x0, k + 1
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        x = student.schedule.add_noise(x0, noise, torch.full((x0.shape[0],), grid[k + 1], dtype=torch.long))
    return x, steps


class DMD:
    name = "dmd"

    @staticmethod
    def supported_nfe(nfe: int) -> str | None:
        return None if nfe in SUPPORTED_NFE else "DMD makes 1-, 2- or 4-step students (--nfe 1, 2 or 4)"

    def __init__(self, config: StudentConfig):
        self.config = config
        self.options = check_options(dict(config.options))

    def grid(self, schedule, nfe: int) -> list[int]:
        """nfe + 1 timesteps, T - 1 first; the last is where sampling stops (the clean image)."""
        return student_timesteps(schedule, nfe)

    # -- training ---------------------------------------------------------------------------------
    def attach(self, run) -> None:
        o = self.options
        self.run = run
        self.pairs = (teacher_pairs(run, o["pairs"], o["teacher_steps"], o["pair_batch"], "dmd_pairs.pt")
                      if o["regression"] > 0 else None)
        torch.manual_seed(run.config.seed + 1)
        self.fake = make_lora_network(run.teacher, rank=o["lora_rank"])
        self.fake_optimizer = make_lora_optimizer(self.fake, lr=o["fake_lr"])
        self.extra_modules = {"fake_score": self.fake, "fake_optimizer": self.fake_optimizer}

    def _generator_input(self, student: StudentModel, cond, x_T: torch.Tensor, generator: torch.Generator):
        """(x at a grid point, its timestep): x_T at T - 1 for one-step students; for several steps a grid
        point drawn uniformly, reached by running the student itself without gradients (DMD2)."""
        grid = self.grid(student.schedule, self.config.nfe)
        if self.config.nfe == 1:
            return x_T, grid[0]
        k = int(torch.randint(self.config.nfe, (1,), generator=generator))
        with torch.no_grad():
            x, _ = multistep_sample(student, cond, grid, x_T, k, generator)
        return x, grid[k]

    def _fake_score_step(self, generator: torch.Generator) -> float:
        """One update of the fake score on detached generator samples (its LoRA denoising loss)."""
        run = self.run
        cond, x_T = run.batch(generator)
        with torch.no_grad():
            x, t = self._generator_input(run.student, cond, x_T, generator)
            x0 = student_x0(run.student, x, t, cond)
        loss = score.lora_diffusion_loss(run.teacher, self.fake, None, cond, None, generator=generator,
                                         camera_drop_prob=0.0, encoded=x0)
        self.fake_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.fake_optimizer.step()
        return float(loss.detach())

    def loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        run, o = self.run, self.options
        for _ in range(o["fake_steps"]):
            self.fake_loss = self._fake_score_step(generator)
        cond, x_T = run.batch(generator)
        x, t = self._generator_input(run.student, cond, x_T, generator)
        x0 = student_x0(run.student, x, t, cond)
        out = score.vsd_loss(run.teacher, self.fake, None, cond, None, guidance_scale=run.guidance,
                             lora_guidance_scale=1.0, t_min=o["t_min"], t_max=o["t_max"], generator=generator,
                             weighting="dmd", latents=x0)
        loss = out.loss / x0[0].numel()  # DMD's 0.5 * mse(x, x - grad): averaged over the sample's values
        if self.pairs is not None:
            pick = torch.randint(self.pairs["x_T"].shape[0], (run.config.batch_size,), generator=generator)
            pair_cond = run.teacher.encode_prompt([run.prompts[j] for j in self.pairs["index"][pick].tolist()])
            start = run.student.schedule.num_train_timesteps - 1  # the pairs' x_T are pure noise
            regression = (student_x0(run.student, self.pairs["x_T"][pick], start, pair_cond)
                          - self.pairs["x_0"][pick]).pow(2).mean()
            loss = loss + o["regression"] * regression
        return loss

    # -- sampling ---------------------------------------------------------------------------------
    def sample(self, student: StudentModel, cond, nfe: int, generator: torch.Generator | None,
               x_T: torch.Tensor | None = None) -> StudentSample:
        x = initial_noise(student.teacher, len(cond.prompts), generator, x_T)
        grid = self.grid(student.schedule, nfe)
        with torch.no_grad():
            x0, used = multistep_sample(student, cond, grid, x, nfe, generator)
        return StudentSample(student.teacher.decode(x0), x0, used)

