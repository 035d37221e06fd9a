"""Append benchmark and research figures to benchmarks/results.jsonl (one JSON object per line)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.jsonl"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import jax

        dev = jax.devices()[0]
        accel = f"{dev.platform}:{getattr(dev, 'device_kind', '')}"
    except Exception:
        accel = "unknown"
    return f"{cpu}; {os.cpu_count()} cores; {accel}"


def command_line() -> str:
    """The command that re-runs this script from the repo root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), Path(__file__).resolve().parent.parent)
    return " ".join([".venv/bin/python", shlex.quote(script)] + [shlex.quote(a) for a in sys.argv[1:]])


def record(metric: str, value, unit: str, reference: str, target: str | None = None, command: str | None = None,
           **extra) -> dict:
    row = {"metric": metric, "value": value, "unit": unit, "reference": reference, "target": target,
           "command": command or command_line(), "machine": machine(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **extra}
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return row
