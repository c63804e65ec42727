"""Simple and Fast Distillation: SFD, its NFE-variable version SFD-v and its 1-NFE second stage
(Zhou, Chen, Wang, Lyu & Chen, "Simple and Fast Distillation of Diffusion Models", NeurIPS 2024,
arXiv:2409.19681), after the official code (github.com/zju-pi/diff-sampler, sfd-main/:
training/loss.py, training/training_loop.py, solvers.py).

SFD fine-tunes a copy of the teacher so that plain DDIM (Euler in EDM's variable) on a few-point
grid t_0 > t_1 > ... > t_K follows the teacher's accurate sampling trajectory:

- **Grid.** t_0 = T - 1 (pure noise on a zero-terminal-SNR schedule), then Karras et al.'s rho = 7
  polynomial in sigma from EDM's sigma_max = 80 down to sigma(t = 0) ~ 0.006 (`student_timesteps`).
  The official `num_steps` is K + 1, the number of time points.
- **Teacher trajectory** (their `get_teacher_traj`). From x_T, DPM-Solver++ (Lu et al. 2022;
  multistep, data prediction, orders up to `teacher_order` = 3, lower orders at the end) with the
  guided teacher on a finer grid that inserts `sub_steps` = M points into every student interval,
  spaced by the same rho polynomial, so the teacher takes M + 1 steps per student interval. Its
  states at t_1 .. t_K are the targets; the multistep history runs through the whole trajectory.
- **Student steps.** From its own previous output (detached: the student trains on its own
  trajectory, not the teacher's), one DDIM step x_{i+1} = DDIM(x_i, eps_student(x_i, t_i), t_i ->
  t_{i+1}); the loss is the L1 distance to the teacher's state at t_{i+1} (their eq. 8 with the L1
  metric of the official code).
- **AFS**, the analytical first step (their Sec. 4.2). At t_0 the sample is almost pure noise, so
  the first step uses eps = x_t itself (EDM form: d = x / sqrt(1 + sigma^2)) instead of a network
  call. It has no parameters, so it has no loss, and it saves one evaluation: a K-NFE student has
  K + 1 intervals with AFS, K without. The teacher does not use it (the official first stage
  calls the teacher with afs=False), so the student learns to correct AFS's error on its next step.

Deliberate differences from the official code: one optimizer step per batch on the mean of the
intervals' losses (the official code steps the optimizer after every interval of a batch): the
shared loop's contract is one loss per step, which keeps resumption exact; the learning rate
follows the loop's warm-up and cosine decay instead of a drop by 10 at half-time; the second
stage has no LPIPS term (the official code adds one for pixel EDM models only); the teacher's
x0 predictions are not dynamically thresholded (the official DPM-Solver++ does it with p = 0.995):
on the embedded teacher at guidance 3 thresholding moves the 12-step trajectory away from the
teacher's clipped DDIM-50 samples and speckles them, and for latent teachers the official rule
(x0 / s with s >= 1) would rescale the latents.

Methods (`sds3d distill --method ...`):
  sfd    one student per NFE (1 .. 8).
  sfd-v  one student for several NFE: the step count is an extra condition of the network
         (`StepConditioned`); each training batch draws one NFE of `nfe_choices`.
  sfd-2  the second stage: a 1-NFE student distilled from a trained sfd / sfd-v student, whose own
         few-step samples are the targets, initialised from its weights.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
from pathlib import Path

import torch
from torch import nn

from ...diffusion.protocol import Cond
from ...diffusion.schedule import NoiseSchedule
from ...diffusion.solvers import ddim_step, dpmpp_integrate
from .common import (StudentConfig, StudentFolderError, StudentModel, StudentSample, ddim_student_sample, load_student,
                     read_student_folder, student_timesteps)

MAX_NFE = 8
SIGMA_MAX = 80.0  # EDM's sigma_max: where `student_timesteps` starts its polynomial (t_0 itself is T - 1)
LOSSES = ("l1", "l2")


# --- options -----------------------------------------------------------------------------------

def _check_option(method: str, key: str, value) -> None:
    """One option's value, or a ValueError naming it and what is allowed."""
    def bad(rule: str):
        raise ValueError(f"{method} option {key}={value!r}: {rule}")

    is_int = isinstance(value, int) and not isinstance(value, bool)
    if key == "sub_steps" and not (is_int and 0 <= value <= 16):
        bad("must be an integer from 0 to 16 (teacher points inserted into each student interval)")
    elif key == "teacher_order" and not (is_int and value in (1, 2, 3)):
        bad("must be 1, 2 or 3 (DPM-Solver++ order)")
    elif key == "afs" and not isinstance(value, bool):
        bad("must be true or false")
    elif key == "rho" and not (isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0):
        bad("must be a positive number")
    elif key == "loss" and value not in LOSSES:
        bad(f"must be one of {', '.join(LOSSES)}")
    elif key == "nfe_choices" and not (isinstance(value, (list, tuple)) and value
                                       and all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_NFE
                                               for k in value) and len(set(value)) == len(value)):
        bad(f"must be a non-empty list of distinct integers from 1 to {MAX_NFE}")
    elif key == "from_student" and not (isinstance(value, str) and value.strip()):
        bad("must be the folder of a trained sfd or sfd-v student")
    elif key == "teacher_nfe" and value is not None and not (is_int and 1 <= value <= MAX_NFE):
        bad(f"must be null (the first-stage student's own NFE) or an integer from 1 to {MAX_NFE}")


