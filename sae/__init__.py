"""Sparse autoencoders on activations of psm_jax models: train, checkpoint, evaluate, import/export.

Three jobs, three places:
  core          config (SaeConfig), archs/ (one module per architecture + registry: training forward, inference
                activation, export mapping), model (params + architecture-independent encode/decode/loss);
                training: optim (Adam, learning-rate schedule, stacked hyperparameters), state (the stacked
                training state), step (the jitted step), distributed (mesh, shardings, multi-process helpers),
                train (the loop: logging, checkpoints, exact resume); checkpoint (orbax run dirs), metrics
                (field-standard metrics), interop (SAELens / sparsify / Gemma Scope), cli (`psm sae ...`: arguments,
                help) with commands/ (config schema, data sources, one module per command),
                synthetic (planted-feature data)
  sae.data      corpus, contexts (tokenisation, token filters), harvest, store (activation stores), sources
                (training batch sources: arrays, stores, live harvests)
  sae.features  collect, rank, examples, label, browser (feature analysis on a trained SAE)
Heavy imports happen in the submodules; `from sae import SaeConfig, load_sae` works lazily.

Quick start (Python):
    from sae.config import SaeConfig, sweep
    from sae.train import train
    from sae.data.sources import ArraySource            # or StoreSource(store, site, layer, bs), StreamSource(...)
    from sae.metrics import evaluate_reconstruction, evaluate_lm, port_runner
    from sae.interop import export_saelens, hf_hook_name
    from sae.model import to_edit_sae

    cfg = SaeConfig(architecture="topk", d_in=576, d_sae=4608, k=32, batch_size=4096, total_steps=3000)
    res = train(cfg, ArraySource("acts.npy", 4096), "runs/l15", checkpoint_every=500, progress=True)
    metrics, stats = evaluate_reconstruction(res.params[0], cfg, ArraySource("val.npy", 4096, loop=False))
    lm = evaluate_lm(port_runner(model.params, model.config, res.params[0], cfg, layer=15), token_batches)
    export_saelens(res.params[0], cfg, "out/l15", hook_name=hf_hook_name("resid_post", 15),
                   model_name="HuggingFaceTB/SmolLM2-135M-Instruct", log10_density=stats.log10_firing_density())
    edit = psm_jax.edits.sae_splice(model.config, **to_edit_sae(res.params[0], cfg), layers=[15])

Command line: `psm sae train CONFIG key=value ...` (data.model + data.hooks=resid_post:3,6,9: one harvest pass, one
SAE per hook point), `psm sae eval RUN_DIR data.npy=...`,
`psm sae export RUN_DIR OUT_DIR export.model_name=...` (sae/cli.py, sae/commands/).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "SaeConfig": "sae.config", "sweep": "sae.config",
    "init_params": "sae.model", "encode": "sae.model", "decode": "sae.model", "forward": "sae.model",
    "to_edit_sae": "sae.model",
    "load_run": "sae.train", "ArraySource": "sae.data.sources", "NanLossError": "sae.train",
    "export_saelens": "sae.interop", "load_sae": "sae.interop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sae' has no attribute {name!r}")
