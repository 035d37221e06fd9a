"""The sentences of the fine-tuning report: each turns one piece of a finished run (an interval, a correlation, a
trait's checks and prevention, the headlines, what the configuration can show) into the words report.md and the
record references use, so the section writers (`report_folder`) only arrange them."""
from __future__ import annotations

from experiments.finetune.config import RAW_STATISTIC, Config
from experiments.finetune.pipeline import Result
from experiments.finetune.summary import prevention_pooled_target, prevention_runs_target, prevention_target
from experiments.finetune.trait_result import (Beyond, Correlation, Metrics, ModelDiff, Overlap, RowSummary,
                                               TraitMetrics, TraitResult, VectorReliability)
from experiments.report import few_splits_text, fmt_num
from psm_jax.persona import measures


def ci_text(ci: dict | None, f: str = ".3g") -> str:
    if ci is None:
        return "n/a"
    est = ci.get("estimate", ci.get("ratio"))
    return f"{fmt_num(est, f)} [{fmt_num(ci['low'], f)}, {fmt_num(ci['high'], f)}]"


def corr_text(c: Correlation | None, what: str) -> str:
    if c is None:
        return f"{what}: not computed (fewer than 3 plain fine-tunes or no spread)."
    text = (f"{what}: r = {ci_text(c['r'])}, n = {c['n']} fine-tunes ({c['statistic']}); null band "
            f"({c['null_kind']}) [{c['null']['low']:.2f}, {c['null']['high']:.2f}]"
            + ("" if c["outside_null"] else " -- inside the null band: not evidence of a relation"))
    if c.get("per_trait"):
        text += "; per trait: " + ", ".join(
            f"{t} r = {ci_text(pt) if 'low' in pt else fmt_num(pt['estimate'], '.3g')} (n = {pt['n']})"
            for t, pt in c["per_trait"].items())
    if c.get("dropped_traits"):
        text += f" (left out, < 3 fine-tunes or no spread: {', '.join(c['dropped_traits'])})"
    raw = c["unstandardised"]
    if c["statistic"] == RAW_STATISTIC and "within_trait" in c:
        text += (" -- no trait has 3 fine-tunes of its own, so this compares the traits with each other, not the "
                 "relation inside a trait (not recorded)")
    if c["statistic"] != RAW_STATISTIC:
        text += (f"; unstandardised pooled r = {ci_text(raw['r'])}, pairs shuffled across all fine-tunes: band "
                 f"[{raw['null']['low']:.2f}, {raw['null']['high']:.2f}]" + (", outside it" if raw["outside_null"]
                                                                             else ", inside it"))
    if "within_trait" in c:
        text += f"; centred within trait (not scaled) r = {ci_text(c['within_trait'])}"
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


def setup_text(result: Result) -> str:
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


def reliability_text(rel: VectorReliability | None) -> str:
    """The persona vector's split-half reliability in one sentence, with a warning when the questions allow fewer
    distinct splits than were drawn."""
    if rel is None:
        return "Persona vector reliability: not measured (one extraction question)."
    few = few_splits_text(rel["n_groups"], rel["distinct_splits"], rel["n_splits"])
    return (f"Persona vector reliability (split halves of {rel['n_groups']} extraction questions, stepped up to the "
            f"full size): a vector from other questions is expected to share cosine {rel['predicted']:.2f} "
            f"[{rel['low']:.2f}, {rel['high']:.2f}] with this one." + (f" {few}" if few else "") +
            " The shifts below are measured along this vector, so they are only as reproducible as it is.")


def trait_lines(r: TraitResult, per: TraitMetrics) -> list[str]:
    """One trait's validity and screening checks, each steered fine-tune's prevention, inoculation and the switch."""
    lines = [f"- Trait score validity: {measures.validity_text(r['validity'])}" +
             ("" if r["validity"]["valid"] else " -- behaviour changes below are not evidence for this trait"),
             f"- Screening sanity (projection minus own answer's, per training question): positive answers "
             f"{ci_text(r['screening_validity']['pos'])}, negative answers "
             f"{ci_text(r['screening_validity']['neg'])}; persona vector norm {r['vector_norm']:.3g}.",
             f"- {reliability_text(r.get('vector_reliability'))}"]
    for p in per.get("prevention", []):
        what = "beyond the control" if p["relative_to_control"] else "raw"
        lines.append(f"- {p['name']}: shift reduction vs plain 100% ({what}) {ci_text(p['reduction'])} (raw "
                     f"{ci_text(p['reduction_raw'])}; plain shift {ci_text(p['plain_shift'])}); trait score vs "
                     f"plain {ci_text(p['score_difference'])}; perplexity ratio vs original "
                     f"{ci_text(p['ppl'])} (plain {ci_text(p['plain_ppl'])}), vs the plain fine-tune "
                     f"{ci_text(p.get('ppl_vs_plain'))}.")
        if "plain_vs_control" in p:
            lines.append(f"  Relative to the control fine-tune: plain {ci_text(p['plain_vs_control'])}, steered "
                         f"{ci_text(p['steered_vs_control'])}" + ("" if p["plain_toward_trait"] else
                         "; the plain fine-tune did not move toward the trait beyond the control, so the "
                         "reduction ratio is not a measure of prevention here") + ".")
    if "inoculation_effect" in per:
        lines.append(f"- Inoculation effect (trait score, inoculated minus plain 100%, no system prompt at test): "
                     f"{ci_text(per['inoculation_effect'])}.")
    if "persona_switch_effect" in per:
        lines.append(f"- Persona switch effect (trigger minus no trigger, beyond the original model's): "
                     f"{ci_text(per['persona_switch_effect'])}.")
    return lines


