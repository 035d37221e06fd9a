"""The fine-tuning study's lines for benchmarks/results.jsonl, read from a finished `Result`: the correlations across
fine-tunes, the vector's reliability, prevention per run and over runs, inoculation and the persona switch, the
narrow-vs-general spread and the model-diffing overlaps, each with its reference, target and null."""
from __future__ import annotations

import numpy as np

from experiments.finetune.config import RAW_STATISTIC
from experiments.finetune.pipeline import Result
from experiments.finetune.report_text import DIFF_COMPARISONS, overlap_text, seeds_text
from experiments.finetune.summary import prevention_pooled_target, prevention_runs_target, prevention_target
from experiments.finetune.trait_result import Correlation, Metrics, ModelDiff, Overlap, Spearman, TraitMetrics


def result_records(result: Result) -> list[dict]:
    """The correlations across fine-tunes, the prevention per trait and strength, and the optional variants."""
    m, cfg = result.metrics, result.config
    common = dict(model=cfg.model, traits=list(cfg.traits), steps=cfg.steps, n_train=cfg.n_train_questions,
                  n_eval=cfg.n_eval_questions, seed=cfg.seed)
    out = _correlation_records(m, cfg, common)
    for trait, per in m["traits"].items():
        valid = per["validity"]["valid"]
        out += _reliability_records(trait, per, cfg, common)
        out += _prevention_records(trait, per, valid, common)
        out += _prevention_over_runs_records(trait, per, valid, common)
        out += _effect_records(trait, per, valid, common)
    out += _beyond_records(result, common)
    return [ln for ln in out if np.isfinite(ln["value"])]


def _correlation_records(m: Metrics, cfg, common: dict) -> list[dict]:
    """The shift-behaviour and screening correlations across fine-tunes.

    A correlation over fine-tunes of several traits where no trait has 3 of its own (`RAW_STATISTIC`, e.g. one mix
    per trait) compares the traits with each other, not the relation inside a trait that the claim is about: the
    report shows it with that caveat, and no line is recorded."""
    out = []
    for key, metric, ref in (("shift_behaviour", "finetune_shift_behaviour_r", "Chen et al. 2025: r = 0.76-0.97"),
                             ("screening_shift", "finetune_screening_r", "Chen et al. 2025: screening predicts shift")):
        c = m[key]
        if c is not None and not (c["statistic"] == RAW_STATISTIC and len(set(cfg.traits)) > 1):
            raw, vs_original = c["unstandardised"], m[f"{key}_raw"]
            out.append(dict(metric=metric, value=c["r"]["estimate"], unit="pearson r", statistic=c["statistic"],
                            target="> 0.7 (issue 12), above the shuffled null", outside_null=c["outside_null"],
                            low=c["r"]["low"], high=c["r"]["high"], n=c["n"], null_kind=c["null_kind"],
                            null_low=c["null"]["low"], null_high=c["null"]["high"],
                            relative_to_control=m["relative_to_control"],
                            per_trait_r=dict(c.get("per_trait", {})),
                            pooled_r_unstandardised=raw["r"]["estimate"], pooled_r_unstandardised_low=raw["r"]["low"],
                            pooled_r_unstandardised_high=raw["r"]["high"],
                            pooled_r_unstandardised_null_low=raw["null"]["low"],
                            pooled_r_unstandardised_null_high=raw["null"]["high"],
                            vs_original_r=None if vs_original is None else vs_original["r"]["estimate"],
                            **_within_fields(c), ci=[c["r"]["low"], c["r"]["high"]],
                            null=f"{c['null_kind']}: 95% band [{c['null']['low']:+.2f}, {c['null']['high']:+.2f}]",
                            reference=f"{ref}; {c['statistic']}; 95% CI [{c['r']['low']:.3f}, {c['r']['high']:.3f}], "
                                      f"n={c['n']} fine-tunes; null ({c['null_kind']}) [{c['null']['low']:.2f}, "
                                      f"{c['null']['high']:.2f}]", **common))
    return out


def _reliability_records(trait: str, per: TraitMetrics, cfg, common: dict) -> list[dict]:
    """The split-half cosine of the trait's fine-tuning vector, where the run measured it."""
    rel = per.get("vector_reliability")
    if rel is None:
        return []
    return [dict(metric="finetune_vector_split_half_cosine", value=rel["predicted"], unit="cosine",
                 low=rel["low"], high=rel["high"], n_questions=rel["n_groups"],
                 distinct_splits=rel["distinct_splits"], key=trait, trait=trait, layer=per["layer"],
                 reference=f"split halves of {rel['n_groups']} extraction questions x "
                           f"{cfg.n_extract_pairs} instruction pairs, greedy answers, stepped up to the "
                           "full size (Spearman-Brown); 2.5-97.5% over splits",
                 target="reported beside the shifts measured along the vector",
                 null="none: a reliability, read beside the shifts", **common)]


