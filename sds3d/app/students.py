"""The Students tab: a few-step student next to its teacher, same prompt, same starting noise.

A student folder (written by `sds3d distill`, see sds3d/distill/students/common.py) is loaded with
`load_student`, which refuses a teacher other than the one it was distilled from. Both sample from
the same x_T (drawn once from the seed), so the pictures differ only by the sampler: the student's
NFE against the teacher's DDIM with 50 steps at the guidance the student distilled (the embedded
teacher with its evaluation options EMBEDDED_DDIM, as `sds3d teacher eval` samples it).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..io import image_grid, to_uint8
from .paths import inside_root

STUDENTS_FOLDER = "students"
TEACHER_STEPS = 50
MAX_IMAGES = 8


def list_students(root: str | Path) -> list[str]:
    """Student folders under `root/students` (those with a student.json), as names relative to the root."""
    from ..distill.students.common import STUDENT_FILE

    root = Path(root).resolve()
    folder = root / STUDENTS_FOLDER
    if not folder.is_dir():
        return []
    names = []
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and (entry / STUDENT_FILE).is_file() and (entry / "checkpoints" / "last.pt").is_file():
            try:
                names.append(str(inside_root(root, entry).relative_to(root)))
            except ValueError:  # a symlink out of the root
                continue
    return names


@dataclass
class Comparison:
    student: np.ndarray  # (H, W, 3) uint8 grid
    teacher: np.ndarray
    student_nfe: int
    teacher_nfe: int
    student_seconds: float
    teacher_seconds: float
    method: str
    guidance: float

    def markdown(self) -> str:
        return "\n".join([
            "| sampler | NFE | seconds |", "|---|---|---|",
            f"| student ({self.method}) | {self.student_nfe} | {self.student_seconds:.2f} |",
            f"| teacher (DDIM {TEACHER_STEPS} steps, guidance {self.guidance:g}) | {self.teacher_nfe} | "
            f"{self.teacher_seconds:.2f} |",
            "", "Same prompt, same seed, same starting noise x_T for both."])


class StudentSampler:
    """Loaded students kept between requests (keyed by folder and checkpoint time); one sampling at a time."""

    def __init__(self, root: str | Path, teacher_loader=None):
        self.root = Path(root).resolve()
        self.cache: dict = {}
        self.lock = threading.Lock()
        self.teacher_loader = teacher_loader  # spec -> teacher (the app's cache), default load_teacher

    def load(self, name: str):
        from ..distill.students import METHODS, load_student
        from ..teachers import load_teacher

        folder = inside_root(self.root, name)
        if folder.parent != self.root / STUDENTS_FOLDER:
            raise ValueError(f"{name!r} is not a folder of {self.root / STUDENTS_FOLDER}: choose a student from the list")
        key = (str(folder), (folder / "checkpoints" / "last.pt").stat().st_mtime
               if (folder / "checkpoints" / "last.pt").exists() else None)
        if key not in self.cache:
            from ..distill.students.common import read_student_folder

            spec = read_student_folder(folder)["config"]["teacher"]
            teacher = (self.teacher_loader or load_teacher)(spec)
            self.cache.clear()  # one student in memory at a time
            self.cache[key] = load_student(folder, METHODS, teacher=teacher)
        return self.cache[key]

    def compare(self, name: str, prompt: str, seed: int = 0, n: int = 4) -> Comparison:
        from ..diffusion.solvers import initial_noise, sample
        from ..teachers.embedded import EMBEDDED_DDIM, EmbeddedTeacher

        prompt = str(prompt or "").strip()
        if not prompt:
            raise ValueError("prompt is empty: give the text to sample, e.g. 'a red cube'")
        if not 1 <= n <= MAX_IMAGES:
            raise ValueError(f"bad number of images {n}: allowed are 1 to {MAX_IMAGES}")
        if not 0 <= seed < 2 ** 63:
            raise ValueError(f"bad seed {seed}: must be an integer in [0, 2**63)")
        from .jobs import RNG_LOCK

        with self.lock, RNG_LOCK:  # loading builds networks from torch's global generator (see RNG_LOCK)
            student, method, meta = self.load(name)
            teacher = student.teacher
            guidance = float(meta.get("guidance") or (3.0 if isinstance(teacher, EmbeddedTeacher) else 7.5))
            cond = teacher.encode_prompt([prompt] * n)
            x_T = initial_noise(teacher, n, torch.Generator().manual_seed(seed))
            start = time.perf_counter()
            ours = method.sample(student, cond, meta["nfe"], torch.Generator().manual_seed(seed), x_T=x_T)
            student_seconds = time.perf_counter() - start
            options = dict(EMBEDDED_DDIM) if isinstance(teacher, EmbeddedTeacher) else {}
            start = time.perf_counter()
            reference = sample(teacher, cond, "ddim", TEACHER_STEPS, guidance, torch.Generator().manual_seed(seed),
                               x_T=x_T, **options)
            teacher_seconds = time.perf_counter() - start
        ncols = min(n, 4)
        return Comparison(to_uint8(image_grid(ours.images.cpu(), ncols)), to_uint8(image_grid(reference.images.cpu(), ncols)),
                          ours.nfe, reference.nfe, student_seconds, teacher_seconds, meta["config"]["method"], guidance)
