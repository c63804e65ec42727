"""Config dataclasses from plain dicts: one strict reader for saved files and `--set` items.

GenerateConfig (config.yaml), TrainConfig (train_config.json) and NetConfig (a teacher's
config.json["network"]) are all built by `dataclass_from_dict`, so a typo or a value of the wrong
type is one error line naming the setting and what it allows, raised before anything is written
(a misspelt key used to be ignored silently, or a float seed to crash minutes into a run).
`parse_set_items` reads the command line's `--set FIELD=VALUE` items the same way everywhere:
VALUE is YAML, dotted names reach nested configs (`--set network.camera_dim=3`).

A base module: the standard library and yaml only, so every layer may use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and what is allowed."""


# --- dict -> dataclass -----------------------------------------------------------------------

def dataclass_from_dict(cls, data: Mapping, prefix: str = "", base=None):
    """An instance of the dataclass `cls` from `data` (a loaded YAML/JSON mapping), checked strictly.

    - An unknown key raises ConfigError naming it (`prefix` + key), with the nearest known field
      when one is close (difflib): "unknown setting network.camrea_dim: did you mean network.camera_dim?".
    - Each value is checked against the field's annotation: int refuses bools and fractional
      floats (3.0 is read as 3), float takes ints and refuses bools and non-finite numbers, str
      refuses numbers, bool takes only true/false, `X | None` takes null, `tuple[X, ...]` /
      `tuple[X, Y]` take lists of such elements (of that length), and a nested dataclass takes a
      mapping of its own fields (checked the same way, under `prefix` "name.").
    - Missing keys keep the field's default, or `base`'s value when `base` (an instance of `cls`)
      is given: a nested mapping only changes the keys it names.
    """
    where = prefix[:-1] if prefix.endswith(".") else (prefix or cls.__name__)
    if not isinstance(data, Mapping):
        raise ConfigError(f"bad value {where}={data!r}: must be a mapping of setting: value")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_message(f"{prefix}{key}", str(key), list(fields), prefix, cls))
    hints = typing.get_type_hints(cls)
    values = {name: getattr(base, name) for name in fields} if base is not None else {}
    for name, value in data.items():
        values[name] = check_value(value, hints.get(name, typing.Any), f"{prefix}{name}", _default_of(fields[name], base))
    missing = [name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing setting {prefix}{missing[0]}: {cls.__name__} needs a value for it")
    return cls(**values)


def _unknown_message(full: str, key: str, known: list[str], prefix: str, cls) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"unknown setting {full}: did you mean {prefix}{close[0]}?"
    if len(known) <= 30:
        return f"unknown setting {full}: allowed are {', '.join(prefix + k for k in known)}"
    return f"unknown setting {full}: not one of the {len(known)} fields of {cls.__name__} (a saved config lists them all)"


def _default_of(f: dataclasses.Field, base):
    if base is not None:
        return getattr(base, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def check_value(value, annotation, name: str, default=None):
    """`value` converted to `annotation` (lists -> tuples, ints -> floats, 3.0 -> 3 for ints), or
    ConfigError "bad value NAME=VALUE: must be WHAT". `default` is the base of a nested dataclass."""
    ok, converted = _convert(value, annotation, name, default)
    if not ok:
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"bad value {name}={value!r}: must be a finite number")
        raise ConfigError(f"bad value {name}={value!r}: must be {describe(annotation)}")
    return converted


def _convert(value, tp, name: str, default):
    """(True, converted value) when `value` fits the annotation `tp`, else (False, None)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return type(None) in args, None
        for arm in args:
            if arm is not type(None):
                ok, converted = _convert(value, arm, name, default)
                if ok:
                    return True, converted
        return False, None
    if tp is type(None):
        return value is None, None
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int), value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False, None
        return True, float(value)
    if tp is str:
        return isinstance(value, str), value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False, None
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis) and args:
            if len(value) != len(args):
                return False, None
            element_types = args
        else:
            element_types = [args[0] if args else typing.Any] * len(value)
        items = []
        for item, element in zip(value, element_types):
            ok, converted = _convert(item, element, name, None)
            if not ok:
                return False, None
            items.append(converted)
        return True, tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return True, value
        if isinstance(value, Mapping):  # errors inside name the nested key themselves
            return True, dataclass_from_dict(tp, value, prefix=f"{name}.", base=default if isinstance(default, tp) else None)
        return False, None
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value  # an annotation this reader does not know: taken as given


def describe(tp) -> str:
    """What an annotation allows, in the words of a YAML user: 'an integer', 'a list of 2 numbers'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        text = " or ".join(describe(a) for a in arms)
        return f"{text} or null" if type(None) in args else text
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "text"
    if origin in (tuple, list):
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            kinds = {_plural(a) for a in args}
            return f"a list of {len(args)} {kinds.pop() if len(kinds) == 1 else 'values'}, e.g. {_example(args)}"
        return f"a list of {_plural(args[0]) if args else 'values'}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} settings"
    return getattr(tp, "__name__", str(tp))


def _plural(tp) -> str:
    return {int: "integers", float: "numbers", str: "text values", bool: "true/false values"}.get(tp, "values")


def _example(args) -> str:
    sample = {int: "1", float: "0.5", str: "a", bool: "true"}
    return "[" + ", ".join(sample.get(a, "...") for a in args) + "]"


# --- `--set FIELD=VALUE` -----------------------------------------------------------------------

class _SetLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads 1e-4 and 2E+3 as numbers: PyYAML follows YAML 1.1,
    which needs a dot in a float ("1.0e-4"), while YAML 1.2 and JSON do not."""


_SetLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_set_items(items: list[str]) -> dict:
    """`FIELD=VALUE` strings -> a nested dict of settings, for `dataclass_from_dict`.

    VALUE is YAML (0.5, 1e-4, true, [-10, 60], null, text); a dotted FIELD is nested:
    ["lr=1e-3", "network.camera_dim=3"] -> {"lr": 0.001, "network": {"camera_dim": 3}}. A later
    item wins over an earlier one. Names are checked by `dataclass_from_dict`; a malformed item is
    one error line here."""
    settings: dict = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        parts = name.split(".")
        if not sep or not all(p.strip() for p in parts):
            raise ConfigError(f"bad --set {item!r}: write FIELD=VALUE, e.g. steps=100, elevation_range=[-10,60] "
                              "or network.camera_dim=3")
        try:
            value = yaml.load(text, Loader=_SetLoader)
        except yaml.YAMLError:
            raise ConfigError(f"bad --set {item!r}: VALUE must be YAML: a number, true/false, a [list], null or text") from None
        node = settings
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part.strip(), {})
            if not isinstance(child, dict):
                raise ConfigError(f"bad --set {item!r}: {'.'.join(parts[:depth + 1])} was set to {child!r} "
                                  "by an earlier --set, not to a mapping")
            node = child
        node[parts[-1].strip()] = value
    return settings


def merge_settings(base: Mapping, update: Mapping) -> dict:
    """`base` with `update` laid over it, nested mappings merged key by key (a config file, then `--set`)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_settings(merged[key], value)
        else:
            merged[key] = value
    return merged
