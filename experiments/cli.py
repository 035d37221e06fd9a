"""The `psm` command: one subcommand per registered study (`experiments.registry`), plus the main job and SAEs.

    psm quickstart [--preset quick|ci|full] [--out DIR] [--only axis,kv_editing] [--force] [--record]
    psm <study> [key=value ...] [--preset ci|quick|full] [--out DIR] [--record]    (psm <study> --help: the keys)
    psm sae train|eval|export [CONFIG|TARGET ...] [section.key=value ...]           (psm sae <cmd> --help: the keys)

Every `key=value` is read by one grammar (psm_jax.cli_values), typed by the config field the key names.
"""
from __future__ import annotations

import importlib
import sys

from experiments import registry

EXTRA = {"quickstart": "experiments.quickstart", "sae": "sae.cli"}


def commands() -> list[str]:
    return ["quickstart", *registry.BY_NAME, "sae"]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("commands:", ", ".join(commands()))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in registry.BY_NAME and name not in EXTRA:
        print(f"psm: unknown command {name!r}; expected one of {', '.join(commands())}", file=sys.stderr)
        return 2
    target = registry.BY_NAME[name].module if name in registry.BY_NAME else EXTRA[name]
    try:
        module = importlib.import_module(target)
    except ModuleNotFoundError as err:
        print(f"psm: command {name!r} is not available ({err})", file=sys.stderr)
        return 2
    if name in registry.BY_NAME:
        from experiments.study import main_for

        return main_for(name, module, rest)
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
