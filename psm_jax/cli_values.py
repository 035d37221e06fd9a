"""The one command-line value grammar: `key=value` text turned into a typed dataclass field value.

Both command lines use it: the studies (`psm <study> key=value`, experiments/study.py) and the SAE trainer
(`psm sae train section.key=value`, sae/cli.py), so a value is spelled the same way everywhere. It lives in the
port package because `sae` must not import `experiments`.

Values by field type: ints, floats, strings; bools as true/false (also 1/0, yes/no, on/off); `none` for an optional
field; tuples as comma lists (`traits=evil,humorous`); an int tuple also takes a half-open range `a:b`
(`layers=18:26` is 18..25); a tuple of int pairs takes comma-separated ranges (`layer_ranges=10:20,4:26`). A key the
dataclass lacks or a value its type rejects raises `UsageError` naming the key, the value and what was expected.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Sequence

TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class UsageError(ValueError):
    """A command line that does not fit the grammar (the command lines exit with status 2)."""


def _parse_scalar(kind, text: str, key: str):
    if kind is bool:
        low = text.strip().lower()
        if low in TRUE:
            return True
        if low in FALSE:
            return False
        raise UsageError(f"{key}={text!r}; expected true or false")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise UsageError(f"{key}={text!r}; expected an integer") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise UsageError(f"{key}={text!r}; expected a number") from None
    if kind is str:
        return text
    raise UsageError(f"{key}: fields of type {kind} cannot be set from the command line")


def _int_range(text: str, key: str) -> tuple[int, int]:
    a, _, b = text.partition(":")
    try:
        lo, hi = int(a), int(b)
    except ValueError:
        raise UsageError(f"{key}={text!r}; expected a range a:b of integers") from None
    if hi <= lo:
        raise UsageError(f"{key}={text!r}; expected a range a:b with b > a (half-open)")
    return lo, hi


def parse_value(annotation, text: str, key: str):
    """`text` as a value of the field type `annotation` (the grammar in the module doc)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if text.strip().lower() == "none" and len(inner) < len(args):
            return None
        if len(inner) != 1:
            raise UsageError(f"{key}: fields of type {annotation} cannot be set from the command line")
        return parse_value(inner[0], text, key)
    if origin is tuple:
        item = args[0] if args else str
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if typing.get_origin(item) is tuple:  # tuple[tuple[int, int], ...]: ranges
            return tuple(_int_range(p, key) for p in parts)
        out: list = []
        for p in parts:
            if item is int and ":" in p:
                lo, hi = _int_range(p, key)
                out.extend(range(lo, hi))
            else:
                out.append(_parse_scalar(item, p, key))
        return tuple(out)
    return _parse_scalar(annotation, text, key)


def field_types(config_cls) -> dict[str, Any]:
    """Field name -> resolved type annotation of a dataclass."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def split_pair(pair: str) -> tuple[str, str]:
    """`key=value` -> (key, value text); the value may itself contain '='."""
    key, eq, text = pair.partition("=")
    if not eq or not key:
        raise UsageError(f"argument {pair!r}; expected key=value")
    return key, text


def parse_overrides(config_cls, pairs: Sequence[str]) -> dict[str, Any]:
    """key=value strings -> typed field values for `config_cls` (UsageError naming an unknown key or bad value)."""
    types_ = field_types(config_cls)
    out = {}
    for pair in pairs:
        key, text = split_pair(pair)
        if key not in types_:
            raise UsageError(f"unknown key {key!r}; expected one of {', '.join(types_)}")
        out[key] = parse_value(types_[key], text, key)
    return out


def field_defaults(config_cls) -> dict[str, Any]:
    """Field name -> default value (fields without a default are left out)."""
    out = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def key_lines(config_cls, prefix: str = "") -> list[str]:
    """`  prefix.key=default` help lines, one per field of `config_cls`."""
    defaults = field_defaults(config_cls)
    return [f"  {prefix}{f.name}={defaults[f.name]!r}" if f.name in defaults else f"  {prefix}{f.name} (required)"
            for f in dataclasses.fields(config_cls)]
