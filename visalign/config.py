"""YAML recipes -> typed dataclasses, with errors that teach and ``key=value`` overrides.

A recipe is a YAML mapping whose keys are the fields of a (possibly nested) dataclass::

    cfg = load_config("configs/toy/flow_grpo.yaml", TrainConfig, overrides=["trainer.lr=1e-4"])

- An unknown key is an error that names the key, where it is, and the nearest valid key.
- Values are converted to the field's annotated type (int, float, bool, str, tuples, lists,
  ``X | None``, nested dataclasses); a value that does not convert names the field and type.
- ``key=value`` overrides use dotted paths for nested sections; the value is parsed as YAML
  (``lr=3e-4``, ``steps=[0,1]``, ``name=null``).
- Dataclasses validate cross-field constraints in their own ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from .errors import UsageError

__all__ = ["ConfigError", "from_dict", "to_dict", "load_config", "read_yaml", "apply_overrides", "save_config"]

T = TypeVar("T")


class ConfigError(UsageError):
    """A recipe that does not fit its dataclass; the message says what to change."""


def _nearest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} fits none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where=where)
    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_convert(v, inner, f"{where}[{k}]") for k, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        inner = [args[0]] * len(value) if (args and args[-1] is Ellipsis) else (args or [Any] * len(value))
        return tuple(_convert(v, t, f"{where}[{k}]") for k, (v, t) in enumerate(zip(value, inner)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {str(k): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, (int, float)):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, *, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking every key and converting every value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(
                f"unknown key {path!r} in {cls.__name__}.{_nearest(str(key), list(fields))} "
                f"Valid keys: {', '.join(fields)}"
            )
        kwargs[key] = _convert(value, hints[key], path)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def to_dict(obj: Any) -> Any:
    """A dataclass as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b=value`` overrides to a nested mapping (values parsed as YAML)."""
    data = dict(data)
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. trainer.lr=1e-4)")
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def read_yaml(path: str | Path | None) -> dict:
    """The mapping in a YAML recipe (``{}`` for ``None``); errors name the file and what is wrong.

    ``path`` is a file, or the name of a recipe that ships with visalign (``toy/nft_cn``; a missing
    ``configs/toy/nft_cn.yaml`` also finds the shipped copy): :mod:`visalign.recipes`."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            from . import recipes

            shipped = recipes.find(path)
            if shipped is None:
                raise ConfigError(f"config file {str(path)!r} not found: {recipes.describe(path)}")
            path = shipped
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, cls: type[T], overrides: Sequence[str] = ()) -> T:
    """Read a YAML recipe (or start from defaults when ``path`` is None), apply overrides, build ``cls``."""
    return from_dict(cls, apply_overrides(read_yaml(path), overrides))


def save_config(obj: Any, path: str | Path) -> None:
    """Write a dataclass as YAML, atomically."""
    from .io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))
