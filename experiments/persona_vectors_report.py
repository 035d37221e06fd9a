"""The persona-vectors report: report.md with its tables and figures, metrics.json, config.json, each trait's
vectors and the generated responses, all read from a finished `Result` (`experiments.persona_vectors.run`), so
that the study module holds the computation and this one the words and pictures."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from experiments.persona_vectors import (MIN_SPECIFICITY_TRAITS, MIN_TARGET_TRAITS,
                                         MONITOR_MIN_WITHIN_R, TARGET_NAMES, Config, Result, cosine_matrix)
from experiments.report import Report, atomic_write_bytes, few_splits_text, jsonable, pyplot
from experiments.report import fmt_num as _fmt
from psm_jax.persona.extraction import LAYER_INDEXING
from psm_jax.persona import measures
from psm_jax.persona.directions import SITE
from psm_jax.persona.stats import MIN_MONOTONIC_RUN, MIN_NULL_DRAWS, pearson_ci


def write_report(result: Result, folder) -> Path:
    """The whole report folder of one persona-vectors run."""
    rep = Report(folder, "Persona vectors", result.config)
    _write_report(rep, result)
    for key, value in result.metrics.items():
        rep.metric(key, value)
    return rep.finish()


def _short(text: str, n: int = 220) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= n else text[:n] + "..."


def _line_figure(report: Report, fig, ax, name: str, caption: str, *, title: str, xlabel: str, ylabel: str,
                 legend_fontsize: int = 8) -> None:
    """Label a one-axes line plot, add its legend and save it into the report."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=legend_fontsize)
    ax.set_title(title)
    report.figure(name, fig, caption)


