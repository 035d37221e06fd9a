"""Step 6, across fine-tunes: the shift-behaviour and screening correlations (taken beyond each trait's control),
the prevention summaries per training run and over runs, and the targets they are read against. Pure functions of
the evaluated rows, so they can be checked on constructed numbers."""
from __future__ import annotations

import numpy as np

from experiments.finetune.config import HEADLINE_STATISTIC, RAW_STATISTIC, Config
from experiments.finetune.trait_result import (BeyondControl, Correlation, Correlations, FineTuneRow, Metrics,
                                               Prevention, PreventionOverRuns, RawCorrelation, RowSummary, TraitMetrics,
                                               TraitResult)
from psm_jax.persona.stats import (mean_t_ci, outside_band, paired_effect, pearson_ci, permutation_r_null,
                                   perplexity_ratio_ci, reduction_ci, reduction_jackknife_ci, standardised_pooled_r,
                                   within_groups_null, within_groups_r)


def correlation(x, y, groups, seed: int) -> Correlation | None:
    """The correlation across fine-tunes of several traits; None with fewer than 3 fine-tunes or no spread.

    Headline (`r`, `null`, `outside_null`, named by `statistic`): the pooled r over per-trait standardised values
    (`stats.standardised_pooled_r`: x and y centred and divided by their standard deviation inside each trait), with
    a bootstrap interval resampling fine-tunes inside each trait and a null band of y shuffled inside each trait;
    `per_trait` gives each trait's own r (with n, and an interval where n >= 4). This statistic was chosen before the
    seed-1 run: each trait has its own persona-vector norm and trait-score scale, so the unstandardised pooled r
    mixes those scales with the relation (and the traits' offsets with each other), while the claim, like Chen et
    al.'s per-trait r, is about the relation inside a trait. Where no trait has >= 3 fine-tunes with spread in x and
    y, the headline is the unstandardised pooled r (`statistic` says which).

    Secondary: `unstandardised` (the pooled r of raw values with pairs shuffled across all fine-tunes as its null)
    and `within_trait` (r of values centred per trait, not scaled, with pairs shuffled inside each trait as null)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size < 3 or x.std() == 0 or y.std() == 0:
        return None
    r, null = pearson_ci(x, y, seed=seed), permutation_r_null(x, y, seed=seed)
    raw = RawCorrelation(r=r, null=null, n=int(x.size), outside_null=outside_band(r["estimate"], null))
    std = standardised_pooled_r(x, y, list(groups), seed=seed)
    out: Correlation
    if std is None:
        out = {**raw, "statistic": RAW_STATISTIC, "null_kind": "pairs shuffled across all fine-tunes"}
    else:
        out = {"r": std["r"], "null": std["null"], "outside_null": std["outside_null"], "n": std["n"],
               "statistic": HEADLINE_STATISTIC, "null_kind": "pairs shuffled inside each trait",
               "per_trait": std["per_group"], "dropped_traits": std["dropped_groups"]}
    out["unstandardised"] = raw
    if len(set(groups)) > 1:
        out["within_trait"] = within_groups_r(x, y, groups, seed=seed)["pooled_within"]
        if np.isfinite(out["within_trait"]["estimate"]):  # NaN where x or y is constant inside every trait
            out["within_trait_null"] = within_groups_null(x, y, groups, seed=seed)
            out["within_trait_outside_null"] = outside_band(out["within_trait"]["estimate"], out["within_trait_null"])
    return out


def beyond_control(results: list[TraitResult], seed: int) -> list[BeyondControl]:
    """Per mix fine-tune, its shift and trait score change minus the control fine-tune's of the same trait, paired
    over the evaluation questions: what the trait data did beyond the drift that training on the model's own
    answers causes (the same questions, key and batch order). Empty for traits without a control."""
    out = []
    for r in results:
        control = next((row for row in r["rows"] if row["variant"].kind == "control"), None)
        if control is None:
            continue
        for row in r["rows"]:
            if row["variant"].kind == "mix":
                out.append({"trait": r["trait"], "name": row["variant"].name, "screening": row["variant"].screening,
                            "shift": paired_effect(row["shift"]["per_question"], control["shift"]["per_question"],
                                                   seed=seed),
                            "score_change": paired_effect(row["score"], control["score"], seed=seed)})
    return out


def _correlations(results: list[TraitResult], cfg: Config) -> Correlations:
    """Shift vs behaviour and screening vs shift across fine-tunes of every trait. Headline ('shift_behaviour',
    'screening_shift'): on the mix fine-tunes' changes beyond their trait's control (the control is 0 by
    construction and left out of n); without a control fine-tune, on the raw changes. '*_raw': on the raw changes
    from the original model, the control included, for comparison."""
    plain = [(r["trait"], row) for r in results for row in r["rows"] if row["variant"].kind in ("mix", "control")]
    groups = [t for t, _ in plain]
    shift = [float(row["shift"]["ci"]["estimate"]) for _, row in plain]
    behaviour = [float(row["score_change"]["estimate"]) for _, row in plain]
    screening = [float(row["variant"].screening) for _, row in plain]
    raw = {"shift_behaviour_raw": correlation(shift, behaviour, groups, cfg.seed),
           "screening_shift_raw": correlation(screening, shift, groups, cfg.seed)}
    rel = beyond_control(results, cfg.seed)
    if not rel:
        return {"shift_behaviour": raw["shift_behaviour_raw"], "screening_shift": raw["screening_shift_raw"],
                "relative_to_control": False, "n_plain_finetunes": len(plain), "beyond_control": [], **raw}
    groups = [b["trait"] for b in rel]
    shift = [b["shift"]["estimate"] for b in rel]
    return {"shift_behaviour": correlation(shift, [b["score_change"]["estimate"] for b in rel], groups, cfg.seed),
            "screening_shift": correlation([b["screening"] for b in rel], shift, groups, cfg.seed),
            "relative_to_control": True, "n_plain_finetunes": len(plain), "beyond_control": rel, **raw}


def summarize(results: list[TraitResult], cfg: Config) -> Metrics:
    """Headline numbers: the two correlations, the prevention and the optional variants per trait."""
    m: Metrics = {**_correlations(results, cfg), "traits": {}}
    for r in results:
        by_kind: dict[str, list[FineTuneRow]] = {}
        for row in r["rows"]:
            by_kind.setdefault(row["variant"].kind, []).append(row)
        full_mix = [row for row in by_kind.get("mix", []) if row["variant"].mix == max(cfg.mixes)]
        per: TraitMetrics = {"layer": r["layer"], "validity": r["validity"], "vector_norm": r["vector_norm"],
               "vector_reliability": r.get("vector_reliability"),
               "screening_validity": r["screening_validity"], "finetunes": [row_summary(row) for row in r["rows"]]}
        if full_mix and max(cfg.mixes) > 0:
            ref = full_mix[0]
            per["prevention"] = prevention_summaries(r["rows"], cfg)
            if "prevention_runs" in r:
                per["prevention_over_runs"] = prevention_over_runs([per["prevention"]] + r["prevention_runs"]["runs"],
                                                                   r["prevention_runs"]["seeds"])
            if "inoculation" in by_kind:
                ino = by_kind["inoculation"][0]
                per["inoculation_effect"] = paired_effect(ino["score"], ref["score"], seed=cfg.seed)
        if "switch" in by_kind:
            per["persona_switch_effect"] = by_kind["switch"][0]["switch"]
        m["traits"][r["trait"]] = per
    return m


def prevention_summaries(rows: list[FineTuneRow], cfg: Config) -> list[Prevention]:
    """Each preventative and CAFT fine-tune of one trait and run against the plain fine-tune at the largest mix
    (and the control, where there is one)."""
    plain = next(row for row in rows if row["variant"].kind == "mix" and row["variant"].mix == max(cfg.mixes))
    control = next((row for row in rows if row["variant"].kind == "control"), None)
    return [_prevention(row, plain, control, cfg) for kind in ("prevent", "caft") for row in rows
            if row["variant"].kind == kind]


def prevention_over_runs(runs: list[list[Prevention]], seeds: list[int]) -> list[PreventionOverRuns]:
    """Each preventative coefficient across independent training runs (`runs[k]`: run k's `prevention_summaries`,
    run 0 the primary): one reduction per run (its estimate over questions), the mean with a Student-t interval over
    runs, the ratio of means (`stats.reduction_jackknife_ci`), the plain fine-tune's shift beyond the control with
    its t interval, and the perplexity cost per run."""
    out = []
    for first in runs[0]:
        if first["kind"] != "prevent":
            continue
        per_run = [next(p for p in run if p["name"] == first["name"]) for run in runs]
        ppl = [(p.get("ppl_vs_plain") or {}).get("ratio", float("nan")) for p in per_run]
        plain = [p["plain_vs_control"]["estimate"] for p in per_run]
        out.append({"name": first["name"], "coef": first["coef"], "n_runs": len(per_run), "seeds": list(seeds),
                    "reduction": mean_t_ci([p["reduction"]["estimate"] for p in per_run]),
                    "pooled_reduction": reduction_jackknife_ci([p["steered_vs_control"]["estimate"] for p in per_run],
                                                               plain),
                    "plain_vs_control": mean_t_ci(plain),
                    "ppl_vs_plain_mean": float(np.mean(ppl)), "ppl_vs_plain_max": float(np.max(ppl)),
                    "per_run": [{"seed": seed, "reduction": p["reduction"], "plain_vs_control": p["plain_vs_control"],
                                 "steered_vs_control": p["steered_vs_control"],
                                 "ppl_vs_plain": (p.get("ppl_vs_plain") or {}).get("ratio"),
                                 "meets_target": prevention_target(p)} for seed, p in zip(seeds, per_run)]})
    return out


def row_summary(row: FineTuneRow) -> RowSummary:
    """One fine-tune as metrics.json and the report keep it: the variant and its summary statistics, without the
    per-question arrays, answers and loss log that only the computation and the figures read."""
    v = row["variant"]
    return {"name": v.name, "kind": v.kind, "mix": v.mix, "coef": v.coef, "screening": v.screening,
            "shift": row["shift"]["ci"], "shift_null": row["shift"]["null"], "score_change": row["score_change"],
            "ppl": row.get("ppl"), "final_loss": row["training"]["loss"][-1],
            "train_seconds": row["training"]["seconds"], "tokens_per_s": row["training"]["tokens_per_s"]}


def _prevention(row: FineTuneRow, plain: FineTuneRow, control: FineTuneRow | None, cfg: Config) -> Prevention:
    """The steered fine-tune vs the plain one on the same data. With a control fine-tune, the reduction is of the
    shift beyond the control (the drift any fine-tune causes removed from both): 1 - mean(steered - control) /
    mean(plain - control) per question; it reads as prevention only where the plain fine-tune moved the projection
    toward the trait beyond the control (`plain_toward_trait`). Without a control, 1 - steered / plain.
    `ppl_vs_plain`: the steered model's perplexity over the plain fine-tune's (the cost of the steering itself)."""
    a, b = row["shift"]["per_question"], plain["shift"]["per_question"]
    extra = {"reduction_raw": reduction_ci(a, b, seed=cfg.seed)}
    if control is not None:
        c = control["shift"]["per_question"]
        extra.update(plain_vs_control=paired_effect(b, c, seed=cfg.seed),
                     steered_vs_control=paired_effect(a, c, seed=cfg.seed),
                     reduction=reduction_ci(a - c, b - c, seed=cfg.seed))
        extra["plain_toward_trait"] = bool(extra["plain_vs_control"]["low"] > 0)
    else:
        extra["reduction"] = extra["reduction_raw"]
    if "ppl_nll" in row and "ppl_nll" in plain:
        extra["ppl_vs_plain"] = perplexity_ratio_ci(*plain["ppl_nll"], *row["ppl_nll"])
    return {**extra, "name": row["variant"].name, "kind": row["variant"].kind, "coef": row["variant"].coef,
            "relative_to_control": control is not None, "shift_difference": paired_effect(a, b, seed=cfg.seed),
            "score_difference": paired_effect(row["score"], plain["score"], seed=cfg.seed),
            "ppl": row.get("ppl"), "plain_ppl": plain.get("ppl"), "plain_shift": plain["shift"]["ci"]}


def prevention_target(p: Prevention) -> bool:
    """Issue 12's target for one steered fine-tune: the plain fine-tune moved toward the trait (beyond the control
    where there is one), the shift is cut by >= 50% (interval's low end) and the perplexity over the plain
    fine-tune's is < 1.05."""
    cost = p.get("ppl_vs_plain")
    return bool(p.get("plain_toward_trait", p["plain_shift"]["low"] > 0) and p["reduction"]["low"] >= 0.5
                and cost is not None and cost["ratio"] < 1.05)


def prevention_pooled_target(p: PreventionOverRuns) -> bool:
    """`prevention_runs_target` read on the ratio of means over runs (`pooled_reduction`, from
    `stats.reduction_jackknife_ci`) instead of the mean of per-run ratios."""
    return bool(p["plain_vs_control"]["low"] > 0 and p["pooled_reduction"]["low"] >= 0.5
                and p["ppl_vs_plain_mean"] < 1.05)


def prevention_runs_target(p: PreventionOverRuns) -> bool:
    """The target read over training runs: the plain fine-tune moves toward the trait beyond the control (interval
    over runs above 0), the mean reduction's interval over runs has its low end >= 0.5, and the steered fine-tunes'
    perplexity over the plain ones' is < 1.05 on average."""
    return bool(p["plain_vs_control"]["low"] > 0 and p["reduction"]["low"] >= 0.5 and p["ppl_vs_plain_mean"] < 1.05)
