"""The SAE the study reads: named by `sae=` (a SAELens folder or an sae.train run dir) or trained by `prepare` on a
ShareGPT harvest under `sae_cache`. The harvest store and the run dir are named by a hash of the config fields that
shape them, so that a re-run finds its own artefacts and a changed config never finds a stale one."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

from experiments.persona_features.config import Config
from experiments.report import atomic_write_json
from experiments.sae_source import default_sae_layer, load_feature_sae
from psm_jax.persona.directions import SITE
from sae import features as F


def sae_layer(cfg: Config, n_layers: int) -> int:
    """The layer the SAE reads: `layer`, else the studies' default (the middle of the stack)."""
    return cfg.layer if cfg.layer is not None else default_sae_layer(n_layers)


HARVEST_FIELDS = ("model", "train_tokens", "train_docs", "train_role_prompts", "context_len", "seed")
TRAINING_FIELDS = HARVEST_FIELDS + ("d_sae", "k", "train_steps", "train_batch")


def _cache_key(cfg: Config, layer: int, fields: Sequence[str]) -> str:
    """A short hash of the config fields that determine a cached artefact, so that a changed field (another model,
    more tokens) never finds a stale one."""
    blob = json.dumps({"layer": layer, **{f: getattr(cfg, f) for f in fields}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def sae_store_dir(cfg: Config, layer: int) -> Path:
    """Where `train_sae` harvests (and finds again) the ShareGPT activations of this config."""
    return Path(cfg.sae_cache) / f"acts_L{layer}_{cfg.train_tokens}_{_cache_key(cfg, layer, HARVEST_FIELDS)}"


def sae_run_dir(cfg: Config, layer: int) -> Path:
    """Where `prepare` trains (and finds again) the SAE of this config."""
    return Path(cfg.sae_cache) / (f"run_L{layer}_S{cfg.d_sae}_k{cfg.k}_steps{cfg.train_steps}_seed{cfg.seed}_"
                                  f"{_cache_key(cfg, layer, TRAINING_FIELDS)}")


def prepare(config: Config, model, progress=None) -> Config:
    """The cache step (run by `experiments.study.execute` before `run`): with `sae=None`, train the SAE on a
    ShareGPT harvest under `sae_cache` (or find it there from an earlier invocation: the harvest store and the
    run dir are resumed) and return the config with `sae` pointing at the run dir and `layer` fixed. Training
    facts (harvest and training seconds, in-sample reconstruction) go to `<run dir>.info.json`, which `run` reads.
    A config that names an SAE is returned unchanged."""
    if config.sae:
        return config
    layer = sae_layer(config, model.config.n_layers)
    model.config.check_layer(layer, "SAE layer")
    if progress:
        progress(f"SAE: train or reuse under {config.sae_cache}")
    run_dir = train_sae(model, config, layer, progress is not None)
    return dataclasses.replace(config, sae=str(run_dir), layer=layer)


def load_sae(model, cfg: Config) -> tuple[F.FeatureSae, dict]:
    """The SAE of this run (cfg.sae; see `prepare`) and a description: source, format, parameters for the SAELens
    export and, for one `prepare` trained, its training facts."""
    if not cfg.sae:
        raise ValueError("sae=None: no SAE to read; run `prepare(config, model)` first (psm features does) or pass "
                         "sae=PATH (a SAELens folder or an sae.train run dir)")
    layer = sae_layer(cfg, model.config.n_layers)
    model.config.check_layer(layer, "SAE layer")
    sae, info = load_feature_sae(cfg.sae, cfg.layer, default_layer=layer)
    facts = Path(str(cfg.sae).rstrip("/") + ".info.json")
    if facts.is_file():
        info = {**info, **json.loads(facts.read_text()), "trained_here": True}
    return sae, info


def train_sae(model, cfg: Config, layer: int, progress: bool = True) -> Path:
    """Harvest (resumable store) and train (resumable run dir) under cfg.sae_cache; returns the run dir."""
    from sae.config import SaeConfig
    from sae.data.sources import StoreSource
    from sae.metrics import evaluate_reconstruction
    from sae.train import train

    store_dir = sae_store_dir(cfg, layer)
    run_dir = sae_run_dir(cfg, layer)
    facts = Path(str(run_dir) + ".info.json")
    if facts.is_file() and (run_dir / "config.json").is_file():
        return run_dir
    t0 = time.time()
    cached = {"store": (store_dir / "manifest.json").exists(),
              "run": any(run_dir.glob("*")) if run_dir.exists() else False}
    store = _training_store(model, cfg, layer, store_dir, progress)
    harvest_s = time.time() - t0
    scfg = SaeConfig(architecture="topk", d_in=model.config.d_model, d_sae=cfg.d_sae, k=cfg.k,
                     total_steps=cfg.train_steps, batch_size=cfg.train_batch, seed=cfg.seed,
                     warmup_steps=min(100, cfg.train_steps // 10), dead_tokens_threshold=cfg.train_tokens)
    t1 = time.time()
    res = train(scfg, StoreSource(store, SITE, layer, cfg.train_batch, seed=cfg.seed), run_dir,
                checkpoint_every=max(50, cfg.train_steps // 4), progress=progress,
                extra_config={"data": {"site": SITE, "layer": layer}})
    train_s = time.time() - t1
    ev_src = StoreSource(store, SITE, layer, min(cfg.train_batch, 2048), seed=cfg.seed + 1, epochs=1)
    metrics, _ = evaluate_reconstruction(res.params[0], scfg, ev_src, max_batches=8)
    atomic_write_json(facts, {"store": str(store_dir), "store_tokens": store.n_tokens, "steps": res.step,
                              "stopped": res.stopped, "harvest_seconds": harvest_s, "train_seconds": train_s,
                              "role_prompts": {"fraction": cfg.train_role_prompts,
                                               "n_prompts": len(training_role_prompts(cfg))},
                              "reused_cache": cached,
                              "eval_on_training_store": {k: float(v) for k, v in metrics.items()
                                                         if isinstance(v, (int, float))}})
    return run_dir


def _training_store(model, cfg: Config, layer: int, store_dir: Path, progress: bool):
    """The harvest store of this config: the one under `store_dir` where it is complete or holds `train_tokens`,
    else a new harvest of the training corpus (which resumes a partial store)."""
    from sae.data.store import ActivationStore, harvest_to_store

    store = None
    if (store_dir / "manifest.json").exists():
        store = ActivationStore(store_dir)
        if not store.complete and store.n_tokens < cfg.train_tokens:
            store = None
    if store is None:
        corpus = training_corpus(cfg)
        store = harvest_to_store(model, corpus, store_dir, [(SITE, layer)], context_len=cfg.context_len, batch_size=8,
                                 max_tokens=cfg.train_tokens, progress=progress)
    return store


def training_role_prompts(cfg: Config) -> list[str]:
    """The system prompts mixed into the SAE's training conversations: every instruction of every packaged role
    except the default assistant and the roles the role contrast samples, so that no prompt the study discovers
    latents with was seen in training."""
    from psm_jax.persona import datasets
    from psm_jax.persona.prompts import role_play_prompts, select_roles

    roles = datasets.load_roles().roles
    return role_play_prompts(roles, exclude=[r.name for r in select_roles(roles, cfg.n_roles, cfg.seed)])


def training_corpus(cfg: Config):
    """The SAE's training conversations: `train_docs` shuffled ShareGPT conversations, a `train_role_prompts`
    fraction of them under a role-play system prompt."""
    from sae.data.corpus import load_sharegpt, with_system_prompts

    corpus = load_sharegpt(shuffle=True, seed=cfg.seed, take=cfg.train_docs)
    if cfg.train_role_prompts == 0:
        return corpus
    return with_system_prompts(corpus, training_role_prompts(cfg), cfg.train_role_prompts, seed=cfg.seed)