def _steering_figure(report: Report, results: Sequence[dict], key: str, name: str, caption: str, *, title: str,
                     ylabel: str) -> None:
    """Measure vs coefficient per trait at its chosen layer (results[i][key]), the random directions' mean dotted
    (absent where the measure failed its validity check), a failing measure's curve dashed."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for r in results:
        st = r[key]
        valid = measures.is_valid(st.get("validity"))
        ax.plot(st["coefs"], st["measure"], marker="o", ls="-" if valid else "--",
                label=f"{r['trait']} (L{st['layer']})" + ("" if valid else ", NOT valid"))
        if st["random_control"]["measure"] is not None:
            ax.plot(st["random_control"]["coefs"], st["random_control"]["measure"], ls=":", marker="x",
                    color=ax.lines[-1].get_color(), alpha=0.6)
    ax.axvline(0, color="gray", lw=0.5)
    unit_ = results[0][key].get("coef_unit", "vector") if results else "vector"
    xlabel = "steering coefficient (x raw persona vector)" if unit_ == "vector" else \
        "steering coefficient (x typical residual norm)"
    _line_figure(report, fig, ax, name, caption, title=title, xlabel=xlabel, ylabel=ylabel)


def _validity_words(check: dict | None) -> str:
    return measures.validity_text(check) if check else "n/a (no unit under both polarities)"


def _control_words(control: dict) -> str:
    """The random-direction control at +-cmax, or why it was not computed."""
    if control["measure"] is None:
        return f"random-direction control not computed ({control['skipped']})"
    return (f"random direction at c=+-{control['coefs'][1]:g}: " + ", ".join(f"{m:+.3f}" for m in control["measure"])
            + _band_text(control))


def _curve_words(st: dict) -> str:
    mono = st["monotonic"]
    return (", ".join(f"c={c:+g}: {m:+.3f} (ppl x{p:.2f})" for c, m, p in zip(st["coefs"], st["measure"],
                                                                           st["ppl_ratio"]))
            + f"; increasing over the sweep: {mono['increasing']}, over the points within the perplexity ceiling: "
              f"{mono['increasing_within_ceiling']}; monotonic for c<=0: {mono['neg']}, for c>=0: {mono['pos']}")


def _response_trait_line(rs: dict) -> str:
    ls = rs["layer_sweep"]
    return (f"Response-likelihood measure: validity (no steering, pos minus neg system prompts, per held-out unit): "
            f"{_validity_words(rs.get('validity'))}. Layer {rs['layer']} chosen on {rs['n_selection']} selection pairs "
            "(effect per layer: " + ", ".join(f"L{L}: {e:+.3f}" for L, e in zip(ls["layers"], ls["effect"]))
            + f"); held-out curve ({rs['n_held_out']} pairs): {_curve_words(rs)}; {_control_words(rs['random_control'])}. "
            f"r(last-prompt projection at L{rs['layer']}, measure) = {_fmt(rs['r_last_prompt'])}"
            f"{_within_text(rs)}, "
            f"r(response projection, measure) = {_fmt(rs['r_response'])}.{_rule_words(rs.get('rule_monitoring'))}"
            f"{_holdout_words(rs.get('holdout_monitoring'))} "
            f"Reference pairs with an empty answer (dropped): {rs['n_dropped']}.")


def _holdout_words(hold: dict | None) -> str:
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


def _rule_words(rule: dict | None) -> str:
    """Monitoring at the layer of the extraction-data rule, or why there is none."""
    if rule is None:
        return " The extraction-data layer rule had too few rows per half to fix a layer."
    within = _within_text(rule)
    return (f" At the layer fixed by the extraction-data rule (L{rule['layer']}, cross-fitted separation d = "
            f"{_fmt(rule['separation'][rule['layer']], '.2f')}): r(last-prompt projection, measure) = "
            f"{_fmt(rule['r_last_prompt'])}{within}.")


def _unit_words(cfg: Config) -> str:
    return ("|vector| (c = 1 adds the raw persona vector)" if cfg.coef_unit == "vector"
            else "the typical residual norm (mean per-token |h| over the model's own responses)")


def _band_text(control: dict) -> str:
    """The random-direction band (>= 20 directions) or, with fewer, how many directions the control has."""
    if control.get("band"):
        b = control["band"]
        return (f" (effect m(+c) - m(-c) of {control['n']} random directions at the same norm: 95% band "
                f"[{b['low']:+.3f}, {b['high']:+.3f}])")
    return f" (mean of {control.get('n', 1)} random direction(s); fewer than {MIN_NULL_DRAWS}: no null band)"


def _within_text(mon: dict) -> str:
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


def _ceiling_text(rel: dict | None) -> str:
    """The within-polarity reliabilities of the measure and the projection, and the r their noise leaves
    reachable."""
    if not rel:
        return ""
    m, p = rel["measure"], rel["projection"]
    return (f"; within-polarity split-half reliability of the measure {_fmt(m['reliability'], '.2f')} "
            f"({_fmt(m['low'], '.2f')} to {_fmt(m['high'], '.2f')} over random splits) and of the projection "
            f"{_fmt(p['reliability'], '.2f')} ({_fmt(p['low'], '.2f')} to {_fmt(p['high'], '.2f')}), so an r above "
            f"about {_fmt(rel['ceiling'], '.2f')} is not expected even of a perfect monitor")


def _control_cell(control: dict) -> str:
    if control["measure"] is None:
        return "not computed (measure not valid)"
    return f"{control['measure'][0]:.3f}, {control['measure'][1]:.3f}"


def _curve_row(r: dict, st: dict) -> dict:
    """The summary-table columns shared by both measures."""
    return {"trait": r["trait"], "validity": "valid" if measures.is_valid(st.get("validity")) else "NOT valid",
            "layer": st["layer"], "m(c_min)": float(st["measure"][0]),
            "m(0)": float(st["measure"][st["coefs"].index(0.0)]), "m(c_max)": float(st["measure"][-1]),
            "increasing": st["monotonic"]["increasing"],
            "increasing within ppl ceiling": st["monotonic"]["increasing_within_ceiling"],
            "random ctrl m(-max), m(+max)": _control_cell(st["random_control"])}


def _write_response_section(report: Report, cfg: Config, resp: list[dict]) -> None:
    """The second behavioural measure: definition, per-trait table and steering curves."""
    r0 = resp[0]["response"]
    report.section("Response-likelihood measure", f"""