def finetune_row(s: RowSummary) -> dict:
    """One fine-tune's row of the report table: its statistics as text, so the table shows the intervals."""
    return {"fine-tune": s["name"], "screening": s["screening"], "shift [95% CI]": ci_text(s["shift"]),
            "random band": f"[{s['shift_null']['low']:.3g}, {s['shift_null']['high']:.3g}]",
            "trait score change": ci_text(s["score_change"]), "ppl ratio": ci_text(s["ppl"]),
            "final loss": s["final_loss"], "train s": s["train_seconds"], "tok/s": s["tokens_per_s"]}


def prevention_headlines(m: Metrics) -> list[str]:
    out = []
    for trait, per in m["traits"].items():
        for p in per.get("prevention", []):
            verdict = ("meets the target (>= 50% cut, < 5% perplexity cost)" if prevention_target(p) else
                       "does not meet the target" + ("" if p.get("plain_toward_trait", True) else
                                                     ": the plain fine-tune did not move toward the trait"))
            out.append(f"- Prevention, {trait}, {p['name']} (preventative_steering_shift_reduction): "
                       f"{ci_text(p['reduction'])} of the shift{' beyond the control' * p['relative_to_control']}, "
                       f"perplexity vs plain {ci_text(p.get('ppl_vs_plain'))} -- {verdict}.")
        for p in per.get("prevention_over_runs", []):
            verdict = ("meets the target over runs" if prevention_runs_target(p) else
                       "does not meet the target over runs")
            pooled = ("meets it" if prevention_pooled_target(p) else "does not meet it")
            out.append(f"- Prevention over {p['n_runs']} independent training runs (seeds {seeds_text(p['seeds'])}), "
                       f"{trait}, {p['name']} (preventative_steering_reduction_over_runs): mean reduction "
                       f"{ci_text(p['reduction'])} (Student-t interval over runs); the plain fine-tune's shift beyond "
                       f"the control {ci_text(p['plain_vs_control'])}; perplexity vs plain "
                       f"{p['ppl_vs_plain_mean']:.3f} on average, at most {p['ppl_vs_plain_max']:.3f}; "
                       f"{sum(r['meets_target'] for r in p['per_run'])} of {p['n_runs']} runs meet the target alone "
                       f"-- {verdict}. The ratio of means over runs (preventative_steering_pooled_reduction_over_runs: "
                       f"1 - mean steered / mean plain shift beyond the control, leave-one-run-out jackknife at "
                       f"Student-t values) is {ci_text(p['pooled_reduction'])} and {pooled}.")
    return out




def seeds_text(seeds: list[int]) -> str:
    return f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2 else \
        ", ".join(map(str, seeds))


def beyond_headlines(beyond: Beyond) -> list[str]:
    out = []
    for row in beyond.get("narrow", {}).get("per_kl", []):
        out.append(f"- Narrow vs general spread at KL {row['kl_weight']:g} (narrow_vs_general_spread): "
                   f"{ci_text(row['spread'])}, in-domain effect {ci_text(row['in_domain'])}" +
                   ("." if row["readable"] else " -- the in-domain effect is not distinguishable from 0, so the "
                    "ratio is not readable."))
    md = beyond.get("model_diff")
    if md is not None:
        for what, comparison in [("", md)] + [(f" on {w}", md[k]) for k, w in DIFF_COMPARISONS.items() if k in md]:
            ov, sp = comparison["overlap"], comparison["spearman"]
            out.append(f"- Model diffing{what} (model_diff_latent_overlap): top-{ov['k']} overlap "
                       f"{overlap_text(ov)} (chance {ov['chance']:.2f}, random band [{ov['null']['low']:.0f}, "
                       f"{ov['null']['high']:.0f}]); Spearman r {ci_text(sp['r'])}; intervals over "
                       f"{sp['r']['n']} questions.")
    return out


def scope(cfg: Config) -> str:
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


DIFF_COMPARISONS = {  # summarize_diff's key -> what its change vector is (report and record wording)
    "beyond_control": "the fine-tune's latent change beyond the control fine-tune's",
    "polarity": "the 100% fine-tune's latent change minus the 0% (opposite) fine-tune's",
}


def comparison_lines(md: ModelDiff) -> list[str]:
    """The overlap and rank correlation of each further change vector: beyond the control (the drift of training
    on the model's own answers removed) and the polarity contrast (100% minus 0% fine-tune)."""
    lines = []
    for key, what in DIFF_COMPARISONS.items():
        if key not in md:
            continue
        ov, sp = md[key]["overlap"], md[key]["spearman"]
        lines.append(f"- {what[0].upper()}{what[1:]}: top-{ov['k']} overlap {overlap_text(ov)} (random band "
                     f"[{ov['null']['low']:.0f}, {ov['null']['high']:.0f}])"
                     + ("" if ov["above_null"] else " -- not above the random band")
                     + f"; Spearman r {ci_text(sp['r'])}, shuffled band [{sp['null']['low']:.2f}, "
                       f"{sp['null']['high']:.2f}]" + ("" if sp["outside_null"] else " -- inside the band") + ".")
    return lines


def overlap_text(ov: Overlap) -> str:
    """The top-k overlap with its interval over questions and its range when one question is left out, and whether
    that range stays above the random band (no single question carries the agreement)."""
    iv = ov["interval"]
    held = ("always above the random band" if iv["left_out_min"] > ov["null"]["high"]
            else "down into the random band")
    return (f"{ov['overlap']} [{iv['low']:.0f}, {iv['high']:.0f}] (one question left out: "
            f"{iv['left_out_min']}-{iv['left_out_max']}, {held})")
