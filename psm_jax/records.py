"""Lines of `benchmarks/results.jsonl`: benchmark and research figures, one JSON object per line.

    record(metric, value, unit, reference, target=None, command=None, **extra) -> dict

Each line has metric, value, unit, reference (what the number is compared with, n, seeds), target, command (the
command line that re-runs it from the repo root), machine and date; `extra` keys (e.g. `key`, `trait`, `mode`)
identify one of several lines of a metric. Studies return such dicts from `records(result)` (without command,
machine and date) and the `psm ... --record` runner passes them here; benchmark scripts call `record` directly.

A research line states its evidence in optional fields that every study fills the same way, so that one table
(`evidence`) can show any study's headline with its interval and its null:
    ci       [low, high]: the 95% interval of `value`, or of the quantity `ci_of` names where the value is derived
             from it (a z, an interval's end, a count)
    ci_of    what `ci` is an interval of, when not of `value` itself
    null     the null the value is compared with and its band, in words ("20 random directions at matched norm:
             [-0.02, +0.03]"), or why there is none ("none: descriptive")

The file is `$PSM_RESULTS` when set, else `benchmarks/results.jsonl` of the checkout this package lives in. A line is
appended with one `write` on a file opened in append mode, so concurrent writers never interleave within a line.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import sys
from numbers import Real
from pathlib import Path

from psm_jax.native.build import cpu_flags

REPO = Path(__file__).resolve().parent.parent
REQUIRED = ("metric", "value", "unit", "reference")


def results_path() -> Path:
    return Path(os.environ.get("PSM_RESULTS") or REPO / "benchmarks" / "results.jsonl")


def machine() -> str:
    """CPU model, its widest vector instructions, core count and the JAX accelerator, e.g.
    'AMD EPYC (avx2); 2 cores; cpu:cpu'.

    Cloud machines often report only a family name ('AMD EPYC'), behind which CPUs with and without AVX-512 run the
    same code at very different speeds; the instruction set keeps their ratios apart."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    isa = vector_isa(cpu_flags().split())
    if isa:
        cpu = f"{cpu} ({isa})"
    try:
        import jax

        dev = jax.devices()[0]
        accel = f"{dev.platform}:{getattr(dev, 'device_kind', '')}"
    except Exception:  # noqa: BLE001 - no usable backend is still a machine description
        accel = "unknown"
    return f"{cpu}; {os.cpu_count()} cores; {accel}"


def vector_isa(flags: list[str]) -> str:
    """The widest x86 vector extensions among /proc/cpuinfo `flags`: 'avx512+bf16+amx', 'avx512', 'avx2', ... or
    '' where none is listed (other architectures)."""
    have = set(flags)
    if "avx512f" in have:
        extras = [name for flag, name in (("avx512_bf16", "bf16"), ("amx_tile", "amx")) if flag in have]
        return "+".join(["avx512", *extras])
    for flag in ("avx2", "avx", "sse4_2"):
        if flag in have:
            return flag
    return ""


def command_line() -> str:
    """The command that re-runs the current script from the repo root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
    return " ".join([".venv/bin/python", shlex.quote(script)] + [shlex.quote(a) for a in sys.argv[1:]])


def check_line(line: dict) -> dict:
    """A record line with the required fields of the right types (ValueError naming the field otherwise)."""
    if not isinstance(line, dict):
        raise TypeError(f"a record line must be a dict; got {type(line).__name__}")
    for key in REQUIRED:
        if key not in line:
            raise ValueError(f"record line {line!r} has no {key!r}; expected the fields {REQUIRED}")
    for key in ("metric", "unit", "reference"):
        if not isinstance(line[key], str) or not line[key]:
            raise ValueError(f"record field {key}={line[key]!r}; expected a non-empty string")
    v = line["value"]
    if isinstance(v, bool) or not isinstance(v, (Real, str)) or (isinstance(v, float) and v != v):
        raise ValueError(f"record value {v!r} for {line['metric']!r}; expected a finite number or a string")
    _check_evidence(line)
    return line


def _check_evidence(line: dict) -> None:
    ci = line.get("ci")
    if ci is not None:
        ok = (isinstance(ci, (list, tuple)) and len(ci) == 2
              and all(isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x) for x in ci)
              and ci[0] <= ci[1])
        if not ok:
            raise ValueError(f"record field ci={ci!r} for {line['metric']!r}; expected [low, high], finite, "
                             "low <= high")
    for key in ("null", "ci_of"):
        if key in line and line[key] is not None and (not isinstance(line[key], str) or not line[key].strip()):
            raise ValueError(f"record field {key}={line[key]!r} for {line['metric']!r}; expected a non-empty string")


def interval_text(low: float, high: float) -> str:
    """`[low, high]` with 3 significant digits, signed when the interval reaches below 0."""
    f = "+.3g" if min(low, high) < 0 else ".3g"
    return f"[{low:{f}}, {high:{f}}]"


def evidence(line: dict) -> dict[str, str]:
    """The interval and null cells of a research line for a headline table: {"interval", "null"}; "n/a" where the
    line states none (a benchmark line, or a line written before the fields existed)."""
    ci = line.get("ci")
    interval = "n/a"
    if ci is not None:
        interval = interval_text(*ci) + (f" ({line['ci_of']})" if line.get("ci_of") else "")
    return {"interval": interval, "null": line.get("null") or "n/a"}


def record(metric: str, value, unit: str, reference: str, target: str | None = None, command: str | None = None,
           **extra) -> dict:
    """Append one line to the results file and print it; returns the line."""
    row = check_line({"metric": metric, "value": value, "unit": unit, "reference": reference, "target": target,
                      "command": command or command_line(), "machine": machine(),
                      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **extra})
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return row


def record_lines(lines, command: str) -> list[dict]:
    """`record(**line, command=command)` for each line a study's `records(result)` returned; every line is checked
    before the first is written, so a bad line leaves the file unchanged."""
    checked = [check_line(dict(line)) for line in lines]
    return [record(**{**line, "command": command}) for line in checked]