A second behavioural measure, used because the items' validity check can fail on a small model (the items then
do not respond to the trait's system prompts). **Reference answers:** for each of the first
{cfg.n_response_questions} *evaluation* questions (not the extraction ones) and {cfg.n_response_pairs} instruction
pair(s) per question (question q uses pairs (q + k) mod 5), the model's own greedy answer
({cfg.response_max_new_tokens} new tokens, no steering) under the positive system prompt and under the negative one.
**Measure:** m = mean over (question, pair) of log P(pos answer | question) / n_pos - log P(neg answer | question) /
n_neg, i.e. the per-token log-likelihood difference over the answers' content tokens, scored in a conversation
*without* the trait system prompt; steering adds c x unit(vector) x ({_unit_words(cfg)}) at resid_post of the layer
at every position of the scoring forward. **Layer:** chosen by this measure on the selection half of the questions
(even question indices; largest m(+{cfg.select_coef}) - m(-{cfg.select_coef}) over the same sweep layers), so it may
differ from the items' layer; the curve, the random-direction band (the same random directions as for the items,
at matched norm) and the monitoring are reported on the held-out half (odd indices: {r0['n_held_out']} pairs).
**Validity:** m without steering under each positive system prompt minus under each negative one, per held-out
unit, with a 95% bootstrap interval over units; under the prompt of instruction pair i only answers generated under
*other* pairs are scored, so that a prompt never scores its own greedy output. **Monitoring r:** across the
{len(r0['system_measure'])} graded system prompts (overall and within polarity), the last-prompt-token projection (mean over the monitoring questions, at this measure's layer) vs m
under that system prompt; the within-polarity r beside the 95% band of r with m shuffled among the prompts of
one polarity (its null), and, as a descriptive curve, the within-polarity r at every layer (the headline layer is
the one steering chose, fixed before monitoring). **Ceiling:** how far the prompts of one polarity differ beyond
noise, per series: the split-half reliability of m's per-prompt means (held-out units split at random into halves)
and of the projection's (monitoring questions split likewise), both after removing each polarity's mean and stepped
up to the full size; their geometric mean is the within-polarity r that a monitor tracking m perfectly would be
expected to show (Spearman's attenuation), so an r near a low ceiling is not evidence against the vector. The
ranges beside each reliability are over random splits of the same data, not intervals over prompts; with a handful
of prompts per polarity a reliability is itself a rough estimate.
**Monitoring layer rule:** a second layer fixed on the extraction
data alone, before monitoring: the layer where the last prompt token's projection onto the response-average vector
best separates the positive from the negative extraction rows, cross-fitted (the rows split by question parity;
the vector from one half, the separation d of the other half's projections, averaged over both directions). It
reads no monitoring prompt and no behavioural measure, so the r at that layer is not chosen by the data it
reports. Caveat: the likelihood of an answer is not the same as the trait being expressed.
""")
    rows = []
    for r in resp:
        rs = r["response"]
        rows.append({**_curve_row(r, rs), "validity effect": _validity_words(rs.get("validity")),
                     "r last-prompt": rs["r_last_prompt"], "r response": rs["r_response"],
                     "held-out pairs": rs["n_held_out"]})
    report.table("Response-likelihood measure: results per trait", rows)
    _steering_figure(report, resp, "response", "response_steering_curves",
                     "Response-likelihood measure (per-token log-likelihood of the model's own positive-prompted "
                     "answer minus the negative-prompted one, held-out questions) vs steering coefficient at its "
                     "chosen layer; dotted: the mean of the random directions of the same length (valid measures "
                     "only); dashed: a measure that failed its validity check.",
                     title="Steering: response-likelihood measure vs coefficient",
                     ylabel="per-token log P(pos answer) - log P(neg answer)")


def _headline_text(m: dict) -> str:
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


def _targets_text(t: dict, ppl: float) -> str:
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


def _write_summary(report: Report, result: Result) -> None:
    cfg, results, m = result.config, result.results, result.metrics
    resp_sizes = (f"; response-likelihood measure on {cfg.n_response_questions} evaluation questions x "
                  f"{cfg.n_response_pairs} instruction pair(s), {cfg.response_max_new_tokens}-token greedy reference "
                  "answers") if any("response" in r for r in results) else ""
    report.section("Summary", f"""
Model `{cfg.model}` ({result.n_layers} layers, d_model {result.d_model}); traits: {', '.join(r['trait'] for r in results)}.
Vectors at site `resid_post` of every layer ({LAYER_INDEXING}).
Steering coefficients are in units of {_unit_words(cfg)} at the steered layer.
Every measure is used as evidence only where its validity check passes (its effect under the trait's positive minus
negative system prompts, no steering, 95% interval over held-out units above 0); a failing measure's numbers are
shown marked NOT valid and no random band is computed for it. The layer is chosen on the selection half of a
measure's units and the curve is reported on the held-out half; each point's fluency cost is the perplexity ratio
of the model's own unsteered answers under the edit.

Steering is monotonic for (counts over traits whose measure is valid):
{_headline_text(m)}

{_targets_text(m["targets"], m["max_ppl_ratio"])}

Judge: `{cfg.judge}`; its filter runs only where its own validity check passes, and the per-trait sections show
that check and how many pairs the filter kept (a fallback to all pairs is reported); claims rest on the behavioural log-prob measures and their validity checks. Sizes: {cfg.n_pairs}
instruction pairs x {cfg.n_questions} extraction questions x {cfg.n_samples} sample(s) per polarity,
{cfg.max_new_tokens} new tokens, coefficients {list(sorted(cfg.coefficients))}, {results[0]['steering']['n_units']}
held-out items, {cfg.n_random} random directions, monitoring on {len(results[0]['monitoring']['systems'])} graded system prompts x {cfg.n_monitor_questions}
evaluation questions{resp_sizes}; seed {cfg.seed}.
""")


def _write_items_section(report: Report, cfg: Config, results: list[dict]) -> None:
    rows = []
    for r in results:
        st, mon = r["steering"], r["monitoring"]
        rows.append({**_curve_row(r, st), "validity effect": _validity_words(st.get("validity")),
                     "r last-prompt": mon["r_last_prompt"], "r response": mon["r_response"],
                     "proj separation d (last prompt, chosen L)": float(mon["separation_by_layer"]["last_prompt"][st["layer"]]),
                     "pairs kept": f"{r['filter']['n_pairs_kept']}/{r['filter']['n_pairs_total']}"
                                   + (" (fallback: all)" if r["filter"].get("fallback") else "")
                                   + (" (judge not valid: all)" if r["filter"].get("judge_not_valid") else ""),
                     "seconds": round(r["seconds"])})
    report.table("Two-choice items: results per trait", rows)
    report.section("Validity checks", f"""
*Items validity*: the two-choice measure (mean over items of log P(trait choice) - log P(other choice)) on the
held-out items, under each of the 5 positive system prompts minus each of the 5 negative ones (no steering), paired
by item with a 95% bootstrap interval: if the items measure the trait as this model expresses it, the interval lies
above 0. *Projection separation d* is the effect size (pooled-sd units) between the last-prompt-token projections onto
the vector under positive vs negative system prompts ({cfg.n_monitor_questions} evaluation questions each): it says
whether the vector reads the induced persona at all, layer by layer (plot below).
""")
    _steering_figure(report, results, "steering", "steering_curves",
                     "Two-choice measure vs steering coefficient at the chosen layer; dotted: the mean of the random "
                     "directions of the same length (valid measures only); dashed: a measure that failed its "
                     "validity check.", title="Steering: two-choice items vs coefficient",
                     ylabel="log P(trait) - log P(other), held-out items")


def _write_specificity_section(report: Report, result: Result) -> None:
    """The specificity matrix as a heat map of z-scores, failing measures' columns marked."""
    sp = result.metrics.get("specificity")
    if not sp:
        report.section("Specificity", f"Not computed: the run has {len(result.results)} trait(s) and the matrix needs "
                       f"at least {MIN_SPECIFICITY_TRAITS} (a trait's effect is compared with its effect on the others).")
        return
    names = sp["traits"]
    z = np.asarray([[np.nan if sp["z"][a][b] is None else sp["z"][a][b] for b in names] for a in names], np.float64)
    fig, ax = pyplot().subplots(figsize=(1.3 * len(names) + 2.5, 1.2 * len(names) + 1.8))
    lim = max(3.0, float(np.nanmax(np.abs(z)))) if np.isfinite(z).any() else 3.0
    im = ax.imshow(np.ma.masked_invalid(z), vmin=-lim, vmax=lim, cmap="RdBu_r")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, "not valid" if sp["measure"][j] is None else ("no band" if not np.isfinite(z[i, j])
                                                                          else f"{z[i, j]:+.1f}"),
                    ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(names)), [f"{b}\n({sp['measure'][j] or 'no valid measure'})" for j, b in enumerate(names)],
                  fontsize=7)
    ax.set_yticks(range(len(names)), [f"{a} L{L}" for a, L in zip(names, sp["layers"])])
    ax.set_xlabel("measured trait (its valid measure)")
    ax.set_ylabel("steered vector (its layer)")
    fig.colorbar(im, label="z vs random directions")
    ax.set_title(f"Steering specificity: z of m(+c) - m(-c), c = {abs(sp['coef']):g}")
    report.figure("specificity_matrix", fig, "Cell (i, j): the effect m(+c) - m(-c) on trait j's measure (held-out "
                  f"units) of steering with trait i's vector at c = +-{abs(sp['coef']):g}, as a z-score against "
                  f"{sp['n_random']} random directions of the same norm at the same layer on the same measure.")
    report.section("Specificity", f"""
Each cell steers with trait i's vector at its layer (the layer its valid measure chose) at coefficients
+-{abs(sp['coef']):g}, and measures trait j with trait j's valid measure on its held-out units; the cell is the
symmetric effect m(+c) - m(-c), the statistic of the steering curves' random band: it keeps what the vector does
along its sign and cancels the shift that any perturbation of that norm causes whatever its sign (random
directions at matched norm move some measures by themselves). z = (cell - mean of the random directions' effects)
/ their sd (`psm_jax.persona.stats.zscore`), the random directions ({sp['n_random']}) having the steering vector's
norm and layer. A column whose trait has no valid measure is marked and not used. Pass, per
steered trait: diagonal z > {sp['min_z']:g} and every off-diagonal |z| below it. Overall pass: {sp['pass']}.
""")
    report.table("Specificity per steered trait", [
        {"trait": a, "measure": sp["measure"][i] or "none valid", "layer": sp["layers"][i],
         "diagonal z": _fmt(p["diag_z"], "+.2f"), "max off-diagonal |z|": _fmt(p["offdiag_max_abs_z"], ".2f"),
         "off-diagonal cells": p["n_offdiag"], "pass": p["pass"]} for i, (a, p) in enumerate(sp["per_trait"].items())])
    _write_trait_specific_table(report, result.metrics.get("specificity_trait_specific"), sp)


def _trait_specific_reading(ts: dict) -> str:
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


def _write_trait_specific_table(report: Report, ts: dict | None, whole: dict) -> None:
    """The secondary matrix of the vectors' trait-specific parts beside the whole vectors' diagonal."""
    if not ts:
        return
    rows = []
    for i, (a, p) in enumerate(ts["per_trait"].items()):
        rows.append({"trait": a, "measure": ts["measure"][i] or "none valid", "layer": ts["layers"][i],
                     "length kept": _fmt(ts["kept_fraction"][a], ".2f"), "diagonal z": _fmt(p["diag_z"], "+.2f"),
                     "max off-diagonal |z|": _fmt(p["offdiag_max_abs_z"], ".2f"), "pass": p["pass"],
                     "whole vector's diagonal z": _fmt(whole["per_trait"][a]["diag_z"], "+.2f"),
                     "z on the other traits": ", ".join(f"{b} {_fmt(ts['z'][a][b], '+.2f')}"
                                                         for b in ts["traits"] if b != a)})
    report.table("Specificity of the trait-specific parts (secondary analysis)", rows)
    report.section("Reading the trait-specific parts", f"""
Each row steers with the part of trait i's vector orthogonal to the other traits' vectors at the same layer ("length
kept": its length as a fraction of the vector's), rescaled to the whole vector's norm, and is scored against the
same {ts['n_random']} random directions as the whole-vector matrix, with the same pass rule. The targets are scored
on the whole vectors; this matrix asks whether their cross-trait effects travel on the part they share.
{_trait_specific_reading(ts)}
""")


def _reliability_reading(rel: dict) -> str:
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


def _write_reliability_section(report: Report, cfg: Config, rel: dict | None) -> None:
    """Each vector's split-half reliability at its steering layer, its reading and the per-layer figure."""
    if not rel:
        return
    rows = [{"trait": name, "layer": x["layer"], "questions": x["n_questions"], "half cosine": _fmt(x["half"], ".3f"),
             "predicted rerun cosine": f"{_fmt(x['predicted'], '.3f')} [{_fmt(x['low'], '.3f')}, "
                                       f"{_fmt(x['high'], '.3f')}]",
             "largest cross-trait cosine": _fmt(x["largest_cross_trait_cosine"], ".3f"),
             "stable": "n/a" if x["stable"] is None else x["stable"]}
            for name, x in rel.items()]
    report.table("Vector reliability", rows)
    first = next(iter(rel.values()))
    few = few_splits_text(first["n_questions"], first["distinct_splits"], first["n_splits"])
    few = f" {few}" if few else ""
    report.section("Reading the reliability", f"""
The extraction questions are the independent units ({cfg.n_pairs} instruction pairs x {cfg.n_samples} sample(s) share
each question). They are split at random into halves ({first['n_splits']} splits, seed {cfg.seed}); each half gives a
vector, and the cosine of the two ("half cosine") is stepped up to the full size (Spearman-Brown, 2c / (1 + c)): the
cosine that a rerun with a fresh sample of the same size is expected to share with this vector. Brackets: 2.5% and
97.5% over the splits. The halves hold different questions, so the prediction also counts the questions' own
spread as noise. A vector is called stable when its predicted rerun cosine exceeds its largest cosine with another
trait's vector at the same layer.{few} {_reliability_reading(rel)}
""")
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for name, x in rel.items():
        ax.plot(x["predicted_by_layer"], marker=".", label=name)
        ax.plot([x["layer"]], [x["predicted"]], marker="o", color=ax.lines[-1].get_color())
    ax.axhline(0, color="gray", lw=0.5)
    _line_figure(report, fig, ax, "vector_reliability", "Predicted rerun cosine of each response-average vector per "
                 "layer (split halves of the extraction questions, stepped up); the dot marks the steering layer.",
                 title="Vector reliability per layer", xlabel="layer (resid_post)", ylabel="predicted rerun cosine")


def _write_layer_figures(report: Report, cfg: Config, results: list[dict]) -> None:
    """Layer selection effect, projection separation and vector norms per layer."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ls = r["layer_sweep"]
        ax.plot(ls["layers"], ls["effect"], marker="o", label=r["trait"])
    ax.axhline(0, color="gray", lw=0.5)
    _line_figure(report, fig, ax, "layer_sweep", "Steering effect per layer on the selection half of the items.",
                 title="Layer selection by steering effect", xlabel="layer (resid_post)",
                 ylabel=f"m(+{cfg.select_coef}) - m(-{cfg.select_coef}), selection items")
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot(r["monitoring"]["separation_by_layer"]["last_prompt"], marker=".", label=f"{r['trait']} last prompt")
        ax.plot(r["monitoring"]["separation_by_layer"]["response"], ls="--", color=ax.lines[-1].get_color(),
                label=f"{r['trait']} response")
    ax.axhline(0, color="gray", lw=0.5)
    _line_figure(report, fig, ax, "separation_by_layer", "Effect size between projections under positive and negative "
                 "system prompts, per layer (solid: last prompt token; dashed: response average).",
                 title="Projection onto the layer's vector: pos vs neg system prompts", xlabel="layer (resid_post)",
                 ylabel="d(pos vs neg system prompts)", legend_fontsize=7)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot(r["vector_norm"]["response_avg"] / r["typical_norm"], label=r["trait"])
    _line_figure(report, fig, ax, "vector_norms", "Norm of the response-average vector relative to the typical "
                 "residual norm.", title="Response-average persona vector norm per layer",
                 xlabel="layer (resid_post)", ylabel="|v| / typical residual norm")


def _monitor_panels(r: dict) -> list[tuple[str, dict]]:
    """The monitoring scatters of one trait: (measure label, {layer, proj, measure, kinds, title r}) for the items
    and, when it ran, the response-likelihood measure (the monitoring headline)."""
    mon = r["monitoring"]
    kinds = [s["kind"] for s in mon["systems"]]
    panels = [("two-choice measure", {"layer": mon["layer"], "proj": mon["proj_last_prompt"],
                                      "measure": mon["behaviour"], "kinds": kinds,
                                      "r": f"r = {_fmt(mon['r_last_prompt'], '.2f')}"})]
    rs = r.get("response")
    if rs:
        w = (rs.get("monitor_within_polarity") or {}).get("pooled_within") or {}
        panels.append(("response-likelihood measure",
                       {"layer": rs["layer"], "proj": rs["proj_last_prompt"], "measure": rs["system_measure"],
                        "kinds": kinds, "r": f"r = {_fmt(rs['r_last_prompt'], '.2f')}, within "
                                              f"{_fmt(w.get('estimate'), '.2f')}"}))
    return panels


def _write_monitoring_figure(report: Report, results: list[dict]) -> None:
    panels = [_monitor_panels(r) for r in results]
    n_rows = max(len(p) for p in panels)
    fig, axes = pyplot().subplots(n_rows, len(results), figsize=(4 * len(results), 3.6 * n_rows), squeeze=False)
    colours = {"pos": "tab:red", "neg": "tab:blue", "default": "black"}
    for col, (r, trait_panels) in enumerate(zip(results, panels)):
        for row in range(n_rows):
            ax = axes[row][col]
            if row >= len(trait_panels):
                ax.set_axis_off()
                continue
            label, p = trait_panels[row]
            for k in colours:
                idx = [i for i, kind in enumerate(p["kinds"]) if kind == k]
                ax.scatter(np.asarray(p["proj"])[idx], np.asarray(p["measure"])[idx], c=colours[k], label=k)
            ax.set_title(f"{r['trait']} L{p['layer']}: {p['r']}", fontsize=9)
            ax.set_xlabel("last-prompt-token projection")
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
    fig.tight_layout()
    report.figure("monitoring", fig, "Per system prompt: projection of the last prompt token onto the vector "
                  "(mean over evaluation questions) vs the measure under that system prompt (top: two-choice items; "
                  "bottom, where it ran: the response-likelihood measure, whose within-polarity r is the headline).")
    curves = [(r["trait"], r["response"]) for r in results
              if r.get("response") and r["response"].get("within_r_by_layer") is not None]
    if curves:
        fig, ax = pyplot().subplots(figsize=(6, 4))
        for name, rs in curves:
            ax.plot(rs["within_r_by_layer"], marker=".", label=name)
            ax.axvline(rs["layer"], color=ax.lines[-1].get_color(), ls=":", lw=1)
            rule = rs.get("rule_monitoring")
            if rule is not None:
                ax.plot([rule["layer"]], [rs["within_r_by_layer"][rule["layer"]]], marker="*", ms=12,
                        color=ax.lines[-1].get_color(), ls="none")
        ax.axhline(MONITOR_MIN_WITHIN_R, color="gray", ls="--", lw=0.8)
        _line_figure(report, fig, ax, "monitoring_by_layer", "Within-polarity r of the last-prompt projection with "
                     "the response-likelihood measure, per layer (descriptive; dotted: the layer of the headline, "
                     "fixed by steering before monitoring; star: the layer of the extraction-data rule; dashed: the "
                     "target).", title="Monitoring r by layer",
                     xlabel="layer (resid_post)", ylabel="r within polarity")


def _write_cosine_matrix(report: Report, results: list[dict]) -> None:
    common, names, cos = cosine_matrix(results)
    if len(results) > 1:
        fig, ax = pyplot().subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
        im = ax.imshow(cos, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(len(names)), names, rotation=45)
        ax.set_yticks(range(len(names)), names)
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im)
        ax.set_title(f"Cosine of response-average vectors, layer {common}")
        report.figure("cosine_matrix", fig, f"Cosine similarity across traits at layer {common} (most frequent chosen layer).")
    report.table(f"Cosine matrix at layer {common}", [{"trait": a, **{b: float(cos[i, j]) for j, b in enumerate(names)}}
                                                     for i, a in enumerate(names)])


def _filter_words(fi: dict) -> str:
    """One sentence on the judge's filter: off, not run because the judge failed its check, or what it kept."""
    if fi.get("judge_not_valid"):
        return (f"Filter: not applied, because the judge failed its validity check; all {fi['n_pairs_total']} pos/neg "
                "pairs were used.")
    if not fi["filter"]:
        return f"Filter: off; all {fi['n_pairs_total']} pos/neg pairs were used."
    return (f"Filter: {fi['n_pairs_kept']}/{fi['n_pairs_total']} pos/neg pairs kept"
            + (" -- fewer than min_kept_pairs, so all pairs were used" if fi.get("fallback") else "") + ".")


def _trait_body(r: dict) -> list[str]:
    """The paragraphs of one trait's section: items, response measure, monitoring, filter, judge, screening."""
    st, mon, ls, fi = r["steering"], r["monitoring"], r["layer_sweep"], r["filter"]
    body = [f"Two-choice items: validity {_validity_words(st.get('validity'))}. Chosen layer {st['layer']} (selection "
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
                       f"{_validity_words(j['validity'])}." if j.get("validity") else ""))
    if "screening" in r:
        s = r["screening"]
        body.append(f"Data screening (projection of the given response minus the model's own greedy response, layer "
                    f"{st['layer']}): positive responses {s['pos']['mean']:+.3f} (sd {s['pos']['std']:.3f}, n "
                    f"{s['pos']['n']}), negative responses {s['neg']['mean']:+.3f} (sd {s['neg']['std']:.3f}, n "
                    f"{s['neg']['n']}).")
    return body


