"""What every loader in this package shares: the error type, the packaged data folder, JSON reading and the
schema checker whose messages name the file, the field and what was expected.

Kept apart from the loaders so that each data kind's module holds only its own schema, and so that every file
fails in the same words (``<file>: field '<path>': expected ..., got ...``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import string
from importlib import resources
from pathlib import Path
from typing import Any, Sequence, Union

SCHEMA_VERSION = 1
MAX_WORD_GAP = 3  # paired answers (two-choice items, jailbreak answers) differ by at most this many words

PathLike = Union[str, "os.PathLike[str]"]


class DatasetError(ValueError):
    """A data file is missing, unreadable or does not match its schema."""


def data_root():
    """The packaged data folder (an importlib.resources Traversable; a Path for a normal install)."""
    return resources.files("psm_jax.persona").joinpath("data")


def _norm_text(s: str) -> str:
    return " ".join(s.split()).casefold()


def _words(text: str) -> int:
    return len(text.split())


def _is_path(x: Any) -> bool:
    if isinstance(x, os.PathLike):
        return True
    return isinstance(x, str) and (x.endswith(".json") or "/" in x or os.sep in x)


def _packaged(*parts: str):
    node = data_root()
    for p in parts:
        node = node.joinpath(p)
    return node


def _src(path: PathLike | None, *default: str):
    return Path(path) if path is not None else _packaged(*default)


def _read_json(src) -> Any:
    name = str(src)
    try:
        if not src.is_file():
            raise DatasetError(f"{name}: file not found")
        text = src.read_text(encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"{name}: cannot read file: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{name}: invalid JSON: {e}") from e


def _typename(x: Any) -> str:
    return type(x).__name__


def _open(src) -> tuple["_Checker", dict]:
    """The checker of data file `src` and its top-level object (its schema version already checked)."""
    c = _Checker(str(src))
    return c, c.top(_read_json(src))


class _Checker:
    """Schema checks that raise DatasetError('<file>: field '<path>': expected ..., got ...')."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, field: str, expected: str, got: Any = dataclasses.MISSING) -> None:
        msg = f"{self.source}: field '{field}': expected {expected}"
        if got is not dataclasses.MISSING:
            msg += f", got {got}"
        raise DatasetError(msg)

    def top(self, data: Any) -> dict:
        if not isinstance(data, dict):
            raise DatasetError(f"{self.source}: expected a JSON object at top level, got {_typename(data)}")
        self.version(data)
        return data

    def version(self, d: dict) -> int:
        if "schema_version" not in d:
            raise DatasetError(f"{self.source}: field 'schema_version' is missing (required: an integer "
                               f"from 1 to {SCHEMA_VERSION})")
        v = d["schema_version"]
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= SCHEMA_VERSION:
            self.fail("schema_version", f"an integer from 1 to {SCHEMA_VERSION}", repr(v))
        return v

    def obj(self, x: Any, ctx: str, fields: str) -> dict:
        """`x` itself, which must be a JSON object (`fields`: what it should hold, named in the error)."""
        if not isinstance(x, dict):
            self.fail(ctx, f"an object with {fields}", _typename(x))
        return x

    def field(self, d: dict, key: str, ctx: str = "") -> Any:
        path = f"{ctx}.{key}" if ctx else key
        if not isinstance(d, dict):
            self.fail(ctx or key, "an object", _typename(d))
        if key not in d:
            raise DatasetError(f"{self.source}: field '{path}' is missing (required)")
        return d[key]

    def string(self, d: dict, key: str, ctx: str = "", allow_empty: bool = False) -> str:
        path = f"{ctx}.{key}" if ctx else key
        v = self.field(d, key, ctx)
        if not isinstance(v, str):
            self.fail(path, "a string", _typename(v))
        if not allow_empty and not v.strip():
            self.fail(path, "a non-empty string", "an empty string")
        return v

    def opt_string(self, d: dict, key: str, ctx: str = "") -> str | None:
        if key not in d or d[key] is None:
            return None
        return self.string(d, key, ctx)

    def array(self, d: dict, key: str, ctx: str = "", min_len: int = 0, what: str = "items") -> list:
        path = f"{ctx}.{key}" if ctx else key
        v = self.field(d, key, ctx)
        if not isinstance(v, list):
            self.fail(path, f"a list of {what}", _typename(v))
        if len(v) < min_len:
            self.fail(path, f"at least {min_len} {what}", f"{len(v)}")
        return v

    def strings(self, d: dict, key: str, ctx: str = "", min_len: int = 0, unique: bool = True,
                allow_empty: bool = False) -> tuple[str, ...]:
        path = f"{ctx}.{key}" if ctx else key
        v = self.array(d, key, ctx, min_len, "strings")
        seen: dict[str, int] = {}
        for i, s in enumerate(v):
            if not isinstance(s, str):
                self.fail(f"{path}[{i}]", "a string", _typename(s))
            if not allow_empty and not s.strip():
                self.fail(f"{path}[{i}]", "a non-empty string", "an empty string")
            k = _norm_text(s)
            if unique and k in seen:
                self.fail(f"{path}[{i}]", f"no duplicates, but it repeats item {seen[k]}", repr(s))
            seen[k] = i
        return tuple(v)

    def template(self, text: str, field: str, required: Sequence[str], allowed: Sequence[str] | None = None) -> None:
        """``text`` must format with str.format using exactly the named placeholders."""
        allowed = set(required if allowed is None else allowed)
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
        except ValueError as e:
            self.fail(field, f"a str.format template with placeholders {sorted(required)}",
                      f"a malformed template ({e})")
        missing = [r for r in required if r not in names]
        if missing:
            self.fail(field, "a template containing " + ", ".join("{" + r + "}" for r in required),
                      "no " + ", ".join("{" + m + "}" for m in missing))
        extra = sorted(n for n in names if n not in allowed)
        if extra:
            self.fail(field, "only the placeholders " + ", ".join("{" + a + "}" for a in sorted(allowed))
                      + " (write literal braces as {{ and }})",
                      ", ".join("{" + e + "}" for e in extra))
