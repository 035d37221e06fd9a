"""The sentences of the persona-vectors report: each turns one piece of a finished run (a measure's validity, a
steering curve, a monitoring result, a target, a reading rule) into the words report.md shows, so the section
writers (`report_folder`) only arrange them."""
from __future__ import annotations

import numpy as np

from experiments.persona_vectors.config import Config
from experiments.persona_vectors.summary import MIN_TARGET_TRAITS, MONITOR_MIN_WITHIN_R, TARGET_NAMES
from experiments.persona_vectors.trait_result import (FilterInfo, HoldoutMonitoring, RandomControl, ResponseBlock,
                                                      RuleMonitoring, SteeringCurve, TraitResult, Validity,
                                                      WithinPolarity, WithinReliability)
from experiments.report import fmt_num as _fmt
from psm_jax.persona import measures
from psm_jax.persona.stats import MIN_MONOTONIC_RUN, MIN_NULL_DRAWS


def validity_words(check: Validity | None) -> str:
    return measures.validity_text(check) if check else "n/a (no unit under both polarities)"


def _control_words(control: RandomControl) -> str:
    """The random-direction control at +-cmax, or why it was not computed."""
    if control["measure"] is None:
        return f"random-direction control not computed ({control['skipped']})"
    return (f"random direction at c=+-{control['coefs'][1]:g}: " + ", ".join(f"{m:+.3f}" for m in control["measure"])
            + _band_text(control))


def _curve_words(st: SteeringCurve) -> str:
    mono = st["monotonic"]
    return (", ".join(f"c={c:+g}: {m:+.3f} (ppl x{p:.2f})" for c, m, p in zip(st["coefs"], st["measure"],
                                                                           st["ppl_ratio"]))
            + f"; increasing over the sweep: {mono['increasing']}, over the points within the perplexity ceiling: "
              f"{mono['increasing_within_ceiling']}; monotonic for c<=0: {mono['neg']}, for c>=0: {mono['pos']}")


def _response_trait_line(rs: ResponseBlock) -> str:
    ls = rs["layer_sweep"]
    return (f"Response-likelihood measure: validity (no steering, pos minus neg system prompts, per held-out unit): "
            f"{validity_words(rs.get('validity'))}. Layer {rs['layer']} chosen on {rs['n_selection']} selection pairs "
            "(effect per layer: " + ", ".join(f"L{L}: {e:+.3f}" for L, e in zip(ls["layers"], ls["effect"]))
            + f"); held-out curve ({rs['n_held_out']} pairs): {_curve_words(rs)}; {_control_words(rs['random_control'])}. "
            f"r(last-prompt projection at L{rs['layer']}, measure) = {_fmt(rs['r_last_prompt'])}"
            f"{_within_text(rs)}, "
            f"r(response projection, measure) = {_fmt(rs['r_response'])}.{_rule_words(rs.get('rule_monitoring'))}"
            f"{_holdout_words(rs.get('holdout_monitoring'))} "
            f"Reference pairs with an empty answer (dropped): {rs['n_dropped']}.")


def _holdout_words(hold: HoldoutMonitoring | None) -> str:
    """Monitoring on the held-out graded prompts, at each layer it ran, after the prompts' own grading check."""
    if not hold:
        return ""
    lc = hold["level_check"]
    pw = lc["pooled_within"]
    parts = [f" Held-out graded prompts ({len(hold['systems'])}, never used for a choice): r(stated level, measure) "
             f"= {_fmt(lc['overall']['estimate'], '.2f')}, within polarity {_fmt(pw['estimate'], '.2f')} "
             f"[{_fmt(pw['low'], '.2f')}, {_fmt(pw['high'], '.2f')}]"]
    for name, words in (("steering", "the steering layer"), ("rule", "the extraction-data layer")):
        if hold.get(name):
            h = hold[name]
            parts.append(f"at {words} L{h['layer']}: r(last-prompt projection, measure) = {_fmt(h['r_last_prompt'])}"
                         f"{_within_text(h)}")
    return "; ".join(parts) + "."


def _rule_words(rule: RuleMonitoring | None) -> str:
    """Monitoring at the layer of the extraction-data rule, or why there is none."""
    if rule is None:
        return " The extraction-data layer rule had too few rows per half to fix a layer."
    within = _within_text(rule)
    return (f" At the layer fixed by the extraction-data rule (L{rule['layer']}, cross-fitted separation d = "
            f"{_fmt(rule['separation'][rule['layer']], '.2f')}): r(last-prompt projection, measure) = "
            f"{_fmt(rule['r_last_prompt'])}{within}.")


def unit_words(cfg: Config) -> str:
    return ("|vector| (c = 1 adds the raw persona vector)" if cfg.coef_unit == "vector"
            else "the typical residual norm (mean per-token |h| over the model's own responses)")