def parse_options(method: str, given: dict, defaults: dict, required: tuple[str, ...] = ()) -> dict:
    """`defaults` updated by `given`, strictly: an unknown or missing key, or a bad value, is a ValueError."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {method} option(s) {', '.join(unknown)}: allowed are {', '.join(defaults)}")
    missing = [k for k in required if given.get(k) is None]
    if missing:
        raise ValueError(f"{method} needs option(s) {', '.join(missing)} (--set options.{missing[0]}=...)")
    options = {**defaults, **given}
    for key, value in options.items():
        _check_option(method, key, value)
    return options


def distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """The mean L1 (official SFD) or squared L2 distance between two batches."""
    return (a - b).abs().mean() if kind == "l1" else (a - b).pow(2).mean()


# --- grids -------------------------------------------------------------------------------------

def sfd_timesteps(schedule: NoiseSchedule, nfe: int, afs: bool, rho: float = 7.0) -> list[int]:
    """The student's time points for `nfe` evaluations: nfe + 1 intervals with AFS (the first one
    is analytic), nfe without."""
    return student_timesteps(schedule, nfe + 1 if afs else nfe, rho)


def teacher_timesteps(schedule: NoiseSchedule, grid: list[int], sub_steps: int, rho: float = 7.0,
                      sigma_max: float = SIGMA_MAX) -> tuple[list[int], list[int]]:
    """The teacher's finer grid and where the student's points lie in it.

    Into every student interval [t_i, t_{i+1}] go `sub_steps` points spaced evenly in sigma^(1/rho)
    (the official code's (M + 1) K + 1-point polynomial grid, whose every (M + 1)-th point is a
    student point), each snapped to the nearest discrete timestep in log sigma; points that snap onto
    a neighbour are dropped. sigma(t_0 = T - 1) is capped at `sigma_max` for the spacing, as the
    student's own grid was made. Returns (fine grid, indices of grid's points in it)."""
    abar = schedule.alphas_cumprod.double()
    sigmas = ((1 - abar) / abar).sqrt()
    fine, marks = [grid[0]], [0]
    for t, t_next in zip(grid[:-1], grid[1:]):
        hi = min(float(sigmas[t]), sigma_max) ** (1 / rho)
        lo = float(sigmas[t_next]) ** (1 / rho)
        for k in range(1, sub_steps + 1):
            sigma = (hi + k / (sub_steps + 1) * (lo - hi)) ** rho
            tk = int(schedule.t_from_sigma(torch.tensor([sigma], dtype=torch.float64)).item())
            if t_next < tk < fine[-1]:
                fine.append(tk)
        fine.append(t_next)
        marks.append(len(fine) - 1)
    return fine, marks


# --- the two halves of an SFD step -------------------------------------------------------------

def teacher_trajectory(run, cond: Cond, x_T: torch.Tensor, fine: list[int], order: int) -> list[torch.Tensor]:
    """The guided teacher's DPM-Solver++(order) states at every point of `fine`, from x_T, with one
    multistep history along the whole grid (the official `get_teacher_traj`); no gradient."""
    states = [x_T]
    with torch.no_grad():
        dpmpp_integrate(lambda x, t: run.teacher_eps(x, t, cond), run.teacher.schedule, x_T, fine, order,
                        callback=lambda i, t, x: states.append(x))
    return states


def analytic_first_step(schedule: NoiseSchedule, x_T: torch.Tensor, t: int, t_next: int) -> torch.Tensor:
    """AFS (SFD Sec. 4.2): the DDIM step from t with eps = x_t, no network call."""
    return ddim_step(schedule, x_T, x_T, t, t_next)


def sfd_loss(run, student: StudentModel, cond_student: Cond, cond_teacher: Cond, x_T: torch.Tensor, grid: list[int],
             sub_steps: int, order: int, afs: bool, rho: float, loss: str) -> torch.Tensor:
    """The SFD loss of one batch: the mean over the student's trainable intervals of the distance
    between its DDIM step from its own (detached) previous output and the teacher's trajectory."""
    fine, marks = teacher_timesteps(student.schedule, grid, sub_steps, rho)
    states = teacher_trajectory(run, cond_teacher, x_T, fine, order)
    x = x_T
    terms = []
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        if afs and i == 0:
            x = analytic_first_step(student.schedule, x, t, t_next).float()
            continue
        eps = student.predict_eps(x, torch.full((x.shape[0],), t, dtype=torch.long), cond_student)
        out = ddim_step(student.schedule, x, eps, t, t_next).float()
        terms.append(distance(out, states[marks[i + 1]], loss))
        x = out.detach()
    return torch.stack(terms).mean()


