"""Progressive distillation (Salimans & Ho 2022, "Progressive distillation for fast sampling of
diffusion models", ICLR 2022, arXiv:2202.00512, Algorithm 2), data-free, with a guided teacher
distilled at one fixed CFG scale (Meng et al. 2023, the fixed-scale variant).

**Stages.** The student halves the teacher's number of deterministic DDIM steps, stage after stage:
start_steps -> start_steps / 2 -> ... -> nfe. In stage k the teacher takes N = start_steps / 2^k
steps on a grid g_0 > g_1 > ... > g_N = clean; the student takes N / 2 steps on every other point of
the same grid (g_0, g_2, ...). Stage 0's teacher is the real teacher, guided (`run.teacher_eps`);
stage k > 0's teacher is a frozen copy of the student as it was when stage k - 1 ended (their
Algorithm 2: "teacher <- student" before every halving). The grid is DDIM's "trailing" grid of
start_steps steps (it starts at T - 1, pure noise on the zero-terminal-SNR schedule, Lin et al.
2023) followed by the step to a clean image (abar = 1); for T = 1000 and powers of two, every
other point of the trailing N-grid is exactly the trailing N/2-grid, so the students' grids are
the usual DDIM grids.

**Target** (their Algorithm 2 and the official code, google-research/diffusion_distillation,
dpm.py `training_losses`). For a student step t -> t'' that covers the teacher steps t -> t' -> t'',
the teacher's two DDIM steps give x_{t''}; the target is the x0-prediction that makes ONE student
DDIM step from (x_t, t) land exactly on it:
    x0_target = (x_{t''} - (sigma_{t''} / sigma_t) x_t) / (alpha_{t''} - (sigma_{t''} / sigma_t) alpha_t)
with VP alpha = sqrt(abar), sigma = sqrt(1 - abar) (`progressive_target`). When t'' is the clean
end (alpha = 1, sigma = 0) this is x_{t''} itself, the teacher's x0 after its second step, as the
official code's `where(i == 0, x_pred, x_target)`. Like the official code, the teacher's steps do
not clip x0.

**Loss.** Their "SNR+1" weighting (Sec. 4; `mean_loss_weight_type='v_mse'` in the official code):
(1 + SNR_t) ||x0_student - x0_target||^2 = (1 / sigma_t^2) ||x0_student - x0_target||^2, which is
exactly the MSE of the v-parametrization, ||v_student - v_target||^2 (x0 = alpha x_t - sigma v, so
x0 errors are sigma times v errors), the parametrization of the embedded teacher. It is computed
through the x0 prediction in float64 so that it holds for any teacher parametrization and stays
exact at t = T - 1, where alpha ~ 5e-5 and a float32 eps -> x0 conversion would lose 3 digits.

**Data-free training points.** The paper noises real data; a text-to-image teacher has none here,
so x_t is a noised sample of the teacher itself: `samples` teacher images (guided DDIM with
`sample_steps` steps on the training prompts, the embedded teacher's evaluation sampler) are made
once and cached in the run folder (`teacher_samples.pt`), and each training step noises a random
one at a random student grid point with fresh noise. That is the cheapest choice on a CPU: the
cache costs samples x sample_steps guided calls once (128 x 16 by default), and a training step
costs 2 teacher calls + 1 student call,
whereas running the teacher's own trajectory from x_T to a random grid point would cost up to N
more teacher calls per step. Noised samples of
the model are draws from its own marginals q(x_t), which is what the paper trains on.

**Why start_steps = 16 by default.** The loop's steps are split evenly over the log2(start/nfe)
stages (or `steps_per_stage` each), and on a CPU a run has a few hundred to a few thousand steps:
starting at 16 instead of 32 gives every stage of a 4-NFE student 1.5x the steps (2 stages, not
3) and one halving less for errors to compound through, while the embedded teacher's DDIM-16
samples are already close to its DDIM-100 ones (a 32 px model of simple shapes needs few steps).
The paper starts from teachers with thousands of steps.

The learning rate follows the shared loop's single warm-up + cosine schedule over the whole run
(the paper restarts a linearly decaying rate in every stage). An EMA copy (`ema_decay`) is only
used for sampling; the next stage's teacher is the trained student itself, as in Algorithm 2.

Options: start_steps (a power of two >= 2 nfe, default 16), steps_per_stage (0: the run's steps
split evenly), samples (cached teacher images, 128), sample_steps (the teacher's DDIM steps for
them, 16), sample_batch (32).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time

import torch

from ...diffusion.schedule import NoiseSchedule
from ...diffusion.solvers import ddim_sample, ddim_step, ddim_timesteps
from ...io import atomic_save_torch
from .common import StudentConfig, StudentModel, StudentSample, ddim_student_sample

DEFAULTS = {"start_steps": 16, "steps_per_stage": 0, "samples": 128, "sample_steps": 16, "sample_batch": 32}
SAMPLES_FILE = "teacher_samples.pt"


def _is_power_of_two(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


def check_int_options(method: str, config: StudentConfig, defaults: dict, minimum: dict | None = None) -> dict:
    """The method's options over its defaults: unknown names and non-integers give one ValueError."""
    unknown = set(config.options) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {method} option(s) {', '.join(sorted(unknown))}: allowed are {', '.join(defaults)}")
    options = {**defaults, **config.options}
    for key, value in options.items():
        if not isinstance(defaults[key], int):
            continue
        low = (minimum or {}).get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{method} option {key}={value!r}: must be an integer >= {low}")
    return options


