"""The study's computation: every step of the package doc for one trait (`run_trait`, with step 6b in
`_response_block`; their results are typed in `trait_result`), then the cross-trait matrices and the headline
numbers (`run`). No files, no printing."""
from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from experiments.persona_vectors.behaviour import items_measure, reference_units, units_pairs
from experiments.persona_vectors.config import Config
from experiments.persona_vectors.cross_trait import MIN_SPECIFICITY_TRAITS, specificity_matrix, trait_specific_matrix
from experiments.persona_vectors.extraction import (filter_pairs, greedy_rollouts, judge_rows,
                                                    sample_extraction_rows, screening, vectors_and_scales)
from experiments.persona_vectors.monitoring import holdout_monitoring, graded_monitoring, rule_monitoring
from experiments.persona_vectors.steering import steered_examples, default_sweep_layers, steer_with_measure
from experiments.persona_vectors.summary import summary_metrics
from experiments.persona_vectors.trait_result import (HeldOutPairs, ItemsSteering, LayerSweep, MeasureSteering,
                                                      MonitorResponse, ResponseBlock, TraitResult)
from psm_jax.persona import monitoring, rollouts
from psm_jax.persona.directions import SITE, random_directions
from psm_jax.persona.extraction import rule_layer
from psm_jax.persona.judge import make_judge
from psm_jax.persona.measures import prompt_validity
from psm_jax.persona.prompts import load_traits
from psm_jax.persona.steering import ContrastPairs


@dataclasses.dataclass
class Result:
    config: Config
    results: list[TraitResult]  # one per trait (`run_trait`)
    n_layers: int
    d_model: int
    metrics: dict  # the headline numbers (`summary_metrics`)


def run_trait(model, trait, cfg: Config, trait_index: int, judge, progress: bool = True) -> TraitResult:
    """Every step of the package doc for one trait. Validity checks run before the steering they gate."""
    t0 = time.time()
    key = jax.random.fold_in(jax.random.key(cfg.seed), trait_index)
    rows = sample_extraction_rows(model, trait, cfg, key, progress)
    greedy = greedy_rollouts(model, trait, cfg, progress)
    trait_scores, coh_scores, judge_summary = judge_rows(judge, rows, trait, cfg)
    pos_idx, neg_idx, filter_info = filter_pairs(rows, trait_scores, coh_scores,
                                                 bool(judge_summary.get("validity", {}).get("valid")), cfg)
    ex = vectors_and_scales(model, rows, pos_idx, neg_idx, greedy, cfg, progress)
    vecs, norms, typical, scales, rule_sep = ex.vectors, ex.norms, ex.typical, ex.scales, ex.rule_separation
    direction = vecs["response_avg"]
    layers = cfg.sweep_layers or default_sweep_layers(model.config.n_layers)
    for L in layers:
        model.config.check_layer(int(L), "sweep layer")
    rand = random_directions(cfg.seed * 1000 + trait_index, cfg.n_random, model.config.d_model, 1.0)
    fluency = (greedy["own_prompts"], greedy["own_responses"])

    items = items_measure(model, trait, greedy["systems"])
    steering, layer_sweep = _items_steering(
        steer_with_measure(model, items["selection"], items["held_out"], direction, scales, layers, rand, cfg,
                           items["validity"], fluency), norms, typical)
    best = steering["layer"]
    mon_acts = rollouts.activation_means(model, [r.conversation() for r in greedy["mon_rolls"]], site=SITE,
                                         batch_size=cfg.batch_size)
    res: TraitResult = {
        "trait": trait.name, "filter": filter_info, "judge": judge_summary, "vector_norm": norms,
        "typical_norm": typical, "layer_sweep": layer_sweep, "steering": steering,
        "steered_examples": steered_examples(model, trait, direction, scales, best, cfg),
        "monitoring": graded_monitoring(mon_acts, direction, best, greedy["systems"], items["behaviour"],
                                        len(greedy["mon_questions"])),
        "monitor_responses": _monitor_responses(greedy)}
    held: HeldOutPairs = {"items": items["held_out"]}
    if cfg.response_measure:
        res["response"], held["response_likelihood"] = _response_block(
            model, trait, cfg, direction, scales, layers, rand, mon_acts, greedy["systems"], fluency, rule_sep,
            progress=progress)
    if cfg.screening:
        res["screening"] = screening(model, rows, pos_idx, neg_idx, greedy["own_responses"], direction[best], best,
                                     cfg.batch_size)
    res.update(vectors=vecs, rows=rows, own_responses=list(zip(greedy["questions"], greedy["own_responses"])),
               scales=np.asarray(scales), random_units=rand, held_out_pairs=held, reliability=ex.reliability,
               seconds=time.time() - t0)
    return res


