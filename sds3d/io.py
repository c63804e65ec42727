"""Run folders, atomic file writes and image files: nothing a user made is lost or half-written."""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked; the message says what to do."""


def tuples_to_lists(values: dict) -> dict:
    """A dataclass's dict ready for YAML/JSON: tuples become lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def lists_to_tuples(values: dict) -> dict:
    """The inverse of `tuples_to_lists`, for frozen, hashable dataclass fields."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def slugify(text: str, max_length: int = 48) -> str:
    """'A red cube!' -> 'a-red-cube'."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "run"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; on success move it onto `path`, on error delete it.

    The temporary file sits in the same folder (so `os.replace` is an atomic rename, not a copy)
    and keeps the final suffix (so writers that pick a format from the name, like ffmpeg, still do).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the result the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_save_torch(obj, path: str | os.PathLike) -> None:
    """torch.save through a temporary file, so an interrupted save never leaves a broken checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def prepare_run_folder(path: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Create (or reuse, with `resume`) a run folder, refusing to clobber an existing one.

    `overwrite` moves the old folder aside to `<name>.old-N` instead of deleting it.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"output path {path} exists and is not a folder: choose another --out")
    if path.exists() and any(path.iterdir()):
        if resume:
            return path
        if not overwrite:
            raise RunFolderError(f"run folder {path} already exists: pass --resume to continue it, "
                                 f"--overwrite to start again (the old folder is kept as {path.name}.old-N), or --out elsewhere")
        n = 1
        while path.with_name(f"{path.name}.old-{n}").exists():
            n += 1
        path.rename(path.with_name(f"{path.name}.old-{n}"))
    elif resume:
        raise RunFolderError(f"cannot resume: run folder {path} does not exist")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise RunFolderError(f"output folder {path} is not writable ({error.strerror}): choose another --out") from None
    return path


# --- images ----------------------------------------------------------------------------------

def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    image = torch.as_tensor(image).detach().float().cpu().clamp(0.0, 1.0)
    return (image.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)


def image_grid(images: torch.Tensor, ncols: int | None = None) -> torch.Tensor:
    """(B, 3, H, W) -> (3, rows*H, ncols*W), row by row, unused cells black; ncols defaults to ceil(sqrt(B))."""
    b, c, h, w = images.shape
    ncols = ncols or math.ceil(math.sqrt(b))
    nrows = math.ceil(b / ncols)
    grid = images.new_zeros(nrows * ncols, c, h, w)
    grid[:b] = images
    return grid.reshape(nrows, ncols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, nrows * h, ncols * w)


def save_image(path: str | os.PathLike, image: torch.Tensor, ncols: int | None = None) -> Path:
    """Write a PNG of one image (3, H, W) or a grid of a batch (B, 3, H, W), values in [0, 1]."""
    image = torch.as_tensor(image).detach()
    if image.dim() == 4:
        image = image_grid(image, ncols)
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image (3, H, W) or a batch (B, 3, H, W), got shape {tuple(image.shape)}")
    path = Path(path)
    with atomic_path(path) as tmp:
        imageio.imwrite(tmp, to_uint8(image), format="png")
    return path
