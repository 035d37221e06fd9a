"""Small pieces shared by the experiments' `main(argv)` entry points (the `psm` subcommands)."""
from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, Sequence, TypeVar

T = TypeVar("T")

RERUN_PREFIX = ".venv/bin/python -m experiments.cli"


def config_or_none(prog: str, build: Callable[[], T], *, check: bool = False) -> T | None:
    """`build()` (then `.check()` on the result when `check`); a ValueError is printed as `prog: message` on
    stderr and gives None, on which `main` returns exit status 2."""
    try:
        cfg = build()
        if check:
            cfg.check()
    except ValueError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return None
    return cfg


def rerun_command(subcommand: str, argv: Sequence[str] | None, default: str | None = None) -> str:
    """The command line that re-runs `psm <subcommand>` from the repo root with the same arguments (`argv`, or
    sys.argv[1:] when None). Without arguments: `default` when given, else the bare subcommand."""
    args = " ".join(sys.argv[1:] if argv is None else argv)
    if args:
        return f"{RERUN_PREFIX} {subcommand} {args}"
    return default if default is not None else f"{RERUN_PREFIX} {subcommand}"


def run_cli(prog: str, subcommand: str, argv: Sequence[str] | None, args, *, build: Callable[[], Any],
            run: Callable[[Any, str], dict], summary: Callable[[dict], Iterable[str]],
            record: Callable[[dict, str], None], default_command: str | None = None) -> int:
    """The common end of a `main(argv)` whose `run(config, out)` returns {"report": path, "metrics": ...}: build the
    config (a ValueError: message, exit status 2), run it into `args.out`, print the report path and the
    `summary(result)` lines, and with `args.record` call `record(result, command)` with the re-run command line."""
    cfg = config_or_none(prog, build)
    if cfg is None:
        return 2
    result = run(cfg, args.out)
    print(f"report: {result['report']}")
    for line in summary(result):
        print(line)
    if args.record:
        record(result, rerun_command(subcommand, argv, default_command))
    return 0
