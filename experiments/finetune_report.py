"""The fine-tuning study's report and records: report.md with its tables and figures, metrics.json, config.json and
the lines for benchmarks/results.jsonl, all read from a finished `Result` (`experiments.finetune.run`), so that the
study module holds the computation and this one the words and pictures."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.finetune import (RAW_STATISTIC, Config, Result, prevention_pooled_target, prevention_runs_target,
                                  prevention_target, row_summary)
from experiments.report import Report, few_splits_text, fmt_num, pyplot
from psm_jax.persona import measures


def _ci_text(ci: dict | None, f: str = ".3g") -> str:
    if ci is None:
        return "n/a"
    est = ci.get("estimate", ci.get("ratio"))
    return f"{fmt_num(est, f)} [{fmt_num(ci['low'], f)}, {fmt_num(ci['high'], f)}]"


def _corr_text(c: dict | None, what: str) -> str:
    if c is None:
        return f"{what}: not computed (fewer than 3 plain fine-tunes or no spread)."
    text = (f"{what}: r = {_ci_text(c['r'])}, n = {c['n']} fine-tunes ({c['statistic']}); null band "
            f"({c['null_kind']}) [{c['null']['low']:.2f}, {c['null']['high']:.2f}]"
            + ("" if c["outside_null"] else " -- inside the null band: not evidence of a relation"))
    if c.get("per_trait"):
        text += "; per trait: " + ", ".join(
            f"{t} r = {_ci_text(pt) if 'low' in pt else fmt_num(pt['estimate'], '.3g')} (n = {pt['n']})"
            for t, pt in c["per_trait"].items())
    if c.get("dropped_traits"):
        text += f" (left out, < 3 fine-tunes or no spread: {', '.join(c['dropped_traits'])})"
    raw = c["unstandardised"]
    if c["statistic"] == RAW_STATISTIC and "within_trait" in c:
        text += (" -- no trait has 3 fine-tunes of its own, so this compares the traits with each other, not the "
                 "relation inside a trait (not recorded)")
    if c["statistic"] != RAW_STATISTIC:
        text += (f"; unstandardised pooled r = {_ci_text(raw['r'])}, pairs shuffled across all fine-tunes: band "
                 f"[{raw['null']['low']:.2f}, {raw['null']['high']:.2f}]" + (", outside it" if raw["outside_null"]
                                                                             else ", inside it"))
    if "within_trait" in c:
        text += f"; centred within trait (not scaled) r = {_ci_text(c['within_trait'])}"
        if "within_trait_null" in c:
            band = c["within_trait_null"]
            text += (f" (pairs shuffled inside each trait: band [{band['low']:.2f}, {band['high']:.2f}]"
                     + (", outside it)" if c["within_trait_outside_null"] else ", inside it)"))
    if c["n"] < 5:
        text += f" -- with {c['n']} fine-tunes the bootstrap interval is degenerate (few distinct resamples)"
    return text + "."


PREREGISTERED_TEXT = (
    "Statistic (chosen before the seed-1 run, not after seeing it): the headline r is the pooled r over per-trait "
    "standardised values: within each trait, x and y (over the mix fine-tunes, beyond the control) are centred and "
    "divided by their standard deviation, then one r is taken over all fine-tunes. Why: each trait has its own "
    "persona-vector norm and trait-score scale, so the unstandardised pooled r mixes those scales and the traits' "
    "offsets with the relation (the seed-0 run's pooled r fell inside its shuffled null while the within-trait r was "
    "high); Chen et al. 2025 report per-trait correlations. Its interval resamples fine-tunes inside each trait and "
    "re-standardises each resample; its null shuffles the pairing inside each trait. The per-trait r and the "
    "unstandardised pooled r are given beside it.")


def _scatter(rep: Report, results, key_x: str, key_y: str, name: str, caption: str, xlabel: str, ylabel: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for r in results:
        rows = [row_summary(row) for row in r["rows"] if row["variant"].kind in ("mix", "control")]
        pick = {"shift": lambda s: s["shift"]["estimate"], "score": lambda s: s["score_change"]["estimate"],
                "screening": lambda s: s["screening"]}
        ax.scatter([pick[key_x](s) for s in rows], [pick[key_y](s) for s in rows], label=r["trait"])
        for s in rows:
            ax.annotate(s["name"].replace("mix ", ""), (pick[key_x](s), pick[key_y](s)), fontsize=7)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=8)
    rep.figure(name, fig, caption)


def _shift_bars(rep: Report, r: dict) -> None:
    plt = pyplot()
    rows = [row_summary(row) for row in r["rows"]]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows)), 3.5))
    est = [s["shift"]["estimate"] for s in rows]
    err = [[e - s["shift"]["low"] for e, s in zip(est, rows)], [s["shift"]["high"] - e for e, s in zip(est, rows)]]
    ax.bar(range(len(rows)), est, yerr=err, capsize=3)
    band = rows[0]["shift_null"]
    ax.axhspan(band["low"], band["high"], color="grey", alpha=0.3, label=f"{band['n']} random directions (95%)")
    ax.set_xticks(range(len(rows)), [s["name"] for s in rows], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="last-prompt projection shift", title=f"{r['trait']}: shift per fine-tune (95% CI over questions)")
    ax.legend(fontsize=8)
    rep.figure(f"shift_{r['trait']}", fig, f"{r['trait']}: projection shift on the unit persona vector per fine-tune; "
                                           "the grey band is the null of random directions of matched norm (the band "
                                           "of the first fine-tune).")


def _loss_plot(rep: Report, results) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in results:
        for row in r["rows"]:
            ax.plot(range(1, len(row["training"]["loss"]) + 1), row["training"]["loss"],
                    label=f"{r['trait']}: {row['variant'].name}", lw=1)
    ax.set(xlabel="step", ylabel="training loss (assistant-token NLL)")
    ax.legend(fontsize=6)
    rep.figure("training_loss", fig, "Training loss per fine-tune.")


def write_report(result: Result, folder) -> Path:
    cfg, m = result.config, result.metrics
    rep = Report(folder, "Fine-tuning studies: data mixes, shift, screening, preventative steering", cfg)
    rep.section("Setup", _setup_text(result))
    rel = " beyond the control, mix fine-tunes" if m["relative_to_control"] else ""
    rep.section("Headlines", "\n".join([
        "- " + _corr_text(m["shift_behaviour"], f"Shift vs behaviour change{rel} (finetune_shift_behaviour_r)"),
        "- " + _corr_text(m["screening_shift"], f"Screening (before training) vs shift{rel} (finetune_screening_r)")]
        + _prevention_headlines(m) + _beyond_headlines(result.beyond) + ["", PREREGISTERED_TEXT]))
    if m["relative_to_control"]:
        rep.section("Changes from the original model (control included)", "\n".join([
            "- " + _corr_text(m["shift_behaviour_raw"], "Shift vs behaviour change, raw"),
            "- " + _corr_text(m["screening_shift_raw"], "Screening vs shift, raw"),
            "The headline correlations use each mix fine-tune's change minus its trait's control fine-tune's (same "
            "questions, key and batch order), so the drift that training on the model's own answers causes, and its "
            "difference between traits, is not counted as the trait's shift."]))
    for r in result.results:
        per = m["traits"][r["trait"]]
        rep.section(f"Trait {r['trait']} (layer {r['layer']})", "\n".join(_trait_lines(r, per)))
        rep.table(f"{r['trait']}: fine-tunes", [_finetune_row(s) for s in per["finetunes"]])
        if per.get("prevention_over_runs"):
            _runs_table(rep, r["trait"], per["prevention_over_runs"])
        _shift_bars(rep, r)
        ex = r["example_training"]
        rep.section(f"{r['trait']}: example training answers", "\n".join(
            f"- {pol}: Q: {ex[pol][0]} A: {' '.join(ex[pol][1].split())[:200]}" for pol in ex))
    _scatter(rep, result.results, "shift", "score", "shift_vs_behaviour",
             "Plain fine-tunes: projection shift vs trait score change (labels: mix or control).",
             "last-prompt projection shift", "trait score change")
    _scatter(rep, result.results, "screening", "shift", "screening_vs_shift",
             "Plain fine-tunes: screening score before training vs projection shift after.",
             "screening (projection difference of the data)", "last-prompt projection shift")
    _loss_plot(rep, result.results)
    validity = {r["trait"]: r["validity"] for r in result.results}
    if "narrow" in result.beyond:
        _narrow_section(rep, result.beyond["narrow"], validity, cfg)
    if "model_diff" in result.beyond:
        _diff_section(rep, result.beyond["model_diff"], result.results[0], cfg)
    rep.section("Scope: what this run can and cannot show", _scope(cfg))
    rep.metric("finetune", m)
    rep.metric("beyond_training", result.beyond)
    return rep.finish()


def _setup_text(result: Result) -> str:
    """What ran: model, traits, the persona vector's layer, the training data and LoRA settings, the evaluation."""
    cfg = result.config
    layer_from = "the middle block" if cfg.layer is None else "given in the configuration, not chosen on this run"
    switch = " (the persona switch, with every question twice, twice as many)" if cfg.persona_switch else ""
    return (f"Model `{cfg.model}` ({result.model_source}; {result.n_layers} layers, width {result.d_model}); traits "
            f"{', '.join(cfg.traits)}; seed {cfg.seed}. Persona vector at resid_post of block "
            f"{', '.join(str(r['layer']) for r in result.results)} ({layer_from}) from "
            f"{cfg.n_extract_pairs} instruction pairs x "
            f"{cfg.n_extract_questions} extraction questions. Training: {cfg.n_train_questions} packaged fine-tuning "
            f"questions answered by the model itself (greedy, <= {cfg.max_new_tokens} tokens) under the positive / "
            f"negative / no system prompt; mixes {', '.join(f'{p:.0%}' for p in cfg.mixes)} of positive answers, "
            f"trained without the system prompt; LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g}, lr "
            f"{cfg.learning_rate:g}, {cfg.steps} steps of batch {cfg.batch_size}, seq_len {cfg.seq_len}{switch}. "
            f"Evaluation: {cfg.n_eval_questions} "
            f"evaluation questions per trait, default prompt; intervals are 95% bootstraps over questions (per "
            f"fine-tune) or fine-tunes (correlations). Ran in {result.seconds:.0f} s.")


