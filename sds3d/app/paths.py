"""The one rule for paths in the web app: a path from the page names something inside the output
root, or it is refused.

A browser (or anyone who can reach the port) sends strings; none is trusted. `inside_root` resolves
the candidate the way the operating system will (symlinks followed, `..` collapsed) and refuses it
unless the result is the root itself or lies below it, so neither `../../etc/passwd` nor a symlink
planted in the root that points elsewhere lets a file outside the root be read or served.
"""

from __future__ import annotations

import os
from pathlib import Path


class OutsideRootError(ValueError):
    """A path from the page points outside the output root (or is not a plain relative name)."""


def inside_root(root: str | os.PathLike, candidate: str | os.PathLike, must_exist: bool = True) -> Path:
    """The resolved path of `candidate` (relative to `root`, or absolute), when it lies inside `root`.

    Raises OutsideRootError with one line otherwise: an empty name, a NUL byte, a path that resolves
    outside the root (through `..` or a symlink), or, with `must_exist`, one that is not there."""
    text = os.fspath(candidate)
    if not text or not str(text).strip():
        raise OutsideRootError("empty path: choose a run from the list")
    if "\x00" in text:
        raise OutsideRootError("refused path with a NUL byte")
    base = Path(root).resolve()
    path = Path(text)
    resolved = (path if path.is_absolute() else base / path).resolve()  # follows every symlink on the way
    if resolved != base and base not in resolved.parents:
        raise OutsideRootError(f"refused {_short(text)!r}: it is outside the output root {base}")
    if must_exist and not resolved.exists():
        raise OutsideRootError(f"{_short(text)!r} does not exist in the output root {base}")
    return resolved


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