def _write_trait_tables(report: Report, r: dict) -> None:
    """Monitoring per system prompt, reference answers, steered generations and sample extraction responses."""
    mon, st = r["monitoring"], r["steering"]
    mon_rows = [{"kind": s["kind"], "level": s.get("level"), "pair": s["index"], "items m": float(b), "proj last prompt": float(pl),
                 "proj response": float(pr)}
                for s, b, pl, pr in zip(mon["systems"], mon["behaviour"], mon["proj_last_prompt"], mon["proj_response"])]
    if "response" in r:
        rs = r["response"]
        for row, m_, n_, pl in zip(mon_rows, rs["system_measure"], rs["system_n_used"], rs["proj_last_prompt"]):
            row.update({"response m": float(m_), "response n": n_, f"proj last prompt L{rs['layer']}": float(pl)})
    report.table(f"{r['trait']}: monitoring per system prompt", mon_rows)
    if "response" in r:
        report.table(f"{r['trait']}: reference answers (greedy, unsteered, first 2 held-out)", [
            {"question": _short(x["question"], 70), "pair": x["pair"], "pos answer": _short(x["pos"], 140),
             "neg answer": _short(x["neg"], 140)}
            for x in r["response"]["reference"] if x["kept"] and x["half"] == "held-out"][:2])
    report.table(f"{r['trait']}: steered generations (greedy, layer {st['layer']}; judge-free trait score = "
                 "per-token log-likelihood of the answer under the trait's first positive minus negative system "
                 "prompt, scored by the unsteered model)", [
        {"coef": e["coef"], "question": _short(e["question"], 80), "response": _short(e["response"]),
         "trait score (judge-free)": _fmt(e.get("trait_score"), "+.3f")}
        for e in r["steered_examples"]])
    ex = []
    for pol in ("pos", "neg"):
        for row in [x for x in r["rows"] if x["polarity"] == pol][:2]:
            ex.append({"polarity": pol, "system": _short(row["messages"][0]["content"], 90),
                       "question": _short(row["question_text"], 70), "response": _short(row["response"], 160),
                       "trait score": _fmt(row.get("trait_score"), ".1f"), "coherence": _fmt(row.get("coherence"), ".1f")})
    report.table(f"{r['trait']}: sample extraction responses", ex)


