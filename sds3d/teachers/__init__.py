"""Teachers behind the Teacher protocol (sds3d/diffusion/protocol.py), and `load_teacher`, the one
factory that turns what a user types after `--teacher` into a frozen teacher.

- `embedded`: the network shipped in sds3d/assets/teacher (`embedded.py`, network in `unet.py`);
  the other names of `SHIPPED_TEACHERS` are earlier shipped networks, kept so that students
  distilled from them still load;
- a folder written by `sds3d teacher export`: that embedded teacher;
- `oracle`: the exact denoiser of world renders (`oracle.py`), options in `oracle_options`;
- anything else: a diffusers Stable Diffusion / DeepFloyd IF folder or cached hub id (`diffusers.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

EMBEDDED_FORMAT = "sds3d-embedded-teacher"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
# Teachers shipped in the package: spec -> folder. "embedded" is the default of every command; when a
# new network becomes the default, the one before it stays here under its own name ("embedded-v1").
SHIPPED_TEACHERS: dict[str, Path] = {"embedded": ASSETS / "teacher"}


def embedded_folder(spec: str | Path) -> Path:
    """The folder of an embedded teacher spec: a shipped name (`SHIPPED_TEACHERS`) or a folder path."""
    return SHIPPED_TEACHERS.get(str(spec), Path(spec))


def is_embedded_teacher_folder(path: str | Path) -> bool:
    """A folder written by `sds3d teacher export` (its config.json says so)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == EMBEDDED_FORMAT
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError, OSError):
        return False


def teacher_kind(spec: str) -> str:
    """'oracle', 'embedded' (the shipped network or an exported folder) or 'diffusers'."""
    if spec == "oracle":
        return spec
    if spec in SHIPPED_TEACHERS:
        return "embedded"
    return "embedded" if is_embedded_teacher_folder(spec) else "diffusers"


def load_teacher(spec: str = "embedded", device: str | torch.device = "cpu", *, oracle_options: dict | None = None,
                 vae_resolution: int | None = None, autocast_bf16: bool = False):
    """The frozen teacher that `spec` names, on `device`.

    `oracle_options` go to `OracleTeacher` (resolution, views per bucket, camera ranges, camera
    sigma); `vae_resolution` (None: the pipeline's native size) to a diffusers teacher;
    `autocast_bf16` to the embedded network (decide it with `sds3d.precision.resolve_precision`:
    bf16 only pays on CPUs with native bf16). Failures a user can fix raise one-line errors
    (TeacherWeightsError, TeacherLoadError)."""
    kind = teacher_kind(spec)
    if kind == "oracle":
        from .oracle import OracleTeacher  # the oracle renders the world: imported only when asked for

        return OracleTeacher(**(oracle_options or {}))
    if kind == "embedded":
        from .embedded import EmbeddedTeacher

        return EmbeddedTeacher.load(embedded_folder(spec), device=device, autocast_bf16=autocast_bf16)
    from .diffusers import load_diffusers_teacher  # heavy, and optional for the world teachers

    return load_diffusers_teacher(spec, device=device, vae_resolution=vae_resolution)
