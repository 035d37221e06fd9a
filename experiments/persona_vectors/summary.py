"""The headline numbers of a run, read from the per-trait results and the cross-trait matrices: monotonic-trait
counts, the three targets, each vector's reliability, and the per-trait metrics that metrics.json and the record
lines carry."""
from __future__ import annotations

import numpy as np

from experiments.persona_vectors.config import MEASURE_KEYS
from experiments.persona_vectors.cross_trait import steering_layer, cosine_matrix
from experiments.persona_vectors.trait_result import ResponseBlock, TraitMetrics, TraitResult
from psm_jax.persona.directions import cosine
from psm_jax.persona.measures import is_valid
from psm_jax.persona.stats import count_monotonic


HEADLINE_CRITERIA = (("strict", "increasing"), ("run4", "run"), ("strict_ppl{ppl:g}", "increasing_within_ceiling"),
                     ("strict_ppl{ppl:g}_band", "increasing_within_ceiling_outside_band"))


def monotonic_counts(results: list[TraitResult], max_ppl_ratio: float) -> dict:
    """Per measure: how many traits pass each monotonicity criterion, counting only traits whose measure passed
    its validity check (held-out curve, layer chosen on the selection half)."""
    out = {}
    for name, key in MEASURE_KEYS:
        ran = [r for r in results if key in r]
        if not ran:
            continue
        valid = [r for r in ran if is_valid(r[key].get("validity"))]
        counts = {crit.format(ppl=max_ppl_ratio): count_monotonic([r[key]["monotonic"] for r in valid], field)
                  for crit, field in HEADLINE_CRITERIA}
        out[name] = {"counts": counts, "n_traits": len(ran), "n_valid": len(valid),
                     "valid_traits": [r["trait"] for r in valid]}
    return out


def _trait_metrics(r: TraitResult) -> TraitMetrics:
    """What metrics.json and the record lines keep of one trait: the items' curve and monitoring under flat names,
    and the response block without its reference answers (responses.jsonl holds those)."""
    st, mon = r["steering"], r["monitoring"]
    out: TraitMetrics = {
        "chosen_layer": st["layer"], "coefs": st["coefs"], "measure": st["measure"], "monotonic": st["monotonic"],
        "ppl_ratio": st["ppl_ratio"], "validity": st["validity"], "random_control": st["random_control"],
        "unit_norm": st["unit_norm"], "raw_vector_norm_in_units": st["raw_vector_norm_in_units"],
        "layer_sweep": r["layer_sweep"], "monitor_r_last_prompt": mon["r_last_prompt"],
        "monitor_r_response": mon["r_response"], "monitor_behaviour": mon["behaviour"],
        "monitor_proj_last_prompt": mon["proj_last_prompt"], "monitor_proj_response": mon["proj_response"],
        "system_prompt_effect": mon["system_prompt_effect"], "separation_by_layer": mon["separation_by_layer"],
        "filter": r["filter"], "judge": r["judge"], "screening": r.get("screening"), "seconds": r["seconds"]}
    if "response" in r:
        out["response_measure"] = {k: v for k, v in r["response"].items() if k != "reference"}
    return out


MIN_TARGET_TRAITS = 2  # the targets ask for at least this many traits
MONITOR_MIN_WITHIN_R = 0.5
TARGET_NAMES = ("specificity", "steering", "monitoring", "monitoring_holdout")


def targets(results: list[TraitResult], specificity: dict | None) -> dict:
    """The three persona-vector targets, per trait and overall (met with >= MIN_TARGET_TRAITS traits):
    specificity (the matrix's pass per steered trait), steering (some valid measure strictly increasing over its
    fluent points and above the random band) and monitoring (the response measure's within-polarity r above
    MONITOR_MIN_WITHIN_R, the measure valid)."""
    per = {}
    for i, r in enumerate(results):
        steer = [name for name, key in MEASURE_KEYS if key in r and is_valid(r[key].get("validity"))
                 and r[key]["monotonic"].get("increasing_within_ceiling_outside_band")]
        rs = r.get("response") or {}
        w = (rs.get("monitor_within_polarity") or {}).get("pooled_within") or {}
        within = w.get("estimate")
        per[r["trait"]] = {
            "specificity": bool(specificity and specificity["per_trait"][i]["pass"]),
            "steering": bool(steer), "steering_measures": steer,
            "monitoring": bool(is_valid(rs.get("validity")) and within is not None and np.isfinite(within)
                               and within > MONITOR_MIN_WITHIN_R),
            "monitor_within_r": within, **_holdout_target(rs)}
    return {"per_trait": per, "min_traits": MIN_TARGET_TRAITS,
            **{t: {"traits": [n for n, p in per.items() if p[t]],
                   "met": sum(p[t] for p in per.values()) >= MIN_TARGET_TRAITS}
               for t in TARGET_NAMES}}


