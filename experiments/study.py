"""The study contract and the one command-line grammar every study shares.

A study is a module with

    Config                      a frozen dataclass: every knob, with defaults (the `full` preset)
    PRESETS                     {"ci": {...}, "quick": {...}, "full": {}}: field overrides per named size
    run(config, model, progress) -> Result      compute only: no files, no printing (progress: a callable
                                                taking one status string, or None)
    report(result, folder) -> Path              report.md, PNGs, metrics.json, config.json, vectors (atomic)
    records(result) -> list[dict]               lines for benchmarks/results.jsonl (psm_jax.records fields
                                                without command, machine and date)

and optionally

    prepare(config, model, progress) -> config  the cache step: builds an expensive artefact that later runs
                                                reuse (persona features: the trained SAE under `sae_cache`),
                                                writing only there, and returns the config that points at it

`execute(module, config, folder=...)` runs a study end to end (loads the model named by `config.model` unless
given, prepares, runs, reports, and with `record=True` appends the records). The command line is generated from
`Config`:

    psm <study> [key=value ...] [--preset ci|quick|full] [--out DIR] [--record] [--quiet]

Values: ints, floats, strings; bools as true/false (also 1/0, yes/no); `none` for optional fields; tuples as
comma lists (`traits=evil,humorous`); an int tuple also takes a half-open range `a:b` (`layers=18:26` is 18..25);
a tuple of int pairs takes comma-separated ranges (`layer_ranges=10:20,4:26`). An unknown key or a bad value is
one line naming it on stderr and exit status 2.
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

PRESETS = ("ci", "quick", "full")
RERUN_PREFIX = ".venv/bin/python -m experiments.cli"
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class UsageError(ValueError):
    """A command line that does not fit the grammar (exit status 2)."""


def load_study(module: str | types.ModuleType) -> types.ModuleType:
    """The study module, checked to expose the contract."""
    mod = importlib.import_module(module) if isinstance(module, str) else module
    missing = [n for n in ("Config", "PRESETS", "run", "report", "records") if not hasattr(mod, n)]
    if missing:
        raise TypeError(f"study module {mod.__name__} lacks {missing}; expected Config, PRESETS, run, report and "
                        "records")
    return mod


def preset_config(module, preset: str = "full", **overrides):
    """`module.Config` at a named preset, with field overrides (typed values) on top."""
    mod = load_study(module)
    if preset not in mod.PRESETS:
        raise UsageError(f"preset {preset!r}; expected one of {', '.join(mod.PRESETS)}")
    return mod.Config(**{**mod.PRESETS[preset], **overrides})


# ------------------------------------------------------------------------------------------- value grammar


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
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def parse_overrides(config_cls, pairs: Sequence[str]) -> dict[str, Any]:
    """key=value strings -> typed field values for `config_cls` (UsageError naming an unknown key or bad value)."""
    types_ = field_types(config_cls)
    out = {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        if not eq or not key:
            raise UsageError(f"argument {pair!r}; expected key=value")
        if key not in types_:
            raise UsageError(f"unknown key {key!r}; expected one of {', '.join(types_)}")
        out[key] = parse_value(types_[key], text, key)
    return out


# ------------------------------------------------------------------------------------------- running


def progress_printer(name: str, quiet: bool = False) -> Callable[[str], None] | None:
    if quiet:
        return None
    return lambda msg: print(f"[{name}] {msg}", file=sys.stderr, flush=True)


def execute(module, config, *, folder: str | Path, model=None, progress=None, record: bool = False,
            command: str | None = None) -> dict:
    """Run a study end to end: {result, report (path), records (lines), seconds}."""
    mod = load_study(module)
    if model is None:
        import psm_jax

        model = psm_jax.load(config.model)
    t0 = time.time()
    if hasattr(mod, "prepare"):
        config = mod.prepare(config, model, progress)
    result = mod.run(config, model, progress)
    path = mod.report(result, Path(folder))
    lines = list(mod.records(result))
    if record:
        from psm_jax.records import record_lines

        record_lines(lines, command or f"{RERUN_PREFIX} {mod.__name__.rsplit('.', 1)[-1]}")
    return {"result": result, "report": Path(path), "records": lines, "seconds": time.time() - t0}


def usage(name: str, config_cls, doc: str | None) -> str:
    head = (doc or "").strip().split("\n\n")[0]
    lines = [f"usage: psm {name} [key=value ...] [--preset {'|'.join(PRESETS)}] [--out DIR] [--record] [--quiet]",
             "", head, "", "keys (default):"]
    for f in dataclasses.fields(config_cls):
        lines.append(f"  {f.name}={f.default!r}")
    return "\n".join(lines)


def main_for(name: str, module, argv: Sequence[str]) -> int:
    """`psm <name> ...` for one study: parse, run, print the report path and the record lines."""
    mod = load_study(module)
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage(name, mod.Config, mod.__doc__))
        return 0
    preset, out, record, quiet, pairs = "full", f"runs/{name.replace('-', '_')}", False, False, []
    try:
        it = iter(argv)
        for a in it:
            if a in ("--preset", "--out"):
                value = next(it, None)
                if value is None:
                    raise UsageError(f"{a} needs a value")
                preset, out = (value, out) if a == "--preset" else (preset, value)
            elif a == "--record":
                record = True
            elif a == "--quiet":
                quiet = True
            elif a.startswith("-"):
                raise UsageError(f"unknown option {a!r}; expected --preset, --out, --record, --quiet or key=value")
            else:
                pairs.append(a)
        config = preset_config(mod, preset, **parse_overrides(mod.Config, pairs))
    except (UsageError, ValueError, TypeError) as err:
        print(f"psm {name}: {err}", file=sys.stderr)
        return 2
    command = " ".join([RERUN_PREFIX, name, *argv])
    res = execute(mod, config, folder=out, progress=progress_printer(name, quiet), record=record, command=command)
    print(f"report: {res['report']}")
    return 0
