"""The study's computation: for each trait the vector, the self-made training data, every fine-tune and its
evaluation (`run_trait`), the repeated prevention runs, then the correlations across fine-tunes and studies 5 and 8
on the first trait (`run`). No files, no printing."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from experiments.finetune.config import Config
from experiments.finetune.data import build_variants, training_data
from experiments.finetune.evaluation import baseline, evaluate
from experiments.finetune.spread import model_diffing, narrow_vs_general
from experiments.finetune.summary import prevention_summaries, summarize
from experiments.finetune.training import train, training_key
from experiments.finetune.trait_result import (Baseline, Beyond, FineTuneRow, Fixed, Kept, KeptFineTune, Metrics,
                                               Prevention, TraitResult, TraitRun)
from experiments.finetune.vector import persona_vector
from experiments.sharegpt import sharegpt_conversations
from psm_jax.persona.prompts import load_traits
from psm_jax.persona.stats import bootstrap_ci


def run_trait(model, trait, trait_index: int, cfg: Config, ppl_convs, say, keep: bool = False) -> TraitRun:
    """Vector, self-made training data, screening, every fine-tune and its evaluation for one trait, with what the
    further prevention runs share (`fixed`) and, with keep, what studies 5 and 8 read (`kept`: the plain 100%,
    control and, where run, 0% ('opposite') fine-tunes' params and answers, the vector, the training key), handed
    beside the result so that it is never kept in it."""
    t0 = time.time()
    layer = model.config.n_layers // 2 if cfg.layer is None else int(cfg.layer)
    model.config.check_layer(layer, "layer")
    if say:
        say(f"{trait.name}: persona vector at layer {layer}")
    vector, reliability = persona_vector(model, trait, layer, cfg)
    questions, answers, screen = training_data(model, trait, trait_index, vector, layer, cfg, say)
    base = baseline(model, trait, layer, cfg, ppl_convs)
    key = training_key(cfg, trait_index)
    rows, kept = train_and_evaluate(model, build_variants(trait, questions, answers, screen, cfg), vector, layer, base,
                                    cfg, key, ppl_convs, say, keep)
    fixed = Fixed(vector=vector, layer=layer, base=base)
    result = TraitResult(
        trait=trait.name, layer=layer, vector_norm=float(np.linalg.norm(vector)), vector_reliability=reliability,
        screening_validity={k: bootstrap_ci(v, seed=cfg.seed) for k, v in screen.items()},
        validity=base["validity"], base={k: base[k] for k in ("questions", "answers", "scores")},
        example_training={pol: [questions[0], answers[pol][0]] for pol in answers}, rows=rows,
        seconds=time.time() - t0)
    return TraitRun(result, fixed, _kept(kept, fixed, key) if keep else None)


def _kept(kept: dict[str, KeptFineTune], fixed: Fixed, key) -> Kept:
    """Studies 5 and 8's hand-off: the kept fine-tunes by role, the fixed parts, the key and the training sets (the
    plain 100% and control conversations) the trained-here SAE also reads."""
    return {**kept, "vector": fixed["vector"], "layer": fixed["layer"], "key": key, "base": fixed["base"],
            "training_conversations": [list(c) for v in ("plain", "control") if v in kept
                                       for c in kept[v]["variant"].conversations]}


def train_and_evaluate(model, variants, vector, layer: int, base: Baseline, cfg: Config, key, ppl_convs, say,
                       keep: bool = False) -> tuple[list[FineTuneRow], dict[str, KeptFineTune]]:
    """Train and evaluate each variant in turn (one fine-tuned model in memory at a time); with keep, also return
    the plain 100%, control and 0% fine-tunes' params and answers by role."""
    rows, kept = [], {}
    for variant in variants:
        trained = train(model, variant, vector, layer, cfg, key, say)
        tuned = dataclasses.replace(model, params=trained.pop("params"))
        ev = evaluate(model, tuned, vector, layer, base, cfg, variant, ppl_convs)
        rows.append(FineTuneRow(variant=variant, training=trained, **ev))
        role = {1.0: "plain", 0.0: "opposite"}.get(variant.mix, "mix") if variant.kind == "mix" else variant.kind
        if keep and role in ("plain", "control", "opposite"):
            kept[role] = KeptFineTune(params=tuned.params, answers=ev["answers"], variant=variant)
    return rows, kept


