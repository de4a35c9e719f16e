"""Strict parsing of nested dicts (from YAML) into annotated dataclasses: unknown keys and wrong types raise
:class:`RecipeError` naming the key path (``stages[2].lr: expected float, got str 'fast'``)."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal, Union

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class RecipeError(ValueError):
    """A recipe is malformed; the message starts with the key path of the offending value."""


def check_positive(value: float | int, path: str, allow_zero: bool = False) -> None:
    """Raise :class:`RecipeError` at ``path`` unless ``value`` > 0 (>= 0 with ``allow_zero``)."""
    if value < 0 or (value == 0 and not allow_zero):
        raise RecipeError(f"{path}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def describe(value: Any) -> str:
    """Type and (shortened) repr of a value, for error messages: ``str 'fast'``."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if all(dataclasses.is_dataclass(a) for a in args):
            return "one of the types " + ", ".join(repr(_literal_type(a)) for a in args)
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(typing.get_args(tp)) else inner
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        val = typing.get_args(tp)[1]
        return "mapping" if val is Any else f"mapping of {_type_name(val)}"
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if tp is Any:
        return "any value"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _literal_type(cls: type) -> str:
    return typing.get_args(typing.get_type_hints(cls)["type"])[0]


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build dataclasses; raises RecipeError naming ``path``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise RecipeError(f"{path}: expected {_type_name(tp)}, got null")
        choices = [a for a in args if a is not type(None)]
        if all(dataclasses.is_dataclass(a) for a in choices) and len(choices) > 1:
            return _convert_tagged(value, choices, path)
        errors = []
        for a in choices:
            try:
                return _convert(value, a, path)
            except RecipeError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise RecipeError(f"{path}: expected {_type_name(tp)}, got {describe(value)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise RecipeError(f"{path}: expected {_type_name(tp)}, got {describe(value)}")
        return value
    if origin is tuple:  # only the homogeneous tuple[X, ...] form (VQConfig.channel_mult)
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{path}: expected list of {_type_name(typing.get_args(tp)[0])}, got {describe(value)}")
        item = typing.get_args(tp)[0]
        return tuple(_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{path}: expected {_type_name(tp)}, got {describe(value)}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected {_type_name(tp)}, got {describe(value)}")
        key_tp, val_tp = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise RecipeError(f"{path}: keys must be strings, got {describe(k)}")
            out[k] = _convert(v, val_tp, f"{path}.{k}")
        return out
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: expected bool, got {describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{path}: expected int, got {describe(value)}")
        return value
    if tp is float:
        # PyYAML (YAML 1.1) reads "1e-3" (no dot) as a string; accept numbers written that way.
        if isinstance(value, str) and _NUMBER.fullmatch(value):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{path}: expected float, got {describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{path}: expected str, got {describe(value)}")
        return value
    raise TypeError(f"recipe annotation {tp!r} at {path} is not supported")  # a bug in this file, not in the recipe


def _convert_tagged(value: Any, choices: list[type], path: str) -> Any:
    tags = {_literal_type(c): c for c in choices}
    if not isinstance(value, dict):
        raise RecipeError(f"{path}: expected a mapping with a 'type' key, got {describe(value)}")
    if "type" not in value:
        raise RecipeError(f"{path}: missing 'type'; use one of {sorted(tags)}")
    cls = tags.get(value["type"])
    if cls is None:
        raise RecipeError(f"{path}.type: unknown type {value['type']!r}; use one of {sorted(tags)}")
    return build(cls, value, path)


def build(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking every key and value against its annotations."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path or 'recipe'}: expected a mapping, got {describe(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{path}." if path else ""
    unknown = [k for k in data if k not in names]
    if unknown:
        raise RecipeError(f"{prefix}{unknown[0]}: unknown key; known keys here are {names}")
    kwargs = {k: _convert(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)