def reliability_text(rel: dict | None) -> str:
    """The persona vector's split-half reliability in one sentence, with a warning when the questions allow fewer
    distinct splits than were drawn."""
    if rel is None:
        return "Persona vector reliability: not measured (one extraction question)."
    few = few_splits_text(rel["n_groups"], rel["distinct_splits"], rel["n_splits"])
    return (f"Persona vector reliability (split halves of {rel['n_groups']} extraction questions, stepped up to the "
            f"full size): a vector from other questions is expected to share cosine {rel['predicted']:.2f} "
            f"[{rel['low']:.2f}, {rel['high']:.2f}] with this one." + (f" {few}" if few else "") +
            " The shifts below are measured along this vector, so they are only as reproducible as it is.")


def _trait_lines(r: dict, per: dict) -> list[str]:
    """One trait's validity and screening checks, each steered fine-tune's prevention, inoculation and the switch."""
    lines = [f"- Trait score validity: {measures.validity_text(r['validity'])}" +
             ("" if r["validity"]["valid"] else " -- behaviour changes below are not evidence for this trait"),
             f"- Screening sanity (projection minus own answer's, per training question): positive answers "
             f"{_ci_text(r['screening_validity']['pos'])}, negative answers "
             f"{_ci_text(r['screening_validity']['neg'])}; persona vector norm {r['vector_norm']:.3g}.",
             f"- {reliability_text(r.get('vector_reliability'))}"]
    for p in per.get("prevention", []):
        what = "beyond the control" if p["relative_to_control"] else "raw"
        lines.append(f"- {p['name']}: shift reduction vs plain 100% ({what}) {_ci_text(p['reduction'])} (raw "
                     f"{_ci_text(p['reduction_raw'])}; plain shift {_ci_text(p['plain_shift'])}); trait score vs "
                     f"plain {_ci_text(p['score_difference'])}; perplexity ratio vs original "
                     f"{_ci_text(p['ppl'])} (plain {_ci_text(p['plain_ppl'])}), vs the plain fine-tune "
                     f"{_ci_text(p.get('ppl_vs_plain'))}.")
        if "plain_vs_control" in p:
            lines.append(f"  Relative to the control fine-tune: plain {_ci_text(p['plain_vs_control'])}, steered "
                         f"{_ci_text(p['steered_vs_control'])}" + ("" if p["plain_toward_trait"] else
                         "; the plain fine-tune did not move toward the trait beyond the control, so the "
                         "reduction ratio is not a measure of prevention here") + ".")
    if "inoculation_effect" in per:
        lines.append(f"- Inoculation effect (trait score, inoculated minus plain 100%, no system prompt at test): "
                     f"{_ci_text(per['inoculation_effect'])}.")
    if "persona_switch_effect" in per:
        lines.append(f"- Persona switch effect (trigger minus no trigger, beyond the original model's): "
                     f"{_ci_text(per['persona_switch_effect'])}.")
    return lines


