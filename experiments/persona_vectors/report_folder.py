"""The persona-vectors report folder: report.md with its sections and tables, metrics.json, config.json, each
trait's vectors and every generated response, all read from a finished `Result` (`pipeline.run`), so that the
computation never writes and the writing never computes."""
from __future__ import annotations

import json
from pathlib import Path

from experiments.persona_vectors.config import Config
from experiments.persona_vectors.cross_trait import MIN_SPECIFICITY_TRAITS, cosine_matrix
from experiments.persona_vectors.pipeline import Result
from experiments.persona_vectors.report_figures import (cosine_figure, reliability_figure, specificity_figure,
                                                        steering_figure, write_layer_figures,
                                                        write_monitoring_figure)
from experiments.persona_vectors.report_text import (headline_text, reliability_reading, targets_text, trait_body,
                                                     trait_specific_reading, unit_words, validity_words)
from experiments.persona_vectors.trait_result import RandomControl, SteeringCurve, TraitResult
from experiments.report import Report, atomic_write_bytes, few_splits_text, jsonable
from experiments.report import fmt_num as _fmt
from psm_jax.persona import measures
from psm_jax.persona.directions import SITE
from psm_jax.persona.extraction import LAYER_INDEXING


def write_report(result: Result, folder) -> Path:
    """The whole report folder of one persona-vectors run."""
    rep = Report(folder, "Persona vectors", result.config)
    _write_report(rep, result)
    for key, value in result.metrics.items():
        rep.metric(key, value)
    return rep.finish()


def _write_report(report: Report, result: Result) -> None:
    cfg, results = result.config, result.results
    _write_summary(report, result)
    _write_items_section(report, cfg, results)
    resp = [r for r in results if "response" in r]
    if resp:
        _write_response_section(report, cfg, resp)
    _write_specificity_section(report, result)
    _write_reliability_section(report, cfg, result.metrics.get("vector_reliability"))
    write_layer_figures(report, cfg, results)
    write_monitoring_figure(report, results)
    _write_cosine_matrix(report, results)
    for r in results:
        report.section(f"Trait: {r['trait']}", "\n\n".join(trait_body(r)))
        _write_trait_tables(report, r)
        _save_trait_vectors(report, result, r)
    _write_responses(report, results)


def _short(text: str, n: int = 220) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= n else text[:n] + "..."


def _control_cell(control: RandomControl) -> str:
    if control["measure"] is None:
        return "not computed (measure not valid)"
    return f"{control['measure'][0]:.3f}, {control['measure'][1]:.3f}"


def _curve_row(r: TraitResult, st: SteeringCurve) -> dict:
    """The summary-table columns shared by both measures."""
    return {"trait": r["trait"], "validity": "valid" if measures.is_valid(st.get("validity")) else "NOT valid",
            "layer": st["layer"], "m(c_min)": float(st["measure"][0]),
            "m(0)": float(st["measure"][st["coefs"].index(0.0)]), "m(c_max)": float(st["measure"][-1]),
            "increasing": st["monotonic"]["increasing"],
            "increasing within ppl ceiling": st["monotonic"]["increasing_within_ceiling"],
            "random ctrl m(-max), m(+max)": _control_cell(st["random_control"])}


def _write_summary(report: Report, result: Result) -> None:
    cfg, results, m = result.config, result.results, result.metrics
    resp_sizes = (f"; response-likelihood measure on {cfg.n_response_questions} evaluation questions x "
                  f"{cfg.n_response_pairs} instruction pair(s), {cfg.response_max_new_tokens}-token greedy reference "
                  "answers") if any("response" in r for r in results) else ""
    report.section("Summary", f"""
Model `{cfg.model}` ({result.n_layers} layers, d_model {result.d_model}); traits: {', '.join(r['trait'] for r in results)}.
Vectors at site `resid_post` of every layer ({LAYER_INDEXING}).
Steering coefficients are in units of {unit_words(cfg)} at the steered layer.
Every measure is used as evidence only where its validity check passes (its effect under the trait's positive minus
negative system prompts, no steering, 95% interval over held-out units above 0); a failing measure's numbers are
shown marked NOT valid and no random band is computed for it. The layer is chosen on the selection half of a
measure's units and the curve is reported on the held-out half; each point's fluency cost is the perplexity ratio
of the model's own unsteered answers under the edit.

Steering is monotonic for (counts over traits whose measure is valid):
{headline_text(m)}

{targets_text(m["targets"], m["max_ppl_ratio"])}

Judge: `{cfg.judge}`; its filter runs only where its own validity check passes, and the per-trait sections show
that check and how many pairs the filter kept (a fallback to all pairs is reported); claims rest on the behavioural log-prob measures and their validity checks. Sizes: {cfg.n_pairs}
instruction pairs x {cfg.n_questions} extraction questions x {cfg.n_samples} sample(s) per polarity,
{cfg.max_new_tokens} new tokens, coefficients {list(sorted(cfg.coefficients))}, {results[0]['steering']['n_units']}
held-out items, {cfg.n_random} random directions, monitoring on {len(results[0]['monitoring']['systems'])} graded system prompts x {cfg.n_monitor_questions}
evaluation questions{resp_sizes}; seed {cfg.seed}.
""")