# --- schedule pieces -----------------------------------------------------------------------------

def alpha_sigma(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VP alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t) per sample, shaped to broadcast against
    `like` and in its dtype; t = -1 is the clean end (alpha 1, sigma 0)."""
    t = torch.as_tensor(t).reshape(-1).expand(like.shape[0]).long()
    abar = schedule.alphas_cumprod.to(like.device, torch.float64)[t.clamp(min=0).to(like.device)]
    abar = torch.where(t.to(like.device) < 0, torch.ones_like(abar), abar)
    shape = (-1,) + (1,) * (like.dim() - 1)
    return abar.sqrt().to(like.dtype).reshape(shape), (1 - abar).sqrt().to(like.dtype).reshape(shape)


def progressive_target(schedule: NoiseSchedule, x_t: torch.Tensor, x_t2: torch.Tensor, t, t2) -> torch.Tensor:
    """The x0 whose single DDIM step from (x_t, t) lands exactly on x_t2 at t2 (Salimans & Ho 2022,
    Algorithm 2): x0 = (x_t2 - (sigma_t2 / sigma_t) x_t) / (alpha_t2 - (sigma_t2 / sigma_t) alpha_t).
    t2 = -1 (clean) gives x_t2 itself. Per-sample t and t2; compute in float64."""
    a, s = alpha_sigma(schedule, t, x_t)
    a2, s2 = alpha_sigma(schedule, t2, x_t)
    ratio = s2 / s
    return (x_t2 - ratio * x_t) / (a2 - ratio * a)


def base_grid(schedule: NoiseSchedule, start_steps: int) -> list[int]:
    """The stage-0 teacher's DDIM grid: `start_steps` trailing timesteps from T - 1, then -1 (clean)."""
    return ddim_timesteps(schedule.num_train_timesteps, start_steps, "trailing") + [-1]


# --- the teacher's images, noised: the data-free training points ---------------------------------

def teacher_samples(run, n: int, steps: int, batch: int, seed_offset: int = 555) -> dict:
    """`n` guided teacher images on the run's training prompts, made once (fixed generator) and cached
    in the run folder as teacher_samples.pt (read back with weights_only=True): {"x0", "index"}
    (index: the prompt of each image). The embedded teacher samples with its evaluation DDIM
    (trailing grid, x0 clipped), any other teacher with plain DDIM."""
    path = run.out_dir / SAMPLES_FILE
    key = {"n": n, "steps": steps, "guidance": float(run.guidance), "seed": run.config.seed + seed_offset,
           "prompts": hashlib.sha256("\n".join(run.prompts).encode()).hexdigest()}
    if path.exists():
        cached = torch.load(path, weights_only=True)
        if cached.get("key") == key:
            return cached
    from ...teachers.embedded import EMBEDDED_DDIM, EmbeddedTeacher

    options = dict(EMBEDDED_DDIM) if isinstance(run.teacher, EmbeddedTeacher) else {}
    gen = torch.Generator().manual_seed(key["seed"])
    index = torch.randint(len(run.prompts), (n,), generator=gen)
    outs, start = [], time.time()
    for i in range(0, n, batch):
        chunk = index[i:i + batch].tolist()
        cond = run.teacher.encode_prompt([run.prompts[j] for j in chunk])
        outs.append(ddim_sample(run.teacher, cond, steps, run.guidance, gen, **options).x.cpu())
        run.log(f"teacher samples {min(n, i + batch)}/{n} ({time.time() - start:.0f} s)")
    data = {"x0": torch.cat(outs), "index": index, "key": key}
    accelerator = getattr(run, "accelerator", None)
    if accelerator is None or accelerator.is_main_process:  # every replica makes the same images; one writes them
        run.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_save_torch(data, path)
    return data


# --- the method ------------------------------------------------------------------------------------

