"""Run folders, atomic file writes and image files: nothing a user made is lost or half-written."""

from __future__ import annotations

import contextlib
import glob
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked; the message says what to do."""


class CheckpointError(ValueError):
    """A file that should hold saved tensors is damaged, is not such a file, or would run code when
    unpickled; the one-line message names the file and what is wrong."""


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


# The names `atomic_path` gives its temporary files (tempfile.mkstemp: 8 characters of
# [a-z0-9_] between our prefix and suffix): ".<stem>.<8 chars>.tmp<suffix>".
ATOMIC_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[^./]+)?$")


def remove_atomic_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that `atomic_path` left in `folder` (and its subfolders) when its
    process was killed mid-write (SIGKILL, power loss: no `finally` ran). Returns what was removed.

    Only the start of a run calls this, for its own folder: a temporary file of a writer still
    running in that folder would go too, and a run folder has one writer, the run."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for path in sorted(folder.rglob(".*")):
            if path.is_file() and not path.is_symlink() and ATOMIC_TEMPORARY.match(path.name):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


def load_torch_file(path: str | os.PathLike, map_location=None, what: str = "checkpoint"):
    """`torch.load(path, weights_only=True)` with every failure one CheckpointError line naming the file.

    weights_only=True unpickles tensors and plain containers only: a file that names any other Python
    callable (a shared run folder's `last.pt` whose pickle would call os.system, say) is refused,
    and the call is never made. Empty, truncated or random files end in EOFError, RuntimeError
    (PytorchStreamReader) or UnpicklingError inside torch; they are reported as damaged."""
    import pickle
    import warnings

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about unusual pickle protocols before failing
            return torch.load(path, weights_only=True, map_location=map_location)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{what} {path} is a folder, not a file") from None
    except PermissionError:
        raise CheckpointError(f"{what} {path} cannot be read (permission denied)") from None
    except pickle.UnpicklingError as error:
        blocked = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line]
        if blocked:
            raise CheckpointError(f"{what} {path} refused: it holds Python objects that would run code when loaded "
                                  f"({blocked[0].rstrip('.')}); nothing of it was run. Load only checkpoints "
                                  f"sds3d wrote") from None
        raise CheckpointError(f"{what} {path} is damaged or not a torch file (its data cannot be unpickled)") from None
    except Exception as error:  # noqa: BLE001 - torch raises EOFError, RuntimeError, KeyError, ValueError alike
        if path.is_file() and path.stat().st_size == 0:
            raise CheckpointError(f"{what} {path} is empty (0 bytes)") from None
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        first = re.split(r"\.\s", first)[0][:120]  # torch's zip reader appends advice on filing a bug
        raise CheckpointError(f"{what} {path} is damaged or not a torch file ({first})") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_save_torch(obj, path: str | os.PathLike) -> None:
    """torch.save through a temporary file, so an interrupted save never leaves a broken checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def prepare_run_folder(path: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Create (or reuse, with `resume`) a run folder, refusing to clobber an existing one.

    `overwrite` moves the old folder aside to `<name>.old-N` instead of deleting it. A folder that is
    reused (`resume`, or one holding nothing but them) first loses the temporary files of atomic
    writes that a killed process left (`remove_atomic_temporaries`).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"output path {path} exists and is not a folder: choose another --out")
    if path.is_dir() and (resume or all(ATOMIC_TEMPORARY.match(p.name) for p in path.rglob("*") if not p.is_dir())):
        remove_atomic_temporaries(path)
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
        state = "is empty" if path.exists() else "does not exist"
        raise RunFolderError(f"cannot resume: run folder {path} {state}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise RunFolderError(f"output folder {path} is not writable ({error.strerror}): choose another --out") from None
    return path


def holds_only(folder: str | Path, names: tuple[str, ...] = ("config.yaml",)) -> bool:
    """Whether `folder`'s files are only `names` at its top level and temporaries of atomic writes
    (empty subfolders aside): what a run leaves when it fails before its first checkpoint or preview."""
    folder = Path(folder)
    return all(p.is_dir() or (p.parent == folder and p.name in names) or ATOMIC_TEMPORARY.match(p.name)
               for p in folder.rglob("*"))


@contextlib.contextmanager
def run_folder(path: str | Path, overwrite: bool = False, resume: bool = False, setup_files=("config.yaml",)):
    """`prepare_run_folder` for the block that starts a run, undone when the block fails (any exception,
    Ctrl-C included) while the folder holds no more than `setup_files` (`holds_only`): the folders it
    made are removed, an `--overwrite`n folder moved back from `<name>.old-N`, a user's empty folder
    emptied again. A failed start so leaves nothing that blocks the same command; a run that wrote a
    checkpoint or a preview keeps its folder (`--resume` continues it). A resumed folder is never undone.
    """
    path = Path(path)
    created = path  # the outermost folder this call creates (mkdir makes the parents too)
    while not created.parent.exists() and created.parent != created.parent.parent:
        created = created.parent
    existed = path.is_dir()
    before = {p.name for p in path.parent.glob(f"{glob.escape(path.name)}.old-*")} if path.parent.is_dir() else set()
    folder = prepare_run_folder(path, overwrite=overwrite, resume=resume)
    try:
        yield folder
    except BaseException:
        if not resume and folder.is_dir() and holds_only(folder, tuple(setup_files)):
            aside = [p for p in folder.parent.glob(f"{glob.escape(folder.name)}.old-*") if p.name not in before]
            with contextlib.suppress(OSError):
                shutil.rmtree(folder)
                if aside:  # the one folder `overwrite` moved aside
                    aside[0].rename(folder)
                elif existed:
                    folder.mkdir()
                elif created != folder and created.is_dir() and not any(p.is_file() for p in created.rglob("*")):
                    shutil.rmtree(created)
        raise


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
