"""YAML / dict -> typed dataclasses, with errors that name the file and the dotted key.

`from_mapping(cls, data, where)` builds `cls` recursively: nested dataclasses, Optional[...],
list[...] / tuple[...] of scalars or dataclasses, and scalars (int accepted for float; bool is not
an int). Unknown keys and wrong types raise `ConfigError` with `where: dotted.path: message`;
values checked in a dataclass's `__post_init__` (raising `ConfigError(message, key=field)`) are
re-raised as `where: dotted.path.field: message`. A dataclass may accept other names for its
fields with a class attribute `CONFIG_ALIASES = {"other_name": "field"}` (e.g. the OpenS2V
seed's `pixel_height` for `height`).

Every config of the project (run configs, their sections, `WanConfig`) is built here.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config value is invalid; the message names the file and the dotted key.

    `key`: the field (dotted, relative to the dataclass raising it) when the raiser knows it;
    `from_mapping` then prefixes the file and the path of the dataclass."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(f"{key}: {message}" if key else message)
        self.message, self.key = message, key


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last)."""


def _mapping_without_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping (safe loading: no tags that build objects; duplicate keys refused)."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def from_mapping(cls, data: Any, where: str, path: str = ""):
    """Build dataclass `cls` from `data`; `where` names the source (file), `path` the key."""
    label = f"{where}: {path}" if path else where
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    data = _resolve_aliases(cls, data, where, path)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        dotted = ", ".join(f"{path + '.' if path else ''}{k}" for k in unknown)
        raise ConfigError(f"{where}: unknown key(s) {dotted}; known here: {sorted(fields)}")
    kwargs = {name: _convert(hints[name], value, where, f"{path}.{name}" if path else name)
              for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if exc.key:
            raise ConfigError(f"{where}: {path + '.' if path else ''}{exc.key}: {exc.message}") from exc
        raise ConfigError(f"{label}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{label}: {exc}") from exc


def _resolve_aliases(cls, data: dict, where: str, path: str) -> dict:
    aliases = getattr(cls, "CONFIG_ALIASES", {})
    out = dict(data)
    for alias, name in aliases.items():
        if alias in out:
            if name in out:
                dotted = f"{path + '.' if path else ''}"
                raise ConfigError(f"{where}: {dotted}{alias} and {dotted}{name} are the same setting: give one")
            out[name] = out.pop(alias)
    return out


def _convert(tp, value, where: str, path: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {path}: {value!r} matches none of {args}")
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_mapping(tp, value, where, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {path}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: {path}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, where, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_convert(item, v, where, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {path}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {path}: must be one of {list(args)}, got {value!r}")
        return value
    return _scalar(tp, value, where, path)


def _scalar(tp, value, where: str, path: str):
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    if tp is Path and isinstance(value, str):
        return Path(value)
    if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: {path}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__} {value!r}")