# --- SFD ---------------------------------------------------------------------------------------

SFD_DEFAULTS = {"sub_steps": 3, "teacher_order": 3, "afs": True, "rho": 7.0, "loss": "l1"}


class SFD:
    """SFD: one student for one NFE (1 .. 8). Options: sub_steps (M, teacher points inserted per
    student interval, 3), teacher_order (3), afs (true), rho (7), loss (l1 or l2)."""

    name = "sfd"
    defaults = SFD_DEFAULTS

    @staticmethod
    def supported_nfe(nfe: int) -> str | None:
        return None if 1 <= nfe <= MAX_NFE else f"SFD makes students of 1 to {MAX_NFE} NFE"

    def __init__(self, config: StudentConfig):
        self.options = parse_options(self.name, config.options, self.defaults)
        self.config = config

    def grid(self, schedule: NoiseSchedule, nfe: int) -> list[int]:
        return sfd_timesteps(schedule, nfe, self.options["afs"], self.options["rho"])

    # -- training ---------------------------------------------------------------------------------
    def attach(self, run) -> None:
        self.run = run

    def loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        run, o = self.run, self.options
        cond, x_T = run.batch(generator)
        return sfd_loss(run, run.student, cond, cond, x_T, self.grid(run.student.schedule, self.config.nfe),
                        o["sub_steps"], o["teacher_order"], o["afs"], o["rho"], o["loss"])

    # -- sampling ---------------------------------------------------------------------------------
    def sample(self, student: StudentModel, cond: Cond, nfe: int, generator: torch.Generator | None,
               x_T: torch.Tensor | None = None) -> StudentSample:
        return ddim_student_sample(student, cond, self.grid(student.schedule, nfe), generator, x_T,
                                   analytic_first_step=self.options["afs"])


# --- SFD-v -------------------------------------------------------------------------------------

class StepConditioned(nn.Module):
    """SFD-v's student network: the teacher network's copy plus a learned embedding of the step count.

    The official SFD-v feeds the number of steps to the network as an extra condition. Here the
    teacher's architecture stays as it is: the embedding of the NFE is added to the text
    conditioning (`condition`), the input every teacher network already has (a (B, 384) sentence
    embedding for the embedded LeanUNet, (B, L, D) token states for a diffusers UNet, broadcast over
    tokens). It is zero-initialised, so at step 0 the student is exactly its teacher. `forward` is
    the wrapped network's own, so the teacher's code calls this module like its network."""

    def __init__(self, network: nn.Module, dim: int, max_nfe: int = MAX_NFE):
        super().__init__()
        self.network = network
        self.step_embedding = nn.Embedding(max_nfe + 1, dim)
        nn.init.zeros_(self.step_embedding.weight)

    @property
    def config(self):
        """The wrapped network's config (the embedded teacher reads network.config.camera_dim)."""
        return self.network.config

    def forward(self, *args, **kwargs):
        return self.network(*args, **kwargs)

    def condition(self, cond: Cond, nfe: int) -> Cond:
        """`cond` with the embedding of `nfe` added to its text conditioning (both branches)."""
        if not 1 <= nfe < self.step_embedding.num_embeddings:
            raise ValueError(f"no step condition for {nfe} NFE: 1 to {self.step_embedding.num_embeddings - 1}")
        e = self.step_embedding.weight[nfe]
        return dataclasses.replace(cond, cond=cond.cond + e.to(cond.cond.dtype),
                                   uncond=cond.uncond + e.to(cond.uncond.dtype))


