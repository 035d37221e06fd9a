"""The persona-vectors record lines for benchmarks/results.jsonl, read from a finished `Result`: monotonic-trait
counts, monitoring correlations, specificity diagonals and vector reliabilities, each with its reference, target
and null."""
from __future__ import annotations

import math

import numpy as np

from experiments.persona_vectors.pipeline import Result
from experiments.persona_vectors.trait_result import ResponseMeasure, TraitMetrics, WithinPolarity, WithinR
from psm_jax.persona.stats import MIN_MONOTONIC_RUN, NullBand, pearson_ci


REFERENCE = "Chen et al. 2025 (persona vectors): steering moves trait expression monotonically; r = 0.75-0.83"
CRITERION_TEXT = {"strict": "strictly increasing over the whole coefficient sweep",
                  "run4": f"strictly increasing over >= {MIN_MONOTONIC_RUN} consecutive coefficients spanning both signs",
                  "strict_ppl": "strictly increasing over the coefficients whose perplexity ratio (the model's own "
                                "answers, steered vs not) is <= {ppl:g}, >= 3 of them spanning both signs",
                  "strict_ppl_band": "strictly increasing over the coefficients whose perplexity ratio (the model's "
                                     "own answers, steered vs not) is <= {ppl:g}, >= 3 of them spanning both signs, "
                                     "and the effect m(+cmax) - m(-cmax) above the 95% band of >= 20 random "
                                     "directions at the same norm and layer"}


def _monotonic_records(m: dict) -> list[dict]:
    out = []
    for measure, h in m.get("monotonic_traits", {}).items():
        for crit, value in h["counts"].items():
            text = CRITERION_TEXT["strict_ppl_band" if crit.endswith("_band") else
                                  "strict_ppl" if crit.startswith("strict_ppl") else crit]
            out.append(dict(metric="persona_steering_monotonic_traits", value=value, unit="traits", reference=REFERENCE,
                            target=f">= {math.ceil(2 * h['n_traits'] / 3)} of the {h['n_traits']} traits run "
                                   "(two thirds)",
                            n_traits=h["n_traits"], n_valid=h["n_valid"],
                            valid_traits=h["valid_traits"], measure=measure, criterion=crit,
                            null=("each trait's effect m(+cmax) - m(-cmax) above the 95% band of its >= 20 random "
                                  "directions at matched norm" if crit.endswith("_band") else
                                  "none: a count of curves (the _band criterion adds the random-direction null)"),
                            criterion_text=text.format(ppl=m.get("max_ppl_ratio", 1.5)) + "; counts only traits "
                            "whose measure passed its validity check; held-out half, layer chosen on the selection "
                            "half", key=f"{measure}/{crit}"))
    return out


OVERALL_R_NULL = ("none: r across both polarities is mostly the gap between their clusters; the within-polarity "
                  "line carries the shuffled null")


def _null_band_text(null: NullBand | None, what: str = "measure shuffled within polarity") -> str:
    return f"{what}: 95% band [{null['low']:.3f}, {null['high']:.3f}] ({null['n']} shuffles)" if null else "none"


def _items_monitor_ci(t: TraitMetrics) -> dict:
    """The items' overall r's interval over prompts, where the per-prompt values were kept."""
    x, y = t.get("monitor_proj_last_prompt"), t.get("monitor_behaviour")
    if x is None or y is None or len(x) < 3:
        return {}
    ci = pearson_ci(x, y)
    return {"ci": [ci["low"], ci["high"]]} if np.isfinite([ci["low"], ci["high"]]).all() else {}