def prevention_run(model, trait, trait_index: int, cfg: Config, fixed: Fixed, ppl_convs, say) -> list[Prevention]:
    """One more training run of the prevention comparison under `cfg.seed`: the plain fine-tune at the largest mix,
    each preventative one and the control, on this seed's training questions, key and batch order, evaluated
    against the primary run's vector, baseline and held-out text (`fixed`). Each steered fine-tune's
    `_prevention` summary."""
    only = dataclasses.replace(cfg, mixes=(max(cfg.mixes),), caft=False, inoculation=False, persona_switch=False,
                               narrow=False, model_diff=False)
    vector, layer = fixed["vector"], fixed["layer"]
    questions, answers, screen = training_data(model, trait, trait_index, vector, layer, only, say)
    variants = build_variants(trait, questions, answers, screen, only)
    rows, _ = train_and_evaluate(model, variants, vector, layer, fixed["base"], only, training_key(only, trait_index),
                                 ppl_convs, say)
    return prevention_summaries(rows, only)


@dataclasses.dataclass
class Result:
    config: Config
    results: list[TraitResult]
    metrics: Metrics
    model_source: str
    n_layers: int
    d_model: int
    seconds: float
    beyond: Beyond = dataclasses.field(default_factory=dict)  # studies 5 and 8


def run(config: Config, model, progress=None) -> Result:
    """Every trait's fine-tunes and their evaluation, then the correlations across fine-tunes, and studies 5 and 8
    on the first trait's fine-tunes (`experiments.finetune.spread`). No files."""
    t0 = time.time()
    traits = load_traits(config.traits)
    n_ppl = config.n_ppl_conversations
    n_held = n_ppl + (config.n_ood_sharegpt + config.n_kl_reference if config.narrow else 0)
    held = (sharegpt_conversations(n_held, config.seed + 7, 6, config.ppl_max_chars, min_assistant_turns=1)
            if n_held else [])
    results: list[TraitResult] = []
    beyond: Beyond = {}
    for i, trait in enumerate(traits):
        r, fixed, kept = run_trait(model, trait, i, config, held[:n_ppl], progress,
                                   keep=i == 0 and (config.narrow or config.model_diff))
        if config.prevention_runs > 1:
            seeds = [config.seed + k for k in range(config.prevention_runs)]
            r["prevention_runs"] = {"seeds": seeds, "runs": []}
            for seed in seeds[1:]:
                if progress:
                    progress(f"{trait.name}: prevention training run with seed {seed} ({len(seeds)} runs in all)")
                r["prevention_runs"]["runs"].append(prevention_run(
                    model, trait, i, dataclasses.replace(config, seed=seed), fixed, held[:n_ppl], progress))
        results.append(r)
        if kept is not None:
            beyond = beyond_training(model, kept, traits, held[n_ppl:], config, progress)
            del kept
    return Result(config, results, summarize(results, config), Path(str(getattr(model, "source", config.model))).name,
                  model.config.n_layers, model.config.d_model, time.time() - t0, beyond)


def beyond_training(model, kept: Kept, traits, held, cfg: Config, say) -> Beyond:
    """Study 5 (narrow vs general) and study 8 (model diffing) on the first trait's plain 100% fine-tune."""
    t0, out = time.time(), Beyond()
    if cfg.narrow:
        out["narrow"] = narrow_vs_general(model, kept, traits, held, cfg, say)
    if cfg.model_diff:
        out["model_diff"] = model_diffing(model, kept, traits[0], cfg, say)
    out["seconds"] = time.time() - t0
    return out