def _write_items_section(report: Report, cfg: Config, results: list[TraitResult]) -> None:
    rows = []
    for r in results:
        st, mon = r["steering"], r["monitoring"]
        rows.append({**_curve_row(r, st), "validity effect": validity_words(st.get("validity")),
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
    steering_figure(report, results, "steering", "steering_curves",
                    "Two-choice measure vs steering coefficient at the chosen layer; dotted: the mean of the random "
                    "directions of the same length (valid measures only); dashed: a measure that failed its "
                    "validity check.", title="Steering: two-choice items vs coefficient",
                    ylabel="log P(trait) - log P(other), held-out items")


def _write_response_section(report: Report, cfg: Config, resp: list[TraitResult]) -> None:
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
*without* the trait system prompt; steering adds c x unit(vector) x ({unit_words(cfg)}) at resid_post of the layer
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
        rows.append({**_curve_row(r, rs), "validity effect": validity_words(rs.get("validity")),
                     "r last-prompt": rs["r_last_prompt"], "r response": rs["r_response"],
                     "held-out pairs": rs["n_held_out"]})
    report.table("Response-likelihood measure: results per trait", rows)
    steering_figure(report, resp, "response", "response_steering_curves",
                    "Response-likelihood measure (per-token log-likelihood of the model's own positive-prompted "
                    "answer minus the negative-prompted one, held-out questions) vs steering coefficient at its "
                    "chosen layer; dotted: the mean of the random directions of the same length (valid measures "
                    "only); dashed: a measure that failed its validity check.",
                    title="Steering: response-likelihood measure vs coefficient",
                    ylabel="per-token log P(pos answer) - log P(neg answer)")


def _write_specificity_section(report: Report, result: Result) -> None:
    """The specificity matrix: its heat map, how a cell is computed, the per-trait pass table and the secondary
    matrix of the trait-specific parts; or why it was not computed."""
    sp = result.metrics.get("specificity")
    if not sp:
        report.section("Specificity", f"Not computed: the run has {len(result.results)} trait(s) and the matrix needs "
                       f"at least {MIN_SPECIFICITY_TRAITS} (a trait's effect is compared with its effect on the others).")
        return
    specificity_figure(report, sp)
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
{trait_specific_reading(ts)}
""")


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
trait's vector at the same layer.{few} {reliability_reading(rel)}
""")
    reliability_figure(report, rel)


def _write_cosine_matrix(report: Report, results: list[TraitResult]) -> None:
    common, names, cos = cosine_matrix(results)
    if len(results) > 1:
        cosine_figure(report, common, names, cos)
    report.table(f"Cosine matrix at layer {common}", [{"trait": a, **{b: float(cos[i, j]) for j, b in enumerate(names)}}
                                                     for i, a in enumerate(names)])


def _write_trait_tables(report: Report, r: TraitResult) -> None:
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


def _save_trait_vectors(report: Report, result: Result, r: TraitResult) -> None:
    cfg, st, fi = result.config, r["steering"], r["filter"]
    meta = {"model": cfg.model, "site": SITE, "layers": list(range(result.n_layers)), "layer_indexing": LAYER_INDEXING,
            "method": "mean difference, positive minus negative, of per-response mean activations "
                      "(response_avg: assistant content tokens; prompt_avg: prompt content tokens incl. system; "
                      "prompt_last: the token before the response); unnormalised",
            "trait": r["trait"], "chosen_layer": st["layer"], "d_model": result.d_model, "n_pos": len(r["rows"]) // 2,
            "n_pairs_used": fi["n_pairs_kept"] if fi["filter"] and not fi.get("fallback") else fi["n_pairs_total"],
            "filtered": bool(fi["filter"] and not fi.get("fallback")),
            "typical_norm": r["typical_norm"], "steering_unit": f"coef x unit(vector[layer]) x {unit_words(cfg)}"}
    report.save_vectors(f"vectors_{r['trait']}", r["vectors"], meta)


def _write_responses(report: Report, results: list[TraitResult]) -> None:
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