def _monitor_records(name: str, t: TraitMetrics) -> list[dict]:
    out = [dict(metric="persona_monitor_r", value=t["monitor_r_last_prompt"], unit="pearson r", reference=REFERENCE,
                target="> 0 (paper 0.75-0.83)", trait=name, layer=t["chosen_layer"], r_response=t["monitor_r_response"],
                measure="items", validity=t.get("validity"), system_prompt_effect=t["system_prompt_effect"],
                key=f"{name}/items", null=OVERALL_R_NULL, **_items_monitor_ci(t))]
    rm = t.get("response_measure")
    if rm:
        out.append(dict(metric="persona_monitor_r", value=rm["r_last_prompt"], unit="pearson r", reference=REFERENCE,
                        target="> 0 (paper 0.75-0.83)", trait=name, layer=rm["layer"], r_response=rm["r_response"],
                        measure="response_likelihood", validity=rm.get("validity"),
                        system_prompt_effect=rm["system_prompt_effect"], key=f"{name}/response_likelihood",
                        null=OVERALL_R_NULL, **_overall_ci(rm.get("monitor_within_polarity"))))
        w = rm.get("monitor_within_polarity")
        if w:
            pw, null = w["pooled_within"], rm.get("monitor_within_null")
            band = f"; {_null_band_text(null)}" if null else ""
            out.append(dict(metric="persona_monitor_within_r", value=pw["estimate"], unit="pearson r",
                            reference=f"{REFERENCE}; within polarity (positive / negative / default prompts' means "
                                      f"removed), 95% CI [{pw['low']:.3f}, {pw['high']:.3f}], n={pw['n']} prompts; "
                                      f"overall r {w['overall']['estimate']:.3f}{band}",
                            target="> 0.5", trait=name, layer=rm["layer"], measure="response_likelihood",
                            validity=rm.get("validity"), ci=[pw["low"], pw["high"]], null_band=null, key=name,
                            null=_null_band_text(null), **ceiling_fields(rm)))
        out += _rule_monitor_records(name, rm) + _holdout_monitor_records(name, rm)
    return out


def _overall_ci(w: WithinR | None) -> dict:
    return {"ci": [w["overall"]["low"], w["overall"]["high"]]} if w else {}


def _holdout_monitor_records(name: str, rm: ResponseMeasure) -> list[dict]:
    """The within-polarity r on the held-out graded prompts at each layer it ran (key <trait>/<steering|rule>)."""
    hold = rm.get("holdout_monitoring") or {}
    out = []
    for layer_name in ("steering", "rule"):
        w = (hold.get(layer_name) or {}).get("monitor_within_polarity")
        if not w:
            continue
        h, pw, lc = hold[layer_name], w["pooled_within"], hold["level_check"]["pooled_within"]
        null = h["monitor_within_null"]
        band = f"; null band [{null['low']:.3f}, {null['high']:.3f}]" if null else ""
        out.append(dict(metric="persona_monitor_within_r_holdout", value=pw["estimate"], unit="pearson r",
                        reference=f"{REFERENCE}; within polarity on {len(hold['systems'])} held-out graded system "
                                  f"prompts, layer fixed before they ran ({layer_name}), 95% CI [{pw['low']:.3f}, "
                                  f"{pw['high']:.3f}]{band}; stated level vs measure within polarity "
                                  f"{lc['estimate']:.3f}",
                        target="> 0.5 and above the null band", trait=name, layer=h["layer"], layer_rule=layer_name,
                        measure="response_likelihood", validity=rm.get("validity"), ci=[pw["low"], pw["high"]],
                        null_band=null, level_check_within=lc["estimate"], key=f"{name}/{layer_name}",
                        null=_null_band_text(null),
                        **ceiling_fields(h)))
    return out


def _rule_monitor_records(name: str, rm: ResponseMeasure) -> list[dict]:
    """The within-polarity r at the layer of the extraction-data rule, with its interval and null band."""
    rule = rm.get("rule_monitoring")
    w = (rule or {}).get("monitor_within_polarity")
    if not w:
        return []
    pw, null = w["pooled_within"], rule["monitor_within_null"]
    band = f"; {_null_band_text(null)}" if null else ""
    return [dict(metric="persona_monitor_within_r_rule_layer", value=pw["estimate"], unit="pearson r",
                 reference=f"{REFERENCE}; within polarity at the layer of largest cross-fitted pos/neg separation of "
                           f"the extraction rows' last-prompt projections (fixed without monitoring data), 95% CI "
                           f"[{pw['low']:.3f}, {pw['high']:.3f}], n={pw['n']} prompts{band}",
                 target="> 0.5", trait=name, layer=rule["layer"], steering_layer=rm["layer"],
                 rule_separation=float(rule["separation"][rule["layer"]]), measure="response_likelihood",
                 validity=rm.get("validity"), ci=[pw["low"], pw["high"]], null_band=null, key=name,
                 null=_null_band_text(null), **ceiling_fields(rule))]