def _finetune_row(s: dict) -> dict:
    return {"fine-tune": s["name"], "screening": s["screening"], "shift [95% CI]": _ci_text(s["shift"]),
            "random band": f"[{s['shift_null']['low']:.3g}, {s['shift_null']['high']:.3g}]",
            "trait score change": _ci_text(s["score_change"]), "ppl ratio": _ci_text(s["ppl"]),
            "final loss": s["final_loss"], "train s": s["train_seconds"], "tok/s": s["tokens_per_s"]}




def _prevention_headlines(m: dict) -> list[str]:
    out = []
    for trait, per in m["traits"].items():
        for p in per.get("prevention", []):
            verdict = ("meets the target (>= 50% cut, < 5% perplexity cost)" if prevention_target(p) else
                       "does not meet the target" + ("" if p.get("plain_toward_trait", True) else
                                                     ": the plain fine-tune did not move toward the trait"))
            out.append(f"- Prevention, {trait}, {p['name']} (preventative_steering_shift_reduction): "
                       f"{_ci_text(p['reduction'])} of the shift{' beyond the control' * p['relative_to_control']}, "
                       f"perplexity vs plain {_ci_text(p.get('ppl_vs_plain'))} -- {verdict}.")
        for p in per.get("prevention_over_runs", []):
            verdict = ("meets the target over runs" if prevention_runs_target(p) else
                       "does not meet the target over runs")
            pooled = ("meets it" if prevention_pooled_target(p) else "does not meet it")
            out.append(f"- Prevention over {p['n_runs']} independent training runs (seeds {_seeds_text(p['seeds'])}), "
                       f"{trait}, {p['name']} (preventative_steering_reduction_over_runs): mean reduction "
                       f"{_ci_text(p['reduction'])} (Student-t interval over runs); the plain fine-tune's shift beyond "
                       f"the control {_ci_text(p['plain_vs_control'])}; perplexity vs plain "
                       f"{p['ppl_vs_plain_mean']:.3f} on average, at most {p['ppl_vs_plain_max']:.3f}; "
                       f"{sum(r['meets_target'] for r in p['per_run'])} of {p['n_runs']} runs meet the target alone "
                       f"-- {verdict}. The ratio of means over runs (preventative_steering_pooled_reduction_over_runs: "
                       f"1 - mean steered / mean plain shift beyond the control, leave-one-run-out jackknife at "
                       f"Student-t values) is {_ci_text(p['pooled_reduction'])} and {pooled}.")
    return out




