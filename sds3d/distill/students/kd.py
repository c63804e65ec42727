"""One-step knowledge distillation (Luhman & Luhman 2021, "Knowledge distillation in iterative
generative models for improved sampling speed").

The teacher's deterministic DDIM-50 sampler is a map from initial noise x_T to an image x_0. The
student learns that map in one evaluation: x_0 ~ F_s(x_T) where F_s is one DDIM step of the
student from t = T - 1 to a clean image (its x0 prediction at the noisiest timestep), trained by
regression on (x_T, x_0) pairs that the teacher makes once, before training, and that are cached
in the run folder (`kd_pairs.pt`, loaded with weights_only=True). The loss is the mean squared
error in model space (their eq. 6 with the L2 distance).

Options: pairs (number of cached pairs, default 512), teacher_steps (DDIM steps of the teacher,
default 50).
"""

from __future__ import annotations

import hashlib
import time

import torch

from ...diffusion.solvers import ddim_sample, ddim_step, initial_noise
from ...io import atomic_save_torch
from .common import StudentConfig, StudentModel, StudentSample, network_sha256

DEFAULTS = {"pairs": 512, "teacher_steps": 50, "pair_batch": 64}


class OneStepKD:
    name = "kd"

    @staticmethod
    def supported_nfe(nfe: int) -> str | None:
        return None if nfe == 1 else "one-step KD makes 1-NFE students only (use --nfe 1)"

    def __init__(self, config: StudentConfig):
        unknown = set(config.options) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown kd option(s) {', '.join(sorted(unknown))}: allowed are {', '.join(DEFAULTS)}")
        self.options = {**DEFAULTS, **config.options}
        for key, value in self.options.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"kd option {key}={value!r}: must be a positive integer")

    # -- training ---------------------------------------------------------------------------------
    def attach(self, run) -> None:
        self.run = run
        self.pairs = teacher_pairs(run, self.options["pairs"], self.options["teacher_steps"], self.options["pair_batch"])

    def loss(self, step: int, generator: torch.Generator) -> torch.Tensor:
        run = self.run
        pick = torch.randint(self.pairs["x_T"].shape[0], (run.config.batch_size,), generator=generator)
        cond = run.teacher.encode_prompt([run.prompts[j] for j in self.pairs["index"][pick].tolist()])
        x0 = self.one_step(run.student, self.pairs["x_T"][pick], cond)
        return (x0 - self.pairs["x_0"][pick]).pow(2).mean()

    @staticmethod
    def one_step(student: StudentModel, x_T: torch.Tensor, cond) -> torch.Tensor:
        """F_s(x_T): one DDIM step of the student from t = T - 1 to abar = 1 (its x0 prediction there)."""
        return student_x0(student, x_T, student.schedule.num_train_timesteps - 1, cond)

    # -- sampling ---------------------------------------------------------------------------------
    def sample(self, student: StudentModel, cond, nfe: int, generator: torch.Generator | None,
               x_T: torch.Tensor | None = None) -> StudentSample:
        x = initial_noise(student.teacher, len(cond.prompts), generator, x_T)
        with torch.no_grad():
            x0 = self.one_step(student, x, cond)
        return StudentSample(student.teacher.decode(x0), x0, 1)


def student_x0(student: StudentModel, x_t: torch.Tensor, t: int, cond) -> torch.Tensor:
    """The student's clean image from x_t at timestep t: one DDIM step to abar = 1. Through
    `ddim_step` (coefficients in float64), not `StudentModel.predict_x0`, because at t = T - 1 of a
    zero-terminal-SNR schedule 1 / sqrt(abar) ~ 3e4 amplifies float32 rounding."""
    timesteps = torch.full((x_t.shape[0],), t, dtype=torch.long)
    return ddim_step(student.schedule, x_t, student.predict_eps(x_t, timesteps, cond), t, -1)


def teacher_pairs(run, n: int, steps: int, batch: int, filename: str = "kd_pairs.pt") -> dict:
    """(x_T, x_0, prompt index) of `n` guided teacher DDIM trajectories on the run's training prompts,
    made once with a fixed generator and cached in the run folder as `filename` (read back with
    weights_only=True; remade when the count, steps or guidance differ). Each x_0 is the teacher's
    image for its x_T: the pairs KD regresses on, DMD's regression loss uses and Adv-KD's critics
    see as real images. Remade when any setting differs: count, steps, guidance, seed, the teacher's
    weights or the prompts."""
    path = run.out_dir / filename
    settings = {"pairs": n, "teacher_steps": steps, "guidance": float(run.guidance), "seed": run.config.seed,
                "teacher": network_sha256(run.teacher.network),
                "prompts": hashlib.sha256("\n".join(run.prompts).encode()).hexdigest()}
    if path.exists():
        try:
            cached = torch.load(path, weights_only=True, map_location="cpu")
            if cached.get("settings") == settings:
                return cached
        except Exception:  # unreadable or damaged: made again below
            pass
    from ...teachers.embedded import EMBEDDED_DDIM, EmbeddedTeacher

    options = dict(EMBEDDED_DDIM) if isinstance(run.teacher, EmbeddedTeacher) else {}
    gen = torch.Generator().manual_seed(run.config.seed + 777)
    index = torch.randint(len(run.prompts), (n,), generator=gen)
    x_T = initial_noise(run.teacher, n, gen)
    outs, start = [], time.time()
    for i in range(0, n, batch):
        chunk = slice(i, i + batch)
        cond = run.teacher.encode_prompt([run.prompts[j] for j in index[chunk].tolist()])
        outs.append(ddim_sample(run.teacher, cond, steps, run.guidance, x_T=x_T[chunk], **options).x)
        run.log(f"{run.config.method}: teacher pairs {min(n, i + batch)}/{n} ({time.time() - start:.0f} s)")
    pairs = {"x_T": x_T, "x_0": torch.cat(outs), "index": index, "settings": settings}
    accelerator = getattr(run, "accelerator", None)
    if accelerator is None or accelerator.is_main_process:  # every replica makes the same pairs; one writes them
        atomic_save_torch(pairs, path)
    return pairs
