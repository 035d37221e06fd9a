"""The `psm` command: one subcommand per experiment module (each exposes `main(argv)`).

    psm quickstart            the main job on the packaged default model
    psm persona-vectors ...   psm assistant-axis ...   psm capping ...   psm refusal ...
    psm features ...          psm feature-steering ... psm kv-editing ...
    psm sae train|eval|export ...
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "quickstart": "experiments.quickstart",
    "persona-vectors": "experiments.persona_vectors",
    "assistant-axis": "experiments.assistant_axis",
    "capping": "experiments.capping",
    "refusal": "experiments.refusal",
    "features": "experiments.persona_features",
    "feature-steering": "experiments.feature_steering",
    "kv-editing": "experiments.kv_editing",
    "sae": "sae.cli",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("commands:", ", ".join(COMMANDS))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"psm: unknown command {name!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name])
    except ModuleNotFoundError as err:
        print(f"psm: command {name!r} is not available ({err})", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
