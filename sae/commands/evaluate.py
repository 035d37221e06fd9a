"""`psm sae eval`: reconstruction metrics of each SAE of a TARGET (on the [data] section's activations, else on the
LM evaluation's documents) and its LM metrics (sae.commands.lm_eval); a run dir also gets eval.json and the firing
densities `export` puts in a SAELens folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sae.commands.config import CliError, EvalSection, data_shuffle, setting
from sae.commands.lm_eval import corpus_activations, lm_setup, lm_splice_metrics
from sae.commands.source import make_source
from sae.commands.targets import density_file, load_target, recorded_data


def cmd_eval(target: str, conf: dict[str, Any], *, model=None) -> dict:
    """Reconstruction metrics (on [data] activations, else on the LM documents' activations) and LM metrics (SAE
    spliced into the model) per SAE; `model` (a psm_jax LoadedModel) replaces loading eval.lm_model."""
    from sae.metrics import evaluate_reconstruction

    e = conf.get("eval", {})
    params, cfgs, meta = load_target(target, e.get("step"), with_metadata=True)
    data = conf.get("data", {})
    run_data = recorded_data(target)
    layers = data.get("layers")
    if layers is not None and len(layers) != len(params):
        raise CliError(f"data.layers has {len(layers)} entries for {len(params)} SAEs")
    has_data = "npy" in data or "store" in data
    lm = lm_setup(conf, cfgs, meta, run_data, model)
    if not has_data and lm is None:
        raise CliError("nothing to evaluate on: the [data] section needs `npy` (a [n_tokens, d_in] .npy file) or "
                       "`store` (an activation store directory, with site and layer) for the reconstruction metrics, "
                       "or give eval.lm_model=... for the LM metrics (reconstruction then runs on the LM documents)")
    progress = bool(setting(e, EvalSection, "progress"))
    reports = []
    is_run = (Path(target) / "checkpoints").exists()
    acts_cache: dict = {}
    for i, (p, c) in enumerate(zip(params, cfgs)):
        if has_data:
            source = _eval_data_source(data, layers, i, c, int(setting(e, EvalSection, "batch_size")))
            recon_source = "data"
        else:
            site, layer = lm["hooks"][i]
            source = corpus_activations(lm, site, layer, acts_cache)
            recon_source = f"lm documents ({site}.{layer}, kept tokens of the token filter)"
        m, stats = evaluate_reconstruction(p, c, source, max_batches=e.get("max_batches"),
                                           dense_threshold=float(setting(e, EvalSection, "dense_threshold")))
        rep = {"sae": i, "config": c.to_dict(), "metrics": m, "metrics_source": recon_source}
        if lm is not None:
            rep.update(lm_splice_metrics(lm, i, p, c, e.get("lm_max_batches"), progress))
        reports.append(rep)
        if is_run:                              # picked up by `export` as SAELens' sparsity.safetensors
            _write_npy(density_file(target, i), stats.log10_firing_density().astype("float32"))
    out = {"target": target, "saes": reports}
    if lm is not None:
        out["lm"] = lm["info"]
    if is_run:
        from psm_jax.atomic import atomic_write_text
        atomic_write_text(Path(target) / "eval.json", json.dumps(out, indent=1))
    return out


def _eval_data_source(data: dict, layers, i: int, c, batch_size: int):
    """SAE i's evaluation activations from the [data] section, unshuffled; SAE i of a one-SAE-per-layer run reads
    its own layer."""
    d_i = dict(data, shuffle=data_shuffle(data, False))
    if layers is not None:
        d_i.pop("layers")
        d_i["layer"] = layers[i]
    source = make_source(d_i, batch_size, d_in=c.d_in, loop=False)
    if getattr(source, "d_in", c.d_in) != c.d_in:
        raise CliError(f"SAE {i} has d_in={c.d_in}; the evaluation activations have width {source.d_in}")
    return source


def _write_npy(path: Path, array) -> None:
    """np.save, atomically: a failed or killed write leaves the previous file."""
    import io

    import numpy as np

    from psm_jax.atomic import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
