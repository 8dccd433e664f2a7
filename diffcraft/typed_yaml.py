"""Typed YAML configs: a YAML mapping maps one to one onto nested dataclasses.

An unknown field, a wrong type or a bad choice raises ConfigError naming the dotted field path,
so `train.lr: expected a number, got 'fast'` points straight at the line to fix; `json_schema`
exports the same rules for editors.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from diffcraft.errors import ConfigError


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, where: str):
    """Check and convert one YAML value to the annotated type `tp`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
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
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_rest) = get_args(tp) or (Any,)
        items = [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _key_tp, val_tp = get_args(tp) or (Any, Any)
        return {k: _convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if hasattr(tp, "from_yaml"):  # a type that parses itself
        return tp.from_yaml(value, where)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def from_dict(cls, data: dict | None, where: str = ""):
    """Build dataclass `cls` from a mapping; unknown or ill-typed fields raise ConfigError."""
    data = {} if data is None else data
    label = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown field {prefix}{unknown[0]} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{where}.{name}" if where else name)
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{label}: {err}") from None
    check = getattr(obj, "validate", None)
    if check is not None:
        check(where)
    return obj


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str):
    """YAML text to Python data, with `1e-3` read as a number."""
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, naming the file on any parse error."""
    path = Path(path)
    try:
        data = parse_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _require_field(node, name: str, where: str) -> None:
    known = [f.name for f in dataclasses.fields(node) if f.init]
    if name not in known:
        raise ConfigError(f"unknown field {where + '.' if where else ''}{name} (known: {', '.join(sorted(known))})")


def _sections(obj, key: str, parts: list[str]) -> list[tuple[str, Any]]:
    """[(where, dataclass)] from `obj` down the dotted `parts`, each an existing section."""
    chain, where = [("", obj)], ""
    for part in parts:
        _require_field(chain[-1][1], part, where)
        where = f"{where}.{part}" if where else part
        child = getattr(chain[-1][1], part)
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f"{key}: {part} is not a section")
        chain.append((where, child))
    return chain


def with_values(obj, values: dict[str, Any]):
    """A copy of dataclass `obj` with each dotted field in `values` set, the value checked and
    converted as `from_dict` would (an error names the field) and every section on its path
    validated again: the typed way to apply searched values to a config."""
    out = copy.deepcopy(obj)
    for key, value in values.items():
        *parents, leaf = key.strip().split(".")
        chain = _sections(out, key, parents)
        where, node = chain[-1]
        _require_field(node, leaf, where)
        hint = typing.get_type_hints(type(node))[leaf]
        setattr(node, leaf, _convert(value, hint, f"{where}.{leaf}" if where else leaf))
        for section_where, section in reversed(chain):
            check = getattr(section, "validate", None)
            if check is not None:
                check(section_where)
    return out


def set_dotted(data: dict, key: str, value) -> dict:
    """Set `a.b.c` in a nested mapping, creating sections on the way; the one dotted-key setter
    for command-line overrides and searched study parameters alike."""
    node = data
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[leaf] = value
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides (value parsed as YAML) to a nested config mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not FIELD=VALUE")
        key, raw = item.split("=", 1)
        try:
            set_dotted(data, key, parse_yaml(raw))
        except ConfigError as err:
            raise ConfigError(f"override {item!r}: {err}") from None
    return data


def to_plain(obj):
    """The YAML (and JSON) data of a config: dataclasses as mappings, a type that parses itself
    (`from_yaml`) as its `to_yaml()` says, tuples as lists; what `from_dict` reads back."""
    if hasattr(obj, "to_yaml"):
        return obj.to_yaml()
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {key: to_plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(value) for value in obj]
    return obj


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: the form logged as MLflow params."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def _field_comments(cls) -> dict[str, str]:
    """{field: its trailing `# comment`} from the dataclass source (empty when there is none)."""
    import inspect

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+?)\s*$", source, re.M))


def _type_schema(tp) -> dict:
    """JSON Schema of one annotated type, as `_convert` accepts it."""
    origin = get_origin(tp)
    if tp is Any:
        return {}
    if origin in (Union, types.UnionType):
        return {"anyOf": [{"type": "null"} if arg is type(None) else _type_schema(arg) for arg in get_args(tp)]}
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    if origin in (list, tuple):
        (item_tp, *_rest) = get_args(tp) or (Any,)
        return {"type": "array", "items": _type_schema(item_tp)}
    if origin is dict:
        _key_tp, val_tp = get_args(tp) or (Any, Any)
        return {"type": "object", "additionalProperties": _type_schema(val_tp)}
    if hasattr(tp, "yaml_schema"):
        return tp.yaml_schema()
    if dataclasses.is_dataclass(tp):
        return json_schema(tp)
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if tp in simple:
        return {"type": simple[tp]}
    raise ConfigError(f"no JSON Schema for field type {_type_name(tp)}")


def json_schema(cls) -> dict:
    """JSON Schema of the YAML that `from_dict(cls, ...)` accepts: types, choices, defaults, the
    fields' comments as descriptions, no unknown fields. A class attribute JSON_SCHEMA
    ({field: schema}) replaces a field's derived schema. Range checks in `validate()` stay there."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    overrides = getattr(cls, "JSON_SCHEMA", {})
    properties, required = {}, []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        schema = dict(overrides.get(f.name) or _type_schema(hints[f.name]))
        if f.name in comments:
            schema.setdefault("description", comments[f.name])
        if f.default is not dataclasses.MISSING:
            schema["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            if not dataclasses.is_dataclass(value):
                schema["default"] = value
        else:
            required.append(f.name)
        properties[f.name] = schema
    doc = (cls.__doc__ or "").strip()
    out = {"type": "object", "title": cls.__name__, "properties": properties, "additionalProperties": False}
    if doc and not doc.startswith(f"{cls.__name__}("):  # not the signature dataclass makes up
        out["description"] = doc.splitlines()[0]
    if required:
        out["required"] = required
    return out
