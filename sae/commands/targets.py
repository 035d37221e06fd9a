"""What `eval` and `export` read from their TARGET: a run dir of `train` (orbax checkpoints, config.json with the
[data] fields it recorded, the firing densities an `eval` left there) or any SAE folder/file sae.interop imports."""
from __future__ import annotations

import json
from pathlib import Path


def load_target(target: str, step: int | None, *, with_metadata: bool = False):
    """(params list, cfg list[, metadata]) from a run dir or any importable SAE folder/file; metadata is the
    imported folder's (SAELens: model_name, hook_name, ...), {} for a run dir."""
    from sae.checkpoint import CONFIG_FILE
    from sae.interop import load_sae
    from sae.train import load_run

    p = Path(target)
    if (p / CONFIG_FILE).exists() and (p / "checkpoints").exists():
        params, cfgs, _ = load_run(p, step)
        return (params, cfgs, {}) if with_metadata else (params, cfgs)
    imp = load_sae(p)
    return ([imp.params], [imp.cfg], dict(imp.metadata or {})) if with_metadata else ([imp.params], [imp.cfg])


def recorded_data(target: str) -> dict:
    """The [data] fields (site, layer(s), roles) a run dir recorded in its config.json, if any."""
    from sae.checkpoint import CONFIG_FILE
    p = Path(target) / CONFIG_FILE
    if not p.exists():
        return {}
    try:
        return dict(json.loads(p.read_text()).get("extra", {}).get("data", {}))
    except ValueError:
        return {}


def density_file(target: str, i: int) -> Path:
    """Where `eval` leaves SAE i's log10 firing densities in a run dir, for `export` (SAELens' sparsity.safetensors)."""
    return Path(target) / f"eval_log10_density_{i}.npy"