def ceiling_fields(mon: WithinPolarity) -> dict:
    """Record fields for one monitoring result's noise ceiling (`monitoring.within_reliability`); none where it was not
    computed."""
    rel = mon.get("within_reliability")
    if not rel:
        return {}
    return {"within_ceiling": rel["ceiling"], "measure_reliability": rel["measure"]["reliability"],
            "projection_reliability": rel["projection"]["reliability"]}


def _specificity_records(sp: dict | None, component: str = "whole") -> list[dict]:
    """One line per steered trait whose own measure is valid: its diagonal z, the largest off-diagonal |z|, pass.
    `component` "trait_specific" marks the secondary matrix of the vectors' trait-specific parts (key
    `<trait>/trait_specific`, with the fraction of the vector's length the part keeps)."""
    if not sp:
        return []
    out = []
    for i, (name, p) in enumerate(sp["per_trait"].items()):
        if not p["valid"]:
            continue
        line = dict(metric="steering_specificity_diag_z", value=p["diag_z"], unit="z (random directions)",
                    reference="Chen et al. 2025 (persona vectors): a trait's vector moves its own trait; here "
                              f"against {sp['n_random']} random directions at matched norm and layer",
                    target=f"> {sp['min_z']:g} with every off-diagonal |z| below it", trait=name,
                    measure=sp["measure"][i], layer=sp["layers"][i], coef=sp["coef"],
                    offdiag_max_abs_z=p["offdiag_max_abs_z"], n_offdiag=p["n_offdiag"], passed=p["pass"],
                    matrix_pass=sp["pass"], n_random=sp["n_random"], key=name, component=component,
                    null=f"{sp['n_random']} random directions at matched norm and layer (z = 0 is their mean)")
        if component == "trait_specific":
            line.update(key=f"{name}/trait_specific", analysis="secondary",
                        kept_fraction=sp["kept_fraction"][name],
                        reference="Chen et al. 2025 (persona vectors), secondary analysis: the part of a trait's "
                                  "vector orthogonal to the other traits' vectors at its layer, at the whole "
                                  f"vector's norm, against {sp['n_random']} random directions at that norm and layer")
        out.append(line)
    return out


def _reliability_records(rel: dict | None) -> list[dict]:
    """One line per trait: its vector's predicted replicate cosine at its steering layer (`reliability_metrics`)."""
    out = []
    for name, x in (rel or {}).items():
        cross = x["largest_cross_trait_cosine"]
        out.append(dict(metric="persona_vector_split_half_cosine", value=x["predicted"], unit="cosine",
                        reference=f"split halves of {x['n_questions']} extraction questions ({x['n_splits']} random "
                                  f"splits), stepped up to the full size (Spearman-Brown): the expected cosine of "
                                  f"a rerun's vector; half cosine {x['half']:.3f}, 95% of splits [{x['low']:.3f}, "
                                  f"{x['high']:.3f}]" + ("" if cross is None else
                                                          f"; largest cross-trait cosine {cross:.3f}"),
                        target="> largest cross-trait cosine", trait=name, key=name, layer=x["layer"],
                        n_questions=x["n_questions"], largest_cross_trait_cosine=cross, stable=x["stable"],
                        null="none: one trait, no cross-trait cosine" if cross is None
                        else f"largest cross-trait cosine {cross:.3f}"))
    return out


def result_records(result: Result) -> list[dict]:
    """Monotonic-trait counts per measure and criterion (valid measures only), the monitoring correlation per trait
    and measure, the specificity diagonal per trait and each vector's split-half reliability (lines whose value is
    not finite are left out)."""
    m = result.metrics
    out = _monotonic_records(m)
    for name, t in m["traits"].items():
        out += _monitor_records(name, t)
    out += _specificity_records(m.get("specificity"))
    out += _specificity_records(m.get("specificity_trait_specific"), "trait_specific")
    out += _reliability_records(m.get("vector_reliability"))
    return [ln for ln in out if isinstance(ln["value"], (int, str)) or
            (ln["value"] is not None and np.isfinite(ln["value"]))]