def _save_trait_vectors(report: Report, result: Result, r: dict) -> None:
    cfg, st, fi = result.config, r["steering"], r["filter"]
    meta = {"model": cfg.model, "site": SITE, "layers": list(range(result.n_layers)), "layer_indexing": LAYER_INDEXING,
            "method": "mean difference, positive minus negative, of per-response mean activations "
                      "(response_avg: assistant content tokens; prompt_avg: prompt content tokens incl. system; "
                      "prompt_last: the token before the response); unnormalised",
            "trait": r["trait"], "chosen_layer": st["layer"], "d_model": result.d_model, "n_pos": len(r["rows"]) // 2,
            "n_pairs_used": fi["n_pairs_kept"] if fi["filter"] and not fi.get("fallback") else fi["n_pairs_total"],
            "filtered": bool(fi["filter"] and not fi.get("fallback")),
            "typical_norm": r["typical_norm"], "steering_unit": f"coef x unit(vector[layer]) x {_unit_words(cfg)}"}
    report.save_vectors(f"vectors_{r['trait']}", r["vectors"], meta)


def _write_responses(report: Report, results: list[dict]) -> None:
    """Every generated text, for auditing."""
    lines = []
    for r in results:
        for row in r["rows"]:
            lines.append({"trait": r["trait"], "kind": "extraction", "polarity": row["polarity"], "pair": row["pair"],
                          "sample": row["sample"], "system": row["messages"][0]["content"],
                          "question": row["question_text"], "response": row["response"],
                          "trait_score": row.get("trait_score"), "coherence": row.get("coherence")})
        lines += [{"trait": r["trait"], "kind": "own", "question": q, "response": a} for q, a in r["own_responses"]]
        lines += [{"trait": r["trait"], "kind": "monitor", **m} for m in r["monitor_responses"]]
        lines += [{"trait": r["trait"], "kind": "steered", "layer": r["steering"]["layer"], **e}
                  for e in r["steered_examples"]]
        if "response" in r:
            lines += [{"trait": r["trait"], "kind": "reference", **x} for x in r["response"]["reference"]]
    atomic_write_bytes(report.dir / "responses.jsonl",
                       "".join(json.dumps(jsonable(x)) + "\n" for x in lines).encode())