def _seeds_text(seeds: list[int]) -> str:
    return f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2 else \
        ", ".join(map(str, seeds))


def _runs_table(rep: Report, trait: str, over_runs: list[dict]) -> None:
    """One row per training run and preventative coefficient: the run's reduction with its interval over questions."""
    rows = [{"coefficient": p["name"], "seed": r["seed"], "reduction [95% CI over questions]": _ci_text(r["reduction"]),
             "plain beyond control": _ci_text(r["plain_vs_control"]),
             "ppl vs plain": "-" if r["ppl_vs_plain"] is None else f"{r['ppl_vs_plain']:.3f}",
             "meets target alone": r["meets_target"]} for p in over_runs for r in p["per_run"]]
    rep.table(f"{trait}: prevention in each training run", rows)


def _beyond_headlines(beyond: dict) -> list[str]:
    out = []
    for row in beyond.get("narrow", {}).get("per_kl", []):
        out.append(f"- Narrow vs general spread at KL {row['kl_weight']:g} (narrow_vs_general_spread): "
                   f"{_ci_text(row['spread'])}, in-domain effect {_ci_text(row['in_domain'])}" +
                   ("." if row["readable"] else " -- the in-domain effect is not distinguishable from 0, so the "
                    "ratio is not readable."))
    md = beyond.get("model_diff")
    if md is not None:
        for what, comparison in [("", md)] + [(f" on {w}", md[k]) for k, w in DIFF_COMPARISONS.items() if k in md]:
            ov, sp = comparison["overlap"], comparison["spearman"]
            out.append(f"- Model diffing{what} (model_diff_latent_overlap): top-{ov['k']} overlap "
                       f"{_overlap_text(ov)} (chance {ov['chance']:.2f}, random band [{ov['null']['low']:.0f}, "
                       f"{ov['null']['high']:.0f}]); Spearman r {_ci_text(sp['r'])}; intervals over "
                       f"{sp['r']['n']} questions.")
    return out