def _holdout_target(rs: ResponseBlock | dict) -> dict:
    """The blind monitoring test: on the held-out graded prompts, at the layer of the extraction-data rule, the
    within-polarity r above MONITOR_MIN_WITHIN_R and above its null band's upper edge, the measure valid. `rs` is
    the trait's response block ({} where the response measure did not run)."""
    rule = (rs.get("holdout_monitoring") or {}).get("rule") or {}
    w = (rule.get("monitor_within_polarity") or {}).get("pooled_within") or {}
    r, null = w.get("estimate"), rule.get("monitor_within_null")
    ok = (is_valid(rs.get("validity")) and r is not None and np.isfinite(r) and r > MONITOR_MIN_WITHIN_R
          and null is not None and r > null["high"])
    return {"monitoring_holdout": bool(ok), "monitor_holdout_r": r}


def _specificity_metrics(sp: dict) -> dict:
    """A specificity matrix (`specificity_matrix` or `trait_specific_matrix`) as metrics.json holds it: cells and z
    keyed by steered then measured trait, per-trait rows, and the overall pass over traits with a valid measure."""
    names = sp["traits"]

    def by_name(matrix):
        return {a: {b: matrix[i, j] for j, b in enumerate(names)} for i, a in enumerate(names)}

    return {"traits": names, "measure": sp["measure"], "layers": sp["layers"], "coef": sp["coef"],
            "n_random": sp["n_random"], "min_z": sp["min_z"], "z": by_name(sp["z"]), "cells": by_name(sp["cells"]),
            "per_trait": dict(zip(names, sp["per_trait"])),
            "pass": bool(any(sp["valid"]) and all(p["pass"] for p, v in zip(sp["per_trait"], sp["valid"]) if v))}


def reliability_metrics(results: list[TraitResult]) -> dict:
    """Per trait, its vector's split-half reliability (`directions.split_half_cosine` over extraction questions) at
    its steering layer, beside the largest cosine at that layer between its vector and another trait's. A vector
    whose predicted replicate cosine is below that largest cross-trait cosine is closer to another trait's vector
    than to a rerun of itself at the same extraction size (`stable` False; None with a single trait)."""
    out = {}
    for r in results:
        rel = r.get("reliability")
        if rel is None:
            continue
        layer = steering_layer(r)
        vec = r["vectors"]["response_avg"][layer]
        cross = [cosine(vec, other["vectors"]["response_avg"][layer]) for other in results if other is not r]
        largest = max(cross) if cross else None
        predicted = float(rel["predicted"][layer])
        out[r["trait"]] = {"layer": layer, "half": float(rel["half"][layer]), "predicted": predicted,
                           "low": float(rel["low"][layer]), "high": float(rel["high"][layer]),
                           "n_questions": rel["n_groups"], "n_splits": rel["n_splits"],
                           "distinct_splits": rel["distinct_splits"],
                           "largest_cross_trait_cosine": largest,
                           "stable": None if largest is None else bool(predicted > largest),
                           "predicted_by_layer": [float(x) for x in rel["predicted"]]}
    return out


def summary_metrics(results: list[TraitResult], specificity: dict | None = None, max_ppl_ratio: float = 1.5,
                    trait_specific: dict | None = None) -> dict:
    """Monotonic-trait counts per measure and criterion (valid measures only), the cosine and specificity matrices
    (the whole vectors', and their trait-specific parts' as a secondary analysis), and per trait its steering,
    monitoring and validity numbers (what metrics.json and the records carry)."""
    common, names, cos = cosine_matrix(results)
    m = {"monotonic_traits": monotonic_counts(results, max_ppl_ratio), "max_ppl_ratio": max_ppl_ratio,
         "n_traits": len(results), "cosine_layer": common,
         "cosine_matrix": {a: {b: float(cos[i, j]) for j, b in enumerate(names)} for i, a in enumerate(names)}}
    if specificity is not None:
        m["specificity"] = _specificity_metrics(specificity)
    if trait_specific is not None:
        m["specificity_trait_specific"] = {**_specificity_metrics(trait_specific),
                                           "kept_fraction": dict(zip(trait_specific["traits"],
                                                                     trait_specific["kept_fraction"]))}
    m["traits"] = {r["trait"]: _trait_metrics(r) for r in results}
    m["vector_reliability"] = reliability_metrics(results)
    m["targets"] = targets(results, specificity)
    return m