def _band_text(control: RandomControl) -> str:
    """The random-direction band (>= 20 directions) or, with fewer, how many directions the control has."""
    if control.get("band"):
        b = control["band"]
        return (f" (effect m(+c) - m(-c) of {control['n']} random directions at the same norm: 95% band "
                f"[{b['low']:+.3f}, {b['high']:+.3f}])")
    return f" (mean of {control.get('n', 1)} random direction(s); fewer than {MIN_NULL_DRAWS}: no null band)"


def _within_text(mon: WithinPolarity) -> str:
    """r within polarity (the association not explained by positive vs negative prompts) of one monitoring result,
    with its interval, the band of the measure shuffled within polarity and the ceiling the series' noise sets."""
    w, null = mon.get("monitor_within_polarity"), mon.get("monitor_within_null")
    if not w:
        return ""
    o, p = w["overall"], w["pooled_within"]
    band = (f", shuffled within polarity: 95% band [{_fmt(null['low'], '.2f')}, {_fmt(null['high'], '.2f')}]"
            if null else "")
    return (f" (overall {_fmt(o['estimate'], '.2f')} [{_fmt(o['low'], '.2f')}, {_fmt(o['high'], '.2f')}], within "
            f"polarity {_fmt(p['estimate'], '.2f')} [{_fmt(p['low'], '.2f')}, {_fmt(p['high'], '.2f')}]{band}"
            f"{_ceiling_text(mon.get('within_reliability'))}, n={o['n']} prompts)")


def _ceiling_text(rel: WithinReliability | None) -> str:
    """The within-polarity reliabilities of the measure and the projection, and the r their noise leaves
    reachable."""
    if not rel:
        return ""
    m, p = rel["measure"], rel["projection"]
    return (f"; within-polarity split-half reliability of the measure {_fmt(m['reliability'], '.2f')} "
            f"({_fmt(m['low'], '.2f')} to {_fmt(m['high'], '.2f')} over random splits) and of the projection "
            f"{_fmt(p['reliability'], '.2f')} ({_fmt(p['low'], '.2f')} to {_fmt(p['high'], '.2f')}), so an r above "
            f"about {_fmt(rel['ceiling'], '.2f')} is not expected even of a perfect monitor")


def headline_text(m: dict) -> str:
    """The monotonic-trait counts of every measure, valid measures only."""
    lines = []
    for name, h in m["monotonic_traits"].items():
        c = h["counts"]
        strict_ppl = next(k for k in c if k.startswith("strict_ppl") and not k.endswith("_band"))
        lines.append(f"- **{name}**: validity check passed for {h['n_valid']} of {h['n_traits']} traits "
                     f"({', '.join(h['valid_traits']) or 'none'}); of those, **{c[strict_ppl]}** increase strictly "
                     f"over the held-out curve's points whose perplexity ratio is <= {m['max_ppl_ratio']:g} "
                     f"(`{strict_ppl}`), **{c[strict_ppl + '_band']}** of them with an effect above the random band "
                     f"(`{strict_ppl}_band`); {c['strict']} over the whole sweep (`strict`), {c['run4']} over >= "
                     f"{MIN_MONOTONIC_RUN} consecutive coefficients spanning both signs (`run4`).")
    return "\n".join(lines)


def targets_text(t: dict, ppl: float) -> str:
    """One line per target: met or not, and which traits pass it."""
    words = {"specificity": "diagonal z > 3 and every off-diagonal |z| below it",
             "steering": f"strictly increasing over the points with perplexity ratio <= {ppl:g} on a valid measure, "
                         "effect above the random band",
             "monitoring": f"within-polarity r > {MONITOR_MIN_WITHIN_R:g} (response-likelihood measure, valid)",
             "monitoring_holdout": f"on the held-out graded prompts at the extraction-data layer, within-polarity "
                                   f"r > {MONITOR_MIN_WITHIN_R:g} and above its shuffled band"}
    return "Targets (each needs >= {} traits):\n".format(t["min_traits"]) + "\n".join(
        f"- {name} ({words[name]}): **{'met' if t[name]['met'] else 'not met'}**, "
        f"{len(t[name]['traits'])} of {len(t['per_trait'])} ({', '.join(t[name]['traits']) or 'none'})"
        for name in TARGET_NAMES)


def trait_specific_reading(ts: dict) -> str:
    """The secondary analysis' reading, fixed before its first run: the whole vectors' cross-trait effects travel
    on their shared part when at least MIN_TARGET_TRAITS traits pass on their trait-specific parts."""
    passed = [a for a, p in ts["per_trait"].items() if p["valid"] and p["pass"]]
    n_valid = sum(p["valid"] for p in ts["per_trait"].values())
    if not any(p["valid"] and np.isfinite(p["diag_z"]) for p in ts["per_trait"].values()):
        return (f"No trait-specific part was scored: the random band needs >= {MIN_NULL_DRAWS} directions (this run "
                f"has {ts['n_random']}) and a valid measure (here {n_valid} of {len(ts['per_trait'])} traits).")
    head = f"{len(passed)} of {n_valid} traits with a valid measure pass on their trait-specific part " \
           f"({', '.join(passed) or 'none'})"
    if len(passed) >= MIN_TARGET_TRAITS:
        return (f"{head}: the whole vectors' cross-trait effects travel on the part the vectors share, and the part "
                "unique to each passing trait is specific to it.")
    return f"{head}: even the part unique to each trait's vector is not specific on this model at this norm."