def _scope(cfg: Config) -> str:
    """What this configuration can and cannot show (the report's last section), from the variants it ran."""
    n_plain = len(cfg.mixes) + int(cfg.control)
    can = [f"per trait ({', '.join(cfg.traits)}), whether each fine-tune moved the last-prompt projection on the "
           f"persona vector beyond a band of {cfg.n_random} random directions and the judge-free trait score, paired "
           f"over {cfg.n_eval_questions} evaluation questions"]
    if cfg.control:
        can.append("whether those moves exceed the control fine-tune's (the model's own answers: the drift any "
                   "fine-tune causes)")
    if cfg.prevent_coefs and 1.0 in cfg.mixes:
        can.append(f"how much preventative steering at c = {', '.join(f'{c:g}' for c in cfg.prevent_coefs)} changes "
                   f"the plain 100% fine-tune's shift, at what perplexity cost on {cfg.n_ppl_conversations} held-out "
                   "ShareGPT conversations")
    cannot = []
    if cfg.prevent_coefs and cfg.prevention_runs > 1:
        can.append(f"whether that change holds across {cfg.prevention_runs} independent training runs (an interval "
                   "over runs, not only over questions)")
    elif cfg.prevent_coefs:
        cannot.append("how much prevention varies between training runs: its interval is over questions in one run "
                      "(prevention_runs > 1 repeats the plain, preventative and control fine-tunes under new seeds)")
    if n_plain < 3:
        cannot.append(f"the shift-behaviour and screening correlations (studies 2 and 3) need >= 3 plain fine-tunes "
                      f"(this run has {n_plain}; >= 5 for an interval that is not degenerate)")
    off = [name for name, on in (("CAFT", cfg.caft), ("inoculation", cfg.inoculation),
                                 ("the persona switch", cfg.persona_switch),
                                 ("narrow vs general (study 5)", cfg.narrow),
                                 ("SAE model diffing (study 8)", cfg.model_diff)) if not on]
    if off:
        cannot.append(f"{', '.join(off)} (off in this configuration)")
    cannot.append(f"effects of longer training: each fine-tune is {cfg.steps} LoRA steps of batch {cfg.batch_size} on "
                  f"{cfg.n_train_questions} self-made answers of <= {cfg.max_new_tokens} tokens")
    cannot.append("LoRA gradient spectra and sequential fine-tunes (SafeAnchor); tokens/s figures here are from "
                  "this run, not a benchmark")
    return "Can show: " + "; ".join(can) + ".\n\nCannot show: " + "; ".join(cannot) + "."


def _narrow_section(rep: Report, nv: dict, validity: dict, cfg: Config) -> None:
    trained = nv["trait"]
    src = ", ".join(f"{n} {k}" for k, n in nv["out_sources"].items())
    lines = [f"Narrow set: {trained}'s 100% set ({cfg.n_train_questions} questions), trained plainly (KL weight 0 = "
             f"the plain 100% fine-tune above) and with a KL penalty toward the original model on "
             f"{cfg.n_kl_reference} held-out ShareGPT conversations at weights "
             f"{', '.join(f'{w:g}' for w in cfg.kl_weights)}. In domain: {nv['n_in']} {trained} evaluation "
             f"questions; out of domain: {nv['n_out']} questions ({src}). Assistant Axis: {nv['axis']['source']}.",
             "Trait score validity (positive vs negative system prompt on the trait's evaluation questions): " +
             "; ".join(f"{t}: {measures.validity_text(v)}" for t, v in validity.items()) + ".",
             f"Spread = out-of-domain change / in-domain change of the {trained} score, each per question beyond the "
             "control fine-tune (0: stayed in domain; 1: spread fully); 95% interval resampling the two question "
             "sets independently. Null: the control fine-tune's own change from the original model, "
             + ", ".join(f"{split} domain {_ci_text(nv['control_changes'][k][trained])}"
                         for k, split in (("in", "in"), ("out", "out of"))) + "."]
    for row in nv["per_kl"]:
        verdict = ("" if row["readable"] else " -- the in-domain effect's interval includes 0, so the spread ratio "
                   "is not readable at this weight")
        lines.append(f"- KL {row['kl_weight']:g}: spread {_ci_text(row['spread'])} (in-domain effect "
                     f"{_ci_text(row['in_domain'])}, out-of-domain {_ci_text(row['out_of_domain'])}; vs the original "
                     f"instead of the control {_ci_text(row['spread_vs_original'])}){verdict}.")
    rep.section("Narrow vs general (study 5)", "\n".join(lines))
    measures_ = list(nv["control_changes"]["in"])
    rows = [{"model": "control", **{f"{m} {sp}": _ci_text(nv["control_changes"][sp][m]) for sp in ("in", "out")
                                    for m in measures_}}]
    rows += [{"model": f"narrow, KL {row['kl_weight']:g}", **{f"{m} {sp}": _ci_text(row["changes"][sp][m])
                                                             for sp in ("in", "out") for m in measures_}}
             for row in nv["per_kl"]]
    rep.table("Narrow vs general: change from the original model per measure (in = in domain, out = out of "
              "domain; trait scores and Assistant-Axis projection)", rows)
    ex = nv["per_kl"][0]["examples"]
    rep.section("Narrow vs general: example answers (KL 0)", "\n".join(
        f"- {sp}: Q: {' '.join(q.split())[:160]} A: {' '.join(a.split())[:200]}" for sp, (q, a) in ex.items()))
    _spread_plot(rep, nv)


