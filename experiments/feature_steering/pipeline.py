"""The study's computation (`run`): the features run's inputs checked, the strength unit and the random band built
once, then every trait steered (`trait.steer_trait`), gathered into a `Result`. It writes nothing, so that a run can
be checked before any report exists; `report` writes."""
from __future__ import annotations

import dataclasses
import time
from typing import Any

from experiments.feature_steering.config import Config
from experiments.feature_steering.inputs import FeaturesRun, load_features, ranked_info
from experiments.feature_steering.strength import ppl_docs, typical_residual_norm
from experiments.feature_steering.trait import steer_trait
from experiments.feature_steering.trait_result import PERSONA_VECTOR, TraitSteering
from experiments.report import fmt_num
from experiments.sae_source import default_sae_layer
from psm_jax.persona.directions import random_directions


@dataclasses.dataclass
class Result:
    """Everything the report folder and the record lines read, so that writing them needs no model."""

    config: Config
    sae_layer: int  # the SAE's layer: every edit is added (or the clamp applied) at its resid_post
    sae_description: dict[str, Any]  # `FeatureSae.describe()`: site, d_sae, activation, ...
    typical_residual_norm: float  # the strength unit: the mean per-token residual norm at `sae_layer`
    n_perplexity_docs: int  # held-out ShareGPT answers behind the norm and the perplexity ratios
    trait_results: dict[str, TraitSteering]  # trait name -> `steer_trait`'s result
    run_seconds: float
    default_sae_layer: int  # the SAE studies' default layer on this model (n_layers // 2): record keys name any other


def run(config: Config, model, progress=None, *, features: FeaturesRun | None = None) -> Result:
    """Compute the study (no files). features: (candidates, directions, FeatureSae) instead of config.features."""
    cfg, t0 = config, time.time()
    say = progress or (lambda msg: None)
    cand, directions, sae = features if features is not None else load_features(cfg.features, model=model,
                                                                                 sae_override=cfg.sae)
    traits = _traits(cfg, cand, directions)
    ppl = ppl_docs(cfg.n_ppl_docs, cfg.seed, cfg.ppl_max_chars)
    norm = typical_residual_norm(model, ppl, sae.layer, cfg.batch_size)
    rand_units = random_directions(cfg.seed * 1000 + 17, cfg.n_random, model.config.d_model, 1.0)
    results = {}
    for name, trait in traits.items():
        info = ranked_info(cand["traits"][name], cfg.ranking, name)
        results[name] = steer_trait(model, sae, trait, info, directions[name], cfg=cfg, norm=norm, ppl=ppl,
                                    rand_units=rand_units, progress=progress)
        say(_trait_message(name, results[name]))
    return Result(config=cfg, sae_layer=sae.layer, sae_description=sae.describe(), typical_residual_norm=norm,
                  n_perplexity_docs=len(ppl[0]), trait_results=results, run_seconds=time.time() - t0,
                  default_sae_layer=default_sae_layer(model.config.n_layers))


def _traits(cfg: Config, cand: dict, directions: dict) -> dict:
    """The traits to steer (`cfg.traits`, else every trait of the features run), by name, checked against the
    features run and the number of evaluation questions before any model time is spent."""
    from psm_jax.persona.prompts import load_traits

    names = list(cfg.traits or cand["traits"].keys())
    for n in names:
        if n not in cand["traits"]:
            raise ValueError(f"trait {n!r} is not in the features run (it has {sorted(cand['traits'])})")
        if n not in directions:
            raise ValueError(f"no persona direction for trait {n!r} in the features run")
    traits = {t.name: t for t in load_traits(names)}
    for n in names:
        if len(traits[n].evaluation_questions) < cfg.n_questions:
            raise ValueError(f"n_questions={cfg.n_questions}; trait {n!r} has {len(traits[n].evaluation_questions)}")
    return {n: traits[n] for n in names}


def _trait_message(name: str, r: TraitSteering) -> str:
    return (f"{name}: best latent z {fmt_num(r['edits'][r['best']]['z'], '.2f')}, vector z "
            f"{fmt_num(r['edits'][PERSONA_VECTOR]['z'], '.2f')}, measure "
            f"{'valid' if r['validity']['valid'] else 'NOT valid'}")
