"""Loading a trained SAE for the SAE studies (persona features, feature steering): a SAELens folder, a Gemma
Scope .npz, or an `sae.train` run folder, as a `sae.features.FeatureSae` at one layer."""
from __future__ import annotations

import json
from pathlib import Path

from sae import features as F


def load_feature_sae(path, layer: int | None, *, default_layer: int) -> tuple[F.FeatureSae, dict]:
    """The SAE at `path` and a description (source, format, its config and parameters). `layer`: the residual layer
    it reads (None: the one its run recorded, else `default_layer`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"sae={str(path)!r} does not exist; expected a SAELens folder or an sae.train run dir")
    if (path / "sae_weights.safetensors").exists() or (path / "sae.safetensors").exists() or path.suffix == ".npz":
        from sae.interop import load_sae

        fs = F.FeatureSae.load(path, layer=layer)
        imp = load_sae(path)
        return fs, {"source": str(path), "format": imp.format, "trained_here": False,
                    "sae_cfg": imp.cfg.to_dict(), "params": imp.params, "scfg": imp.cfg}
    from sae.train import load_run

    params, cfgs, meta = load_run(path)
    run_cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    run_layer = ((run_cfg.get("extra") or {}).get("data") or {}).get("layer")
    fs = F.FeatureSae.from_trained(params[0], cfgs[0], layer=layer if layer is not None else (run_layer or default_layer),
                                   name=str(path))
    return fs, {"source": str(path), "format": "run_dir", "trained_here": False, "sae_cfg": cfgs[0].to_dict(),
                "params": params[0], "scfg": cfgs[0]}


def default_sae_layer(n_layers: int) -> int:
    """The residual layer the SAE studies read unless told otherwise: the middle of the stack."""
    return n_layers // 2


def line_key(name: str, layer: int, default_layer: int) -> str:
    """A record line's key for a result read from an SAE at `layer`: the name alone at the studies' default layer
    (the rows earlier runs filled), `<name>/L<layer>` at any other, so that a run at another layer gets rows of its
    own in the results table instead of replacing the default layer's."""
    return name if int(layer) == int(default_layer) else f"{name}/L{int(layer)}"