def _spread_plot(rep: Report, nv: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    w = [r["kl_weight"] for r in nv["per_kl"]]
    for key, label, off in (("in_domain", "in domain", -0.15), ("out_of_domain", "out of domain", 0.15)):
        est = [r[key]["estimate"] for r in nv["per_kl"]]
        err = [[e - r[key]["low"] for e, r in zip(est, nv["per_kl"])],
               [r[key]["high"] - e for e, r in zip(est, nv["per_kl"])]]
        ax.errorbar(np.arange(len(w)) + off, est, yerr=err, fmt="o", capsize=3, label=label)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(range(len(w)), [f"KL {x:g}" for x in w])
    ax.set(ylabel=f"{nv['trait']} score change beyond control")
    ax.legend(fontsize=8)
    rep.figure("narrow_vs_general", fig, f"{nv['trait']} score change of the narrow fine-tune beyond the control, in "
                                         "and out of domain, per KL weight (95% CI over questions).")


DIFF_COMPARISONS = {  # summarize_diff's key -> what its change vector is (report and record wording)
    "beyond_control": "the fine-tune's latent change beyond the control fine-tune's",
    "polarity": "the 100% fine-tune's latent change minus the 0% (opposite) fine-tune's",
}


def _comparison_lines(md: dict) -> list[str]:
    """The overlap and rank correlation of each further change vector: beyond the control (the drift of training
    on the model's own answers removed) and the polarity contrast (100% minus 0% fine-tune)."""
    lines = []
    for key, what in DIFF_COMPARISONS.items():
        if key not in md:
            continue
        ov, sp = md[key]["overlap"], md[key]["spearman"]
        lines.append(f"- {what[0].upper()}{what[1:]}: top-{ov['k']} overlap {_overlap_text(ov)} (random band "
                     f"[{ov['null']['low']:.0f}, {ov['null']['high']:.0f}])"
                     + ("" if ov["above_null"] else " -- not above the random band")
                     + f"; Spearman r {_ci_text(sp['r'])}, shuffled band [{sp['null']['low']:.2f}, "
                       f"{sp['null']['high']:.2f}]" + ("" if sp["outside_null"] else " -- inside the band") + ".")
    return lines


def _overlap_text(ov: dict) -> str:
    """The top-k overlap with its interval over questions and its range when one question is left out, and whether
    that range stays above the random band (no single question carries the agreement)."""
    iv = ov["interval"]
    held = ("always above the random band" if iv["left_out_min"] > ov["null"]["high"]
            else "down into the random band")
    return (f"{ov['overlap']} [{iv['low']:.0f}, {iv['high']:.0f}] (one question left out: "
            f"{iv['left_out_min']}-{iv['left_out_max']}, {held})")


def _diff_section(rep: Report, md: dict, r0: dict, cfg: Config) -> None:
    sae, ov, sp = md["sae"], md["overlap"], md["spearman"]
    da, pa = md["decoder_alignment"], md["prompt_decoder_alignment"]
    made = (f"trained here with sae.train on {sae['tokens']} tokens of the original model (TopK, d_sae "
            f"{sae['d_sae']}, k {sae['k']}, {sae['steps']} steps; on its training activations "
            f"{', '.join(f'{k} {v:.3g}' for k, v in sae['eval_on_training_acts'].items())})" if sae["trained_here"]
            else f"loaded from {sae['source']} ({sae['format']}, d_sae {sae['d_sae']})")
    lines = [f"SAE at resid_post of block {r0['layer']}: {made}. Documents: {md['n_documents']} (the {r0['trait']} "
             "evaluation questions with the original's and the fine-tune's answers, user and assistant tokens). "
             f"Intervals: 95% leave-one-question-out jackknife over the {sp['r']['n']} questions, both change "
             "vectors recomputed without each question in turn.",
             f"- Top-{ov['k']} latents by |change|, plain 100% fine-tune vs positive-vs-negative system prompt: "
             f"overlap {_overlap_text(ov)}, of {ov['k']} (chance {ov['chance']:.2f}; random {ov['k']}-latent sets, "
             f"95% band [{ov['null']['low']:.0f}, {ov['null']['high']:.0f}]; {ov['n_latents']} latents fire on the "
             "documents)"
             + ("" if ov["above_null"] else " -- not above the random band") + "."
             + (f" The control fine-tune's overlap: {md['control_overlap']}." if "control_overlap" in md else ""),
             f"- Spearman r of the two change vectors: {_ci_text(sp['r'])}, over {sp['n']} latents; shuffled band "
             f"[{sp['null']['low']:.2f}, {sp['null']['high']:.2f}]" + ("" if sp["outside_null"] else
                                                                      " -- inside the band") + ".",
             *_comparison_lines(md),
             f"- Persona vector |cosine| with the decoder rows of the fine-tune's top latents: "
             f"{da['mean_abs_cos']:.3f} (random latents' band [{da['null']['low']:.3f}, {da['null']['high']:.3f}]); "
             f"of the system prompt's top latents: {pa['mean_abs_cos']:.3f}."]
    rep.section("Model diffing (study 8)", "\n".join(lines))
    rep.table("Model diffing: the fine-tune's top latents", md["top_changes"])


# ------------------------------------------------------------------------------ records


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


def _correlation_records(m: dict, cfg, common: dict) -> list[dict]:
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


def _reliability_records(trait: str, per: dict, cfg, common: dict) -> list[dict]:
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


def _prevention_records(trait: str, per: dict, valid: bool, common: dict) -> list[dict]:
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


def _prevention_over_runs_records(trait: str, per: dict, valid: bool, common: dict) -> list[dict]:
    """Preventative steering over independent training runs: the mean of per-run reductions and the ratio of means."""
    out = []
    for p in per.get("prevention_over_runs", []):
        red, toward, pooled = p["reduction"], p["plain_vs_control"], p["pooled_reduction"]
        shared = dict(unit="fraction", trait=trait, coef=p["coef"], key=f"{trait}/{p['name']}", n=p["n_runs"],
                      n_unit="training runs", seeds=p["seeds"], measure_valid=valid,
                      target=">= 0.5 (interval over runs) at < 5% perplexity cost, plain shift beyond the control "
                             "above 0 over runs",
                      null="0: no reduction of the plain fine-tune's shift beyond the control", **common)
        runs = f"{p['n_runs']} training runs (seeds {_seeds_text(p['seeds'])})"
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


def _effect_records(trait: str, per: dict, valid: bool, common: dict) -> list[dict]:
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


def _within_fields(c: dict) -> dict:
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


def _overlap_record(ov: dict, sp: dict, md: dict, common: dict, *, key: str | None = None, what: str = "",
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
                reference=f"{what}top-{ov['k']} overlap {_overlap_text(ov)} (chance {ov['chance']:.2f}, random band "
                          f"[{ov['null']['low']:.0f}, {ov['null']['high']:.0f}]) among {ov['n_latents']} latents; "
                          f"Spearman r {sp['r']['estimate']:.3f} [{sp['r']['low']:.3f}, {sp['r']['high']:.3f}]; "
                          f"intervals over {sp['r']['n']} questions",
                **common)
    if control_overlap is not None:
        line["control_overlap"] = control_overlap / ov["k"]
    if key is not None:
        line["key"] = key
    return line