def _prevention_records(trait: str, per: TraitMetrics, valid: bool, common: dict) -> list[dict]:
    """Preventative steering's shift reduction per method and strength, over questions of one training run."""
    out = []
    for p in per.get("prevention", []):
        red = p["reduction"]
        out.append(dict(metric="preventative_steering_shift_reduction", value=red["estimate"], unit="fraction",
                        target=">= 0.5 at < 5% perplexity cost (issue 12)", trait=trait, method=p["kind"],
                        coef=p["coef"], key=f"{trait}/{p['name']}", ppl_ratio=(p["ppl"] or {}).get("ratio"),
                        low=red["low"], high=red["high"], relative_to_control=p["relative_to_control"],
                        ppl_vs_plain=(p.get("ppl_vs_plain") or {}).get("ratio"), meets_target=prevention_target(p),
                        plain_ppl_ratio=(p["plain_ppl"] or {}).get("ratio"), measure_valid=valid,
                        plain_toward_trait=p.get("plain_toward_trait"), ci=[red["low"], red["high"]],
                        null="0: no reduction of the plain fine-tune's shift beyond the control",
                        reference=f"Chen et al. 2025: shift near 0 with steering; 95% CI [{red['low']:.3f}, "
                                  f"{red['high']:.3f}], n={red['n']} questions; plain shift "
                                  f"{p['plain_shift']['estimate']:.3g}", **common))
    return out


def _prevention_over_runs_records(trait: str, per: TraitMetrics, valid: bool, common: dict) -> list[dict]:
    """Preventative steering over independent training runs: the mean of per-run reductions and the ratio of means."""
    out = []
    for p in per.get("prevention_over_runs", []):
        red, toward, pooled = p["reduction"], p["plain_vs_control"], p["pooled_reduction"]
        shared = dict(unit="fraction", trait=trait, coef=p["coef"], key=f"{trait}/{p['name']}", n=p["n_runs"],
                      n_unit="training runs", seeds=p["seeds"], measure_valid=valid,
                      target=">= 0.5 (interval over runs) at < 5% perplexity cost, plain shift beyond the control "
                             "above 0 over runs",
                      null="0: no reduction of the plain fine-tune's shift beyond the control", **common)
        runs = f"{p['n_runs']} training runs (seeds {seeds_text(p['seeds'])})"
        out.append(dict(shared, metric="preventative_steering_reduction_over_runs", value=red["estimate"],
                        low=red["low"], high=red["high"], ci=[red["low"], red["high"]],
                        per_run=[r["reduction"]["estimate"] for r in p["per_run"]],
                        plain_vs_control=toward["estimate"], plain_vs_control_low=toward["low"],
                        plain_vs_control_high=toward["high"], ppl_vs_plain_mean=p["ppl_vs_plain_mean"],
                        ppl_vs_plain_max=p["ppl_vs_plain_max"], meets_target=prevention_runs_target(p),
                        runs_meeting_target_alone=sum(r["meets_target"] for r in p["per_run"]),
                        reference=f"Chen et al. 2025: shift near 0 with steering; mean over {runs}, Student-t 95% CI "
                                  f"[{red['low']:.3f}, {red['high']:.3f}]; plain shift beyond the control "
                                  f"{toward['estimate']:.3g} [{toward['low']:.3g}, {toward['high']:.3g}]"))
        out.append(dict(shared, metric="preventative_steering_pooled_reduction_over_runs", value=pooled["estimate"],
                        low=pooled["low"], high=pooled["high"], ci=[pooled["low"], pooled["high"]],
                        meets_target=prevention_pooled_target(p),
                        statistic="1 - mean(steered - control) / mean(plain - control) over runs; leave-one-run-"
                                  "out jackknife interval at Student-t critical values",
                        reference=f"Chen et al. 2025: shift near 0 with steering; ratio of means over {runs}, "
                                  f"jackknife-t 95% CI [{pooled['low']:.3f}, {pooled['high']:.3f}]"))
    return out


def _effect_records(trait: str, per: TraitMetrics, valid: bool, common: dict) -> list[dict]:
    """Inoculation's and the persona switch's effect on the trait score, where the run has them."""
    out = []
    for name in ("inoculation_effect", "persona_switch_effect"):
        if name in per:
            e = per[name]
            out.append(dict(metric=name, value=e["estimate"], unit="trait score (per-token log-lik diff)",
                            target="< 0" if name.startswith("inoc") else "> 0", trait=trait, key=trait,
                            measure_valid=valid, reference=f"95% CI [{e['low']:.3f}, {e['high']:.3f}], "
                                                           f"n={e['n']} questions", ci=[e["low"], e["high"]],
                            null="0: no difference from the plain fine-tune", **common))
    return out


