"""Prompt files of `sds3d batch`: one run a line.

    # comments and blank lines are ignored
    a red cube
    a red cube | seed=3 steps=400
    a snowman | teacher=oracle preset=cpu-quality
    a pine tree | negative_prompt="a blurry image" azimuth_range=[-90,90]

After the bar, space-separated `FIELD=VALUE` items with the same syntax and names as
`generate --set` (YAML values; quote a value that holds spaces), plus `preset`. The same prompt
may appear on several lines (with other seeds, say): every line is its own run. A whole file is
read and every line's settings checked before any run starts, so that a typo on line 40 is
reported at once with its line number and nothing runs.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ..settings import ConfigError, parse_set_items


class PromptFileError(ValueError):
    """A prompt file that cannot be run: missing, empty, or a malformed line (its number is in the message)."""


@dataclass(frozen=True)
class PromptLine:
    number: int  # 1-based line number in the file
    prompt: str
    overrides: dict = field(default_factory=dict)  # FIELD -> value, `preset` included


def parse_prompt_line(text: str, number: int) -> PromptLine | None:
    """One line -> PromptLine, or None for a blank line or a comment. Raises PromptFileError."""
    stripped = text.strip()
    if not stripped or stripped.startswith("#"):
        return None
    prompt, bar, rest = stripped.partition("|")
    prompt = prompt.strip()
    if not prompt:
        raise PromptFileError(f"line {number}: no prompt before the bar: write 'a red cube | seed=3'")
    overrides: dict = {}
    if bar:
        try:
            items = shlex.split(rest)
        except ValueError as error:
            raise PromptFileError(f"line {number}: cannot split the settings after the bar ({error}): "
                                  "quote a value that holds spaces, e.g. negative_prompt=\"a blurry image\"") from None
        if not items:
            raise PromptFileError(f"line {number}: nothing after the bar: write FIELD=VALUE items, e.g. seed=3 steps=400")
        if "|" in rest:
            raise PromptFileError(f"line {number}: more than one bar: write 'PROMPT | FIELD=VALUE ...'")
        try:
            overrides = parse_set_items(items)
        except ConfigError as error:
            raise PromptFileError(f"line {number}: {str(error).replace('--set ', '')}") from None
    return PromptLine(number, prompt, overrides)


def read_prompt_file(path: str | Path) -> list[PromptLine]:
    """Every prompt line of a file, in order. Raises PromptFileError for a missing, unreadable or
    empty file (no prompt line) or the first malformed line."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} not found" if not path.exists() else f"{path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PromptFileError(f"{path} is not UTF-8 text: a prompt file holds one prompt a line") from None
    lines = [line for number, raw in enumerate(text.splitlines(), start=1)
             if (line := parse_prompt_line(raw, number)) is not None]
    if not lines:
        raise PromptFileError(f"{path} holds no prompt (only blank lines or # comments): write one prompt a line")
    return lines