def text_dim(teacher) -> int:
    """The width of a teacher's text conditioning (384 for the embedded teacher, 384 * 3 with text slots)."""
    return int(teacher.encode_prompt([""]).cond.shape[-1])


class SFDv(SFD):
    """SFD-v: one student for every NFE in `nfe_choices` (default [1, 2, 3, 4]), the NFE given to
    the network as a condition (`StepConditioned`); each training batch draws its NFE from the
    step's generator. Other options as SFD. config.nfe (the NFE of the sample grids) must be one of
    the choices.

    The student network is method-made: `student_network(teacher)`. StudentRun and load_student
    build `StudentModel(teacher)` with a plain copy of the teacher's network, so `attach` replaces
    the run's student (and its EMA copy) by the step-conditioned one before the optimizer and the
    loop are made, and `load_sfd_student` loads such a folder. `load_student` (`sds3d sample`, the
    benchmark) cannot until it builds `StudentModel(teacher, method.student_network(teacher))` for
    a method that has one."""

    name = "sfd-v"
    defaults = {**SFD_DEFAULTS, "nfe_choices": [1, 2, 3, 4]}

    @staticmethod
    def supported_nfe(nfe: int) -> str | None:
        # The class-level check (before the options are read); an instance checks its own choices.
        return None if 1 <= nfe <= MAX_NFE else f"SFD-v makes students of 1 to {MAX_NFE} NFE"

    def __init__(self, config: StudentConfig):
        super().__init__(config)
        self.choices = sorted(self.options["nfe_choices"])
        if config.nfe not in self.choices:
            raise ValueError(f"sfd-v: nfe={config.nfe} is not one of options.nfe_choices {self.choices}")
        self.supported_nfe = self._supported_by_this_student  # an instance answers for its own choices

    def _supported_by_this_student(self, nfe: int) -> str | None:
        return None if nfe in self.choices else f"this SFD-v student was trained for NFE {self.choices}"

    @staticmethod
    def student_network(teacher) -> StepConditioned:
        """A trainable copy of the teacher's network with a zero step embedding."""
        return StepConditioned(copy.deepcopy(teacher.network), text_dim(teacher))

    def attach(self, run) -> None:
        self.run = run  # StudentRun built the student from `student_network`

    def loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        run, o = self.run, self.options
        nfe = self.choices[int(torch.randint(len(self.choices), (1,), generator=generator))]
        cond, x_T = run.batch(generator)
        student = run.student
        return sfd_loss(run, student, student.network.condition(cond, nfe), cond, x_T, self.grid(student.schedule, nfe),
                        o["sub_steps"], o["teacher_order"], o["afs"], o["rho"], o["loss"])

    def sample(self, student: StudentModel, cond: Cond, nfe: int, generator: torch.Generator | None,
               x_T: torch.Tensor | None = None) -> StudentSample:
        why = self.supported_nfe(nfe)
        if why:
            raise ValueError(f"sfd-v cannot sample with {nfe} NFE: {why}")
        if not isinstance(student.network, StepConditioned):
            raise ValueError("an sfd-v student needs its step-conditioned network (load it with load_sfd_student)")
        return ddim_student_sample(student, student.network.condition(cond, nfe), self.grid(student.schedule, nfe),
                                   generator, x_T, analytic_first_step=self.options["afs"])


# --- loading a first-stage student -------------------------------------------------------------

FIRST_STAGE = {"sfd": SFD, "sfd-v": SFDv}


def load_sfd_student(folder: str | Path, teacher) -> tuple[StudentModel, SFD, dict]:
    """(student, method, student.json) of a trained sfd or sfd-v folder made from `teacher`, frozen."""
    method = read_student_folder(folder)["config"]["method"]
    if method not in FIRST_STAGE:
        raise StudentFolderError(f"{folder} holds a {method!r} student: sfd-2 distills an sfd or sfd-v student")
    return load_student(folder, FIRST_STAGE, teacher=teacher)


