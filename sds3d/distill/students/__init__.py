"""Few-step image students of a frozen teacher, one file per method, all trained by the shared loop
(sds3d/training/loop.py) through `common.StudentRun`.

METHODS maps the names `sds3d distill --method` accepts to their classes: an explicit table, so a
new method is one file and one line here (see docs/ARCHITECTURE.md, "Adding a student method").
"""

from __future__ import annotations

from .adv_kd import AdversarialKD
from .common import StudentConfig, StudentFolderError, StudentModel, StudentRun, load_student
from .consistency import ConsistencyDistillation
from .dmd import DMD
from .kd import OneStepKD
from .progressive import ProgressiveDistillation
from .sfd import SFD, SFDSecondStage, SFDv

METHODS = {
    "kd": OneStepKD,
    "progressive": ProgressiveDistillation,
    "consistency": ConsistencyDistillation,
    "sfd": SFD,
    "sfd-v": SFDv,
    "sfd-2": SFDSecondStage,
    "adv-kd": AdversarialKD,
    "dmd": DMD,
}

__all__ = ["METHODS", "StudentConfig", "StudentFolderError", "StudentModel", "StudentRun", "load_student"]