def _items_steering(curve: MeasureSteering, norms: dict, typical: np.ndarray) -> tuple[ItemsSteering, LayerSweep]:
    """The items' `steer_with_measure` result as `TraitResult` holds it (changed in place): its layer sweep taken out,
    since the report and metrics.json read the items' sweep at the trait's top level, and the raw vector's norm over
    the typical residual norm at the chosen layer added, so that the vector's size reads in the residual unit whatever
    coef_unit is."""
    layer = curve["layer"]
    curve["raw_vector_over_typical_norm"] = float(norms["response_avg"][layer] / typical[layer])
    return curve, curve.pop("layer_sweep")


def _monitor_responses(greedy: dict) -> list[MonitorResponse]:
    """Every greedy monitoring answer with its system prompt's kind and instruction pair, for responses.jsonl.
    `greedy_rollouts` generates them prompt-major: every monitoring question under one prompt, then the next."""
    slots = [(s, q) for s in greedy["systems"] for q in greedy["mon_questions"]]
    return [{"system_kind": s.kind, "pair": s.pair, "question": q, "response": r.response}
            for (s, q), r in zip(slots, greedy["mon_rolls"])]


def _response_block(model, trait, cfg: Config, direction, scales, layers, rand, mon_acts, systems, fluency,
                    rule_separations, *, progress: bool = False) -> tuple[ResponseBlock, ContrastPairs]:
    """Step 6b: reference answers, the validity check (no steering, per held-out unit), layer selection on the
    selection questions, the steering curve and (when valid) the random band on the held-out ones, and monitoring
    at the steering layer and at the layer of the extraction-data rule. Returns (the trait's `ResponseBlock`, the
    held-out units as ContrastPairs)."""
    ref, sel, held = reference_units(model, trait, cfg, progress)
    per_unit, n_used = monitoring.measure_per_prompt(model, held, systems, cfg.batch_size)
    validity = prompt_validity(per_unit, monitoring.validity_kinds(systems))
    held_pairs = units_pairs(held)
    out = steer_with_measure(model, units_pairs(sel), held_pairs, direction, scales, layers, rand, cfg, validity,
                             fluency)
    out["layer_sweep"]["n_pairs"] = len(sel)
    out.update(monitoring.monitor_at_layer(per_unit, systems, mon_acts, direction, out["layer"], cfg.seed))
    out["within_r_by_layer"] = monitoring.within_r_by_layer(mon_acts, direction, out["system_measure"],
                                                            monitoring.polarity_kinds(systems))
    out["rule_monitoring"] = rule_monitoring(per_unit, systems, mon_acts, direction, rule_separations, cfg.seed)
    if cfg.holdout_monitoring:
        out["holdout_monitoring"] = holdout_monitoring(
            model, trait, cfg, held, direction, {"steering": out["layer"], "rule": rule_layer(rule_separations)},
            progress=progress)
    out.update(n_selection=len(sel), n_held_out=len(held), n_dropped=sum(not x["kept"] for x in ref),
               n_questions=cfg.n_response_questions, n_pairs_per_question=cfg.n_response_pairs,
               system_n_used=n_used, reference=ref)
    return out, held_pairs


def run(config: Config, model, progress=None) -> Result:
    """Every trait: vectors, validity checks, layer selection, steering curves with controls, monitoring; then the
    specificity matrix across traits. No files."""
    traits = load_traits(config.traits)
    judge = None
    if config.judge == "local":
        judge = make_judge("local", model, answer_prefix=config.judge_answer_prefix, batch_size=8,
                           progress=progress is not None)
    elif config.judge == "openai":
        judge = make_judge("openai")
    results = []
    for ti, trait in enumerate(traits):
        if progress:
            progress(f"trait {trait.name} ({ti + 1}/{len(traits)})")
        results.append(run_trait(model, trait, config, ti, judge, progress=progress is not None))
    spec = specific = None
    if len(results) >= MIN_SPECIFICITY_TRAITS:
        if progress:
            progress("specificity matrix")
        spec = specificity_matrix(model, results, config.specificity_coef)
        specific = trait_specific_matrix(model, results, spec)
    return Result(config=config, results=results, n_layers=model.config.n_layers, d_model=model.config.d_model,
                  metrics=summary_metrics(results, spec, config.max_ppl_ratio, specific))