def fold_step_condition(network: StepConditioned, nfe: int) -> nn.Module:
    """A plain copy of an SFD-v network that behaves as the wrapper conditioned on `nfe`.

    For a network whose text conditioning enters through a first Linear layer (`text_mlp[0]` of the
    embedded LeanUNet), W (text + e) + b = W text + (W e + b): the step embedding folds into that
    layer's bias, exactly, and the result loads wherever the teacher's architecture does."""
    inner = copy.deepcopy(network.network)
    first = getattr(getattr(inner, "text_mlp", None), "__getitem__", None)
    layer = first(0) if first is not None else None
    if not isinstance(layer, nn.Linear):
        raise ValueError("sfd-2 from an sfd-v student needs a network whose text enters through text_mlp[0] "
                         "(the embedded teacher's LeanUNet); distill an sfd student instead")
    with torch.no_grad():
        layer.bias += layer.weight @ network.step_embedding.weight[nfe].to(layer.weight.dtype)
    return inner


# --- the second stage --------------------------------------------------------------------------

SECOND_DEFAULTS = {"from_student": None, "teacher_nfe": None, "afs": True, "loss": "l1"}


class SFDSecondStage:
    """sfd-2: a 1-NFE student distilled from a trained sfd / sfd-v student (SFD Sec. 4.4, the
    official `is_second_stage`).

    The first-stage student's own `teacher_nfe`-step sample (default: its own NFE) from x_T is the
    target; the new student, initialised from the first stage's weights (an sfd-v network's 1-NFE
    condition folded in), does AFS then one DDIM step (with afs, the official setting: num_steps=3,
    afs=True), or one DDIM step from T - 1 (afs false), on the first stage's 1-NFE grid; L1 loss on
    the final sample. The official second stage uses lr 5e-4 (--set lr=5e-4). Options: from_student
    (required), teacher_nfe, afs, loss."""

    name = "sfd-2"
    defaults = SECOND_DEFAULTS

    @staticmethod
    def supported_nfe(nfe: int) -> str | None:
        return None if nfe == 1 else "the SFD second stage makes 1-NFE students only (use --nfe 1)"

    def __init__(self, config: StudentConfig):
        # The first-stage folder is read in attach, not here: sampling a finished student needs only this.
        self.options = parse_options(self.name, config.options, self.defaults, required=("from_student",))
        self.config = config

    def grid(self, schedule: NoiseSchedule) -> list[int]:
        return sfd_timesteps(schedule, 1, self.options["afs"])

    # -- training ---------------------------------------------------------------------------------
    def attach(self, run) -> None:
        self.run = run
        self.first, self.first_method, meta = load_sfd_student(self.options["from_student"], run.teacher)
        # What the first stage cost counts toward this student's (benchmarks/students.py adds it).
        self.prior_minutes = meta["train_minutes"] + meta.get("setup_minutes", 0.0) + meta.get("prior_minutes", 0.0)
        self.teacher_nfe = self.options["teacher_nfe"] or meta["nfe"]
        why = self.first_method.supported_nfe(self.teacher_nfe)
        if why:
            raise ValueError(f"sfd-2: the first-stage student cannot sample with teacher_nfe={self.teacher_nfe}: {why}")
        network = self.first.network
        if isinstance(network, StepConditioned):
            network = fold_step_condition(network, 1)
        run.student.network.load_state_dict(network.state_dict())
        if run.ema is not None:
            run.ema.load_state_dict(network.state_dict())

    def one_step(self, student: StudentModel, x_T: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The student's 1-NFE sample, differentiable: [AFS, then] one DDIM step to the grid's end."""
        grid = self.grid(student.schedule)
        x = x_T
        if self.options["afs"]:
            x = analytic_first_step(student.schedule, x, grid[0], grid[1]).float()
        eps = student.predict_eps(x, torch.full((x.shape[0],), grid[-2], dtype=torch.long), cond)
        return ddim_step(student.schedule, x, eps, grid[-2], grid[-1]).float()

    def loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        run = self.run
        cond, x_T = run.batch(generator)
        with torch.no_grad():
            target = self.first_method.sample(self.first, cond, self.teacher_nfe, None, x_T=x_T).x
        return distance(self.one_step(run.student, x_T, cond), target, self.options["loss"])

    # -- sampling ---------------------------------------------------------------------------------
    def sample(self, student: StudentModel, cond: Cond, nfe: int, generator: torch.Generator | None,
               x_T: torch.Tensor | None = None) -> StudentSample:
        return ddim_student_sample(student, cond, self.grid(student.schedule), generator, x_T,
                                   analytic_first_step=self.options["afs"])