def _write_report(report: Report, result: Result) -> None:
    cfg, results = result.config, result.results
    _write_summary(report, result)
    _write_items_section(report, cfg, results)
    resp = [r for r in results if "response" in r]
    if resp:
        _write_response_section(report, cfg, resp)
    _write_specificity_section(report, result)
    _write_reliability_section(report, cfg, result.metrics.get("vector_reliability"))
    _write_layer_figures(report, cfg, results)
    _write_monitoring_figure(report, results)
    _write_cosine_matrix(report, results)
    for r in results:
        report.section(f"Trait: {r['trait']}", "\n\n".join(_trait_body(r)))
        _write_trait_tables(report, r)
        _save_trait_vectors(report, result, r)
    _write_responses(report, results)


# ------------------------------------------------------------------------------ records

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


def _null_band_text(null: dict | None, what: str = "measure shuffled within polarity") -> str:
    return f"{what}: 95% band [{null['low']:.3f}, {null['high']:.3f}] ({null['n']} shuffles)" if null else "none"


def _items_monitor_ci(t: dict) -> dict:
    """The items' overall r's interval over prompts, where the per-prompt values were kept."""
    x, y = t.get("monitor_proj_last_prompt"), t.get("monitor_behaviour")
    if x is None or y is None or len(x) < 3:
        return {}
    ci = pearson_ci(x, y)
    return {"ci": [ci["low"], ci["high"]]} if np.isfinite([ci["low"], ci["high"]]).all() else {}


def _monitor_records(name: str, t: dict) -> list[dict]:
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


def _overall_ci(w: dict | None) -> dict:
    return {"ci": [w["overall"]["low"], w["overall"]["high"]]} if w else {}


def _holdout_monitor_records(name: str, rm: dict) -> list[dict]:
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


def _rule_monitor_records(name: str, rm: dict) -> list[dict]:
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


def ceiling_fields(mon: dict) -> dict:
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
