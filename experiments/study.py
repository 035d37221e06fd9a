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

Values follow the one grammar of `psm_jax.cli_values` (shared with `psm sae`): ints, floats, strings; bools as
true/false; `none` for optional fields; tuples as comma lists (`traits=evil,humorous`); an int tuple also takes a
half-open range `a:b` (`layers=18:26` is 18..25); a tuple of int pairs takes comma-separated ranges
(`layer_ranges=10:20,4:26`). An unknown key or a bad value is one line naming it on stderr and exit status 2.
"""
from __future__ import annotations

import importlib
import sys
import time
import types
from pathlib import Path
from typing import Callable, Sequence

from psm_jax.cli_values import UsageError, field_types, key_lines, parse_overrides, parse_value  # noqa: F401

PRESETS = ("ci", "quick", "full")
RERUN_PREFIX = ".venv/bin/python -m experiments.cli"


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


# ------------------------------------------------------------------------------------------- running


def progress_printer(name: str, quiet: bool = False) -> Callable[[str], None] | None:
    """A progress callback printing each message to stderr with the seconds since the printer was made, so a
    slow step of a study shows in its log."""
    if quiet:
        return None
    start = time.time()
    return lambda msg: print(f"[{name} {time.time() - start:6.0f} s] {msg}", file=sys.stderr, flush=True)


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
    lines = with_run_labels(mod.records(result), config)
    if record:
        from psm_jax.records import record_lines

        record_lines(lines, command or f"{RERUN_PREFIX} {mod.__name__.rsplit('.', 1)[-1]}")
    return {"result": result, "report": Path(path), "records": lines, "seconds": time.time() - t0}


def with_run_labels(lines, config) -> list[dict]:
    """Each record line with the `seed` and the `model` of the config that ran (a line that names its own keeps
    it), so runs that differ only in their seed or model stay apart in the results file and in its latest-values
    table."""
    labels = {k: getattr(config, k) for k in ("seed", "model") if getattr(config, k, None) is not None}
    return [{**ln, **{k: v for k, v in labels.items() if k not in ln}} for ln in lines]


def usage(name: str, config_cls, doc: str | None) -> str:
    head = (doc or "").strip().split("\n\n")[0]
    lines = [f"usage: psm {name} [key=value ...] [--preset {'|'.join(PRESETS)}] [--out DIR] [--record] [--quiet]",
             "", head, "", "keys (default):", *key_lines(config_cls)]
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