def reliability_reading(rel: dict) -> str:
    """How many vectors are closer to a rerun of themselves than to another trait's vector, and what follows."""
    judged = {name: x for name, x in rel.items() if x["stable"] is not None}
    if not judged:
        return "With a single trait there is no other trait's vector to compare with."
    stable = [name for name, x in judged.items() if x["stable"]]
    text = f"{len(stable)} of {len(judged)} vectors are stable by this rule" + (f" ({', '.join(stable)})." if stable
                                                                                  else ".")
    if len(stable) < len(judged):
        text += (" An unstable vector is closer to another trait's vector than to a rerun of itself: at this "
                 "extraction size its cell-level results (specificity, monitoring at its layer) depend on the "
                 "sample drawn, and a rerun with another seed can move them.")
    return text


def _filter_words(fi: FilterInfo) -> str:
    """One sentence on the judge's filter: off, not run because the judge failed its check, or what it kept."""
    if fi.get("judge_not_valid"):
        return (f"Filter: not applied, because the judge failed its validity check; all {fi['n_pairs_total']} pos/neg "
                "pairs were used.")
    if not fi["filter"]:
        return f"Filter: off; all {fi['n_pairs_total']} pos/neg pairs were used."
    return (f"Filter: {fi['n_pairs_kept']}/{fi['n_pairs_total']} pos/neg pairs kept"
            + (" -- fewer than min_kept_pairs, so all pairs were used" if fi.get("fallback") else "") + ".")


def trait_body(r: TraitResult) -> list[str]:
    """The paragraphs of one trait's section: items, response measure, monitoring, filter, judge, screening."""
    st, mon, ls, fi = r["steering"], r["monitoring"], r["layer_sweep"], r["filter"]
    body = [f"Two-choice items: validity {validity_words(st.get('validity'))}. Chosen layer {st['layer']} (selection "
            "effect per layer: " + ", ".join(f"L{L}: {e:+.3f}" for L, e in zip(ls["layers"], ls["effect"])) + ").",
            f"Typical residual norm at L{st['layer']}: {r['typical_norm'][st['layer']]:.2f}; raw vector norm = "
            f"{st['raw_vector_norm_in_units']:.3f} steering units.",
            f"Steering curve (held-out items): {_curve_words(st)}; {_control_words(st['random_control'])}.",
            f"Monitoring (layer {mon['layer']}, {len(mon['systems'])} graded system prompts): r(last-prompt projection, items) = "
            f"{_fmt(mon['r_last_prompt'])}, r(response projection, items) = {_fmt(mon['r_response'])}; projection "
            f"separation d at L{st['layer']} = {mon['separation_by_layer']['last_prompt'][st['layer']]:+.2f} (last "
            f"prompt), {mon['separation_by_layer']['response'][st['layer']]:+.2f} (response); best layer for the "
            f"last-prompt separation: L{int(np.nanargmax(mon['separation_by_layer']['last_prompt']))} "
            f"(d = {np.nanmax(mon['separation_by_layer']['last_prompt']):+.2f}).",
            *([_response_trait_line(r["response"])] if "response" in r else []),
            _filter_words(fi)]
    if r["judge"]:
        j = r["judge"]
        body.append(f"Judge (the studied model itself, or the configured endpoint): mean trait score pos "
                    f"{_fmt(j['pos']['trait_mean'], '.1f')} vs neg {_fmt(j['neg']['trait_mean'], '.1f')}; coherence pos "
                    f"{_fmt(j['pos']['coherence_mean'], '.1f')} vs neg {_fmt(j['neg']['coherence_mean'], '.1f')} "
                    f"(coherence is judged only for pairs that pass the trait condition: "
                    f"{j['pos']['coherence_judged'] + j['neg']['coherence_judged']} of {j['pos']['n'] + j['neg']['n']} "
                    f"responses); no-number (None) trait scores: {j['pos']['trait_none'] + j['neg']['trait_none']}."
                    + (f" Judge validity (trait score, positive minus negative answers, per extraction question): "
                       f"{validity_words(j['validity'])}." if j.get("validity") else ""))
    if "screening" in r:
        s = r["screening"]
        body.append(f"Data screening (projection of the given response minus the model's own greedy response, layer "
                    f"{st['layer']}): positive responses {s['pos']['mean']:+.3f} (sd {s['pos']['std']:.3f}, n "
                    f"{s['pos']['n']}), negative responses {s['neg']['mean']:+.3f} (sd {s['neg']['std']:.3f}, n "
                    f"{s['neg']['n']}).")
    return body