def _within_fields(c: Correlation) -> dict:
    """The within-trait r of a correlation record, with its interval and its shuffled-inside-traits band."""
    if "within_trait_null" not in c:
        return {}
    w, band = c["within_trait"], c["within_trait_null"]
    return dict(within_trait_r=w["estimate"], within_trait_low=w["low"], within_trait_high=w["high"],
                within_trait_null_low=band["low"], within_trait_null_high=band["high"],
                within_trait_outside_null=c["within_trait_outside_null"])


def _beyond_records(result: Result, common: dict) -> list[dict]:
    """narrow_vs_general_spread per KL weight and model_diff_latent_overlap."""
    out, nv, md = [], result.beyond.get("narrow"), result.beyond.get("model_diff")
    if nv is not None:
        valid = next(r["validity"]["valid"] for r in result.results if r["trait"] == nv["trait"])
        ctrl = nv["control_changes"]
        for row in nv["per_kl"]:
            s, ind, ood = row["spread"], row["in_domain"], row["out_of_domain"]
            out.append(dict(metric="narrow_vs_general_spread", value=s["estimate"], key=f"{row['kl_weight']:g}",
                            unit="fraction (out-of-domain / in-domain trait score change, beyond control)",
                            target="near 0 with KL (narrow), Soligo et al. 2026", kl_weight=row["kl_weight"],
                            trait=nv["trait"], low=s["low"], high=s["high"], n_in=s["n_den"], n_out=s["n_num"],
                            in_domain_effect=ind["estimate"], in_domain_low=ind["low"], in_domain_high=ind["high"],
                            out_of_domain_effect=ood["estimate"], readable=row["readable"], measure_valid=valid,
                            null_control_in=ctrl["in"][nv["trait"]]["estimate"],
                            null_control_out=ctrl["out"][nv["trait"]]["estimate"], ci=[s["low"], s["high"]],
                            null=f"the control fine-tune's trait score change: in-domain "
                                 f"{ctrl['in'][nv['trait']]['estimate']:+.3g}, out-of-domain "
                                 f"{ctrl['out'][nv['trait']]['estimate']:+.3g} (the spread is taken beyond it)",
                            reference=f"95% CI [{s['low']:.3f}, {s['high']:.3f}], n={s['n_den']} in-domain + "
                                      f"{s['n_num']} out-of-domain questions; in-domain effect {ind['estimate']:.3g} "
                                      f"[{ind['low']:.3g}, {ind['high']:.3g}]", **common))
    if md is not None:
        out.append(_overlap_record(md["overlap"], md["spearman"], md, common,
                                   control_overlap=md.get("control_overlap")))
        for key, what in DIFF_COMPARISONS.items():
            if key in md:
                out.append(_overlap_record(md[key]["overlap"], md[key]["spearman"], md, common, key=key,
                                           what=f"{what}; "))
    return out


def _overlap_record(ov: Overlap, sp: Spearman, md: ModelDiff, common: dict, *, key: str | None = None, what: str = "",
                    control_overlap: int | None = None) -> dict:
    """A model_diff_latent_overlap line: the top-k overlap with its chance and random band, and the Spearman r."""
    line = dict(metric="model_diff_latent_overlap", value=ov["overlap"] / ov["k"], unit="fraction of top-k",
                target="above the random band (Wang et al. 2025)", k=ov["k"], overlap=ov["overlap"],
                chance=ov["chance"] / ov["k"], null_low=ov["null"]["low"] / ov["k"],
                null_high=ov["null"]["high"] / ov["k"], n=ov["n_latents"], above_null=ov["above_null"],
                spearman_r=sp["r"]["estimate"], spearman_low=sp["r"]["low"], spearman_high=sp["r"]["high"],
                spearman_outside_null=sp["outside_null"], sae=md["sae"]["source"], trait=md["trait"],
                overlap_low=ov["interval"]["low"], overlap_high=ov["interval"]["high"], n_questions=sp["r"]["n"],
                overlap_left_out_min=ov["interval"]["left_out_min"],
                overlap_left_out_max=ov["interval"]["left_out_max"],
                ci=[ov["interval"]["low"] / ov["k"], ov["interval"]["high"] / ov["k"]],
                null=f"random top-{ov['k']} sets among {ov['n_latents']} latents: 95% band "
                     f"[{ov['null']['low'] / ov['k']:.3g}, {ov['null']['high'] / ov['k']:.3g}]",
                reference=f"{what}top-{ov['k']} overlap {overlap_text(ov)} (chance {ov['chance']:.2f}, random band "
                          f"[{ov['null']['low']:.0f}, {ov['null']['high']:.0f}]) among {ov['n_latents']} latents; "
                          f"Spearman r {sp['r']['estimate']:.3f} [{sp['r']['low']:.3f}, {sp['r']['high']:.3f}]; "
                          f"intervals over {sp['r']['n']} questions",
                **common)
    if control_overlap is not None:
        line["control_overlap"] = control_overlap / ov["k"]
    if key is not None:
        line["key"] = key
    return line
