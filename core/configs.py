"""Dataclass configs (nested ones too) read from TOML files and `section.key=value` overrides, checked by type."""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path


class ConfigError(ValueError):
    """A config file or override that does not fit the config's fields or their types."""


def config_fields(cls) -> dict[str, dataclasses.Field]:
    """The fields of dataclass `cls` by name, with their types resolved (string annotations included)."""
    hints = typing.get_type_hints(cls)
    fields = {}
    for f in dataclasses.fields(cls):
        f.type = hints.get(f.name, f.type)
        fields[f.name] = f
    return fields


def _is_dataclass_type(kind) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _options(kind) -> tuple[tuple, bool]:
    """The non-None members of a type (X | None -> (X,)) and whether None is allowed."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        members = typing.get_args(kind)
        return tuple(m for m in members if m is not type(None)), type(None) in members
    return (kind,), kind is type(None)


def coerce(value, kind, where: str):
    """`value` (from TOML, or a string from the command line) as type `kind`, or a ConfigError naming `where`."""
    members, nullable = _options(kind)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and nullable):
        if nullable:
            return None
        raise ConfigError(f"{where} cannot be empty")
    errors = []
    for member in members:
        try:
            return _coerce_one(value, member)
        except (TypeError, ValueError) as exc:
            errors.append(str(exc))
    names = " or ".join(getattr(m, "__name__", str(m)) for m in members)
    raise ConfigError(f"{where} must be {names}, got {value!r}" + (f" ({errors[0]})" if errors else ""))


def _coerce_one(value, kind):
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError("not a boolean")
    if kind is int:
        if isinstance(value, bool):
            raise ValueError("not a whole number")
        number = float(value)
        if not math.isfinite(number) or number != int(number):
            raise ValueError("not a whole number")
        return int(number)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError("not a number")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ValueError("not a string")
        return value
    if kind is typing.Any:
        return value
    raise TypeError(f"unsupported config type {kind!r}")


def config_from_dict(cls, data: dict, where: str = ""):
    """An instance of dataclass `cls` from a (nested) dict; unknown keys and wrong types are ConfigErrors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a table of settings, got {data!r}")
    fields = config_fields(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(where + k for k in unknown)}"
                          f"; {cls.__name__} has {', '.join(where + k for k in fields)}")
    values = {}
    for name, value in data.items():
        kind = fields[name].type
        if _is_dataclass_type(kind):
            values[name] = config_from_dict(kind, value, f"{where}{name}.")
        else:
            values[name] = coerce(value, kind, where + name)
    return cls(**values)


def config_as_dict(config) -> dict:
    return dataclasses.asdict(config)


def apply_override(data: dict, cls, text: str) -> None:
    """Apply one `section.key=value` override to the nested dict `data` of dataclass `cls` (the value is typed by
    the field it names, so `model.d_model=256` is an int and `max_minutes=none` clears an optional setting)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set wants key=value (e.g. model.d_model=256), got {text!r}")
    path = key.split(".")
    target, kind = data, cls
    for depth, part in enumerate(path):
        fields = config_fields(kind)
        if part not in fields:
            prefix = ".".join(path[:depth])
            raise ConfigError(f"unknown setting {key!r}: {kind.__name__}{' (' + prefix + ')' if prefix else ''} has "
                              f"{', '.join(fields)}")
        field_type = fields[part].type
        if depth < len(path) - 1:
            if not _is_dataclass_type(field_type):
                raise ConfigError(f"{'.'.join(path[:depth + 1])} is a single setting, not a section")
            target = target.setdefault(part, {})
            kind = field_type
        else:
            if _is_dataclass_type(field_type):
                raise ConfigError(f"{key} is a section; set one of its keys ({', '.join(config_fields(field_type))})")
            target[part] = coerce(raw.strip(), field_type, key)


def load_config(cls, path: str | Path | None = None, overrides=(), base: dict | None = None):
    """dataclass `cls` from `base` (a nested dict of settings), then the TOML file at `path`, then the overrides."""
    data = _deep_copy(base or {})
    if path is not None:
        try:
            file_data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
        _merge(data, file_data)
    for text in overrides:
        apply_override(data, cls, text)
    return config_from_dict(cls, data)


def _deep_copy(data: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def _merge(into: dict, other: dict) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