class ProgressiveDistillation:
    name = "progressive"

    @staticmethod
    def supported_nfe(nfe: int) -> str | None:
        if _is_power_of_two(nfe) and nfe <= 256:
            return None
        return "progressive distillation halves the step count, so NFE must be a power of two (1, 2, 4, ..., 256)"

    def __init__(self, config: StudentConfig):
        self.config = config
        self.options = check_int_options("progressive", config, DEFAULTS, {"steps_per_stage": 0})
        start = self.options["start_steps"]
        if not _is_power_of_two(start) or start < 2 * config.nfe or start > 512:
            raise ValueError(f"progressive option start_steps={start!r}: must be a power of two from 2 x nfe = "
                             f"{2 * config.nfe} to 512")
        self.stages = int(math.log2(start // config.nfe))
        per = self.options["steps_per_stage"]
        if per == 0:
            if config.steps < self.stages:
                raise ValueError(f"steps={config.steps}: progressive distillation from {start} to {config.nfe} steps has "
                                 f"{self.stages} stages and needs at least that many steps")
            per = config.steps // self.stages
        elif per * (self.stages - 1) >= config.steps:
            raise ValueError(f"progressive option steps_per_stage={per}: {self.stages} stages of {per} steps never reach "
                             f"the last stage within steps={config.steps} (use 0 to split the steps evenly)")
        self.steps_per_stage = per
        self.teacher_stage = -1  # the stage whose teacher `self.frozen` holds (-1: none yet)

    def stage_at(self, step: int) -> int:
        """The stage of training step `step`: steps_per_stage steps each, the rest in the last stage."""
        return min(step // self.steps_per_stage, self.stages - 1)

    # -- training ---------------------------------------------------------------------------------
    def attach(self, run) -> None:
        self.run = run
        o = self.options
        self.data = teacher_samples(run, o["samples"], o["sample_steps"], o["sample_batch"])
        self.grid = base_grid(run.teacher.schedule, o["start_steps"])
        # The previous stage's student, frozen: the teacher from stage 1 on. Checkpointed by the loop
        # (with the stage it belongs to) so that a resumed run continues exactly.
        self.frozen = copy.deepcopy(run.student.network).requires_grad_(False).eval()
        self.frozen_model = run.student.with_network(self.frozen)
        self.extra_modules = {"progressive_teacher": self.frozen}

    def extra_state(self) -> dict:
        return {"teacher_stage": self.teacher_stage}

    def load_extra_state(self, state: dict) -> None:
        self.teacher_stage = int(state.get("teacher_stage", -1))

    def _enter_stage(self, stage: int) -> None:
        """Algorithm 2's "teacher <- student" when a new stage starts."""
        if stage == self.teacher_stage:
            return
        if stage > 0:
            self.frozen.load_state_dict(self.run.student.network.state_dict())
        self.teacher_stage = stage
        n = self.options["start_steps"] >> stage
        self.run.log(f"progressive: stage {stage + 1}/{self.stages}, teacher {n} steps -> student {n // 2} steps")

    def teacher_eps(self, stage: int, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """Stage 0: the real teacher, guided; later stages: the previous stage's student, unguided."""
        if stage == 0:
            return self.run.teacher_eps(x, t, cond)
        with torch.no_grad():
            return self.frozen_model.predict_eps(x, t, cond)

    def loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        run = self.run
        # Never go back to an earlier stage (a resumed run whose steps_per_stage changed).
        stage = max(self.stage_at(step), self.teacher_stage)
        self._enter_stage(stage)
        schedule = run.teacher.schedule
        grid = torch.tensor(self.grid[:: 2 ** stage])  # the teacher's N + 1 points
        b = run.config.batch_size
        pick = torch.randint(self.data["x0"].shape[0], (b,), generator=generator)
        interval = torch.randint((len(grid) - 1) // 2, (b,), generator=generator)  # the student's step
        t, t1, t2 = grid[2 * interval], grid[2 * interval + 1], grid[2 * interval + 2]
        noise = torch.randn(self.data["x0"][pick].shape, generator=generator)
        device = run.teacher.device
        x0 = self.data["x0"][pick].to(device, torch.float64)
        t, t1, t2 = t.to(device), t1.to(device), t2.to(device)
        x_t = schedule.add_noise(x0, noise.to(device, torch.float64), t)
        cond = run.teacher.encode_prompt([run.prompts[j] for j in self.data["index"][pick].tolist()])
        with torch.no_grad():
            x_1 = ddim_step(schedule, x_t, self.teacher_eps(stage, x_t, t, cond).double(), t, t1)
            x_2 = ddim_step(schedule, x_1, self.teacher_eps(stage, x_1, t1, cond).double(), t1, t2)
            target = progressive_target(schedule, x_t, x_2, t, t2)
        x0_student = run.student.predict_x0(x_t, t, cond).double()
        _, sigma = alpha_sigma(schedule, t, x_t)
        return ((x0_student - target) / sigma).pow(2).mean()  # (1 + SNR) x0-MSE = v-MSE

    # -- sampling ---------------------------------------------------------------------------------
    def sample(self, student: StudentModel, cond, nfe: int, generator: torch.Generator | None,
               x_T: torch.Tensor | None = None) -> StudentSample:
        """Deterministic DDIM with the student on every (start_steps / nfe)-th point of the grid."""
        start = self.options["start_steps"]
        if not _is_power_of_two(nfe) or nfe > start // 2:
            raise ValueError(f"this progressive student samples with a power of two up to start_steps / 2 = {start // 2} "
                             f"NFE, not {nfe}")
        grid = base_grid(student.schedule, start)[:: start // nfe]
        return ddim_student_sample(student, cond, grid, generator, x_T)
