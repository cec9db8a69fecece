"""From YAML to checked dataclasses: base files, dotted overrides, typed values.

``forge_lite.grpo.config`` declares a run's settings as dataclasses; this is
how text becomes them, for any nested dataclass:

- ``read_yaml(path)``: a file's mapping, on top of the file its ``base:``
  key names (a path relative to it), section by section;
- ``apply_override(values, "trainer.lr=1e-4")``: one dotted key set from the
  command line, its value parsed as YAML;
- ``build(cls, values)``: the dataclass, each value converted to its field's
  type or a ValueError naming the key (an unknown key names the keys that
  exist), so a typo fails at once instead of minutes later inside an actor.

A YAML trap handled here: PyYAML reads ``1e-5`` as the *string* "1e-5",
because YAML 1.1 floats need a dot; a float field converts it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


def read_yaml(path: str | Path, seen: tuple = ()) -> dict:
    """The values of the config file ``path``, on top of its ``base`` file's, if any.

    Raises ValueError for a file that is not a mapping, a ``base`` that is not
    a path or a ``base`` chain that loops; FileNotFoundError for a missing file.
    """
    path = Path(path)
    if path.resolve() in seen:
        raise ValueError(f"{path}: its base chain loops ({' -> '.join(map(str, seen))})")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a GRPO config is a mapping of keys to values, got {type(values).__name__}")
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ValueError(f"{path}: base must be the path of another config file, got {base!r}")
    return _merged(read_yaml(path.parent / base, (*seen, path.resolve())), values)


def _merged(base: dict, top: dict) -> dict:
    """``base`` with ``top``'s keys replacing its own; sections merge key by key."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_override(values: dict, override: str) -> None:
    """Set ``"a.b=value"`` in the nested dict ``values``; the value is parsed as YAML."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {override!r} must look like key=value, e.g. trainer.lr=1e-5")
    *parents, leaf = key.strip().split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {part!r} is a value, not a section")
    node[leaf] = yaml.safe_load(raw) if raw.strip() else None


def build(cls: type, values: dict, prefix: str = ""):
    """The dataclass ``cls`` with ``values`` (nested dicts, a parsed YAML file);
    missing keys keep their defaults. Raises ValueError naming the key (with
    ``prefix``, the dotted path of ``cls`` within the whole config) for an
    unknown key, a section that is not a mapping, or a value of the wrong type."""
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; "
            f"{('keys of ' + prefix.rstrip('.')) if prefix else 'top-level keys'}: {known}"
        )
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build(hint, value or {}, prefix + name + ".")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as the field's type, or a ValueError naming the key."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ValueError(f"{key} cannot be empty (null); give a value")
    for option in options:
        if option is type(None):
            continue
        converted = _convert(value, option)
        if converted is not _FAILED:
            return converted
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ValueError(f"{key} must be {names}, got {value!r}")


_FAILED = object()


def _convert(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        return _FAILED
    if kind is int:
        if isinstance(value, bool):
            return _FAILED
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return _FAILED
    if kind is float:
        if isinstance(value, bool):
            return _FAILED
        try:
            return float(value)  # also "1e-5", which YAML leaves a string
        except (TypeError, ValueError):
            return _FAILED
    if kind is str:
        return value if isinstance(value, str) else _FAILED
    origin = typing.get_origin(kind) or kind
    if origin in (dict, list):
        return value if isinstance(value, origin) else _FAILED
    return _FAILED
