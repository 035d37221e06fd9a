"""The fine-tuning report folder: report.md with its sections, tables and figures, metrics.json and config.json, all
read from a finished `Result` (`pipeline.run`), so that the computation never writes and the writing never
computes."""
from __future__ import annotations

from pathlib import Path

from experiments.finetune.config import Config
from experiments.finetune.pipeline import Result
from experiments.finetune.report_figures import loss_plot, scatter, shift_bars, spread_plot
from experiments.finetune.report_text import (PREREGISTERED_TEXT, beyond_headlines, ci_text, comparison_lines,
                                              corr_text, finetune_row, overlap_text, prevention_headlines,
                                              scope, setup_text, trait_lines)
from experiments.finetune.trait_result import ModelDiff, Narrow, PreventionOverRuns, TraitResult
from experiments.report import Report
from psm_jax.persona import measures
from psm_jax.persona.measures import Validity


def write_report(result: Result, folder) -> Path:
    cfg, m = result.config, result.metrics
    rep = Report(folder, "Fine-tuning studies: data mixes, shift, screening, preventative steering", cfg)
    rep.section("Setup", setup_text(result))
    rel = " beyond the control, mix fine-tunes" if m["relative_to_control"] else ""
    rep.section("Headlines", "\n".join([
        "- " + corr_text(m["shift_behaviour"], f"Shift vs behaviour change{rel} (finetune_shift_behaviour_r)"),
        "- " + corr_text(m["screening_shift"], f"Screening (before training) vs shift{rel} (finetune_screening_r)")]
        + prevention_headlines(m) + beyond_headlines(result.beyond) + ["", PREREGISTERED_TEXT]))
    if m["relative_to_control"]:
        rep.section("Changes from the original model (control included)", "\n".join([
            "- " + corr_text(m["shift_behaviour_raw"], "Shift vs behaviour change, raw"),
            "- " + corr_text(m["screening_shift_raw"], "Screening vs shift, raw"),
            "The headline correlations use each mix fine-tune's change minus its trait's control fine-tune's (same "
            "questions, key and batch order), so the drift that training on the model's own answers causes, and its "
            "difference between traits, is not counted as the trait's shift."]))
    for r in result.results:
        per = m["traits"][r["trait"]]
        rep.section(f"Trait {r['trait']} (layer {r['layer']})", "\n".join(trait_lines(r, per)))
        rep.table(f"{r['trait']}: fine-tunes", [finetune_row(s) for s in per["finetunes"]])
        if per.get("prevention_over_runs"):
            _runs_table(rep, r["trait"], per["prevention_over_runs"])
        shift_bars(rep, r)
        ex = r["example_training"]
        rep.section(f"{r['trait']}: example training answers", "\n".join(
            f"- {pol}: Q: {ex[pol][0]} A: {' '.join(ex[pol][1].split())[:200]}" for pol in ex))
    scatter(rep, result.results, "shift", "score", "shift_vs_behaviour",
            "Plain fine-tunes: projection shift vs trait score change (labels: mix or control).",
            "last-prompt projection shift", "trait score change")
    scatter(rep, result.results, "screening", "shift", "screening_vs_shift",
            "Plain fine-tunes: screening score before training vs projection shift after.",
            "screening (projection difference of the data)", "last-prompt projection shift")
    loss_plot(rep, result.results)
    validity = {r["trait"]: r["validity"] for r in result.results}
    if "narrow" in result.beyond:
        _narrow_section(rep, result.beyond["narrow"], validity, cfg)
    if "model_diff" in result.beyond:
        _diff_section(rep, result.beyond["model_diff"], result.results[0], cfg)
    rep.section("Scope: what this run can and cannot show", scope(cfg))
    rep.metric("finetune", m)
    rep.metric("beyond_training", result.beyond)
    return rep.finish()


def _runs_table(rep: Report, trait: str, over_runs: list[PreventionOverRuns]) -> None:
    """One row per training run and preventative coefficient: the run's reduction with its interval over questions."""
    rows = [{"coefficient": p["name"], "seed": r["seed"], "reduction [95% CI over questions]": ci_text(r["reduction"]),
             "plain beyond control": ci_text(r["plain_vs_control"]),
             "ppl vs plain": "-" if r["ppl_vs_plain"] is None else f"{r['ppl_vs_plain']:.3f}",
             "meets target alone": r["meets_target"]} for p in over_runs for r in p["per_run"]]
    rep.table(f"{trait}: prevention in each training run", rows)


def _narrow_section(rep: Report, nv: Narrow, validity: dict[str, Validity], cfg: Config) -> None:
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
             + ", ".join(f"{split} domain {ci_text(nv['control_changes'][k][trained])}"
                         for k, split in (("in", "in"), ("out", "out of"))) + "."]
    for row in nv["per_kl"]:
        verdict = ("" if row["readable"] else " -- the in-domain effect's interval includes 0, so the spread ratio "
                   "is not readable at this weight")
        lines.append(f"- KL {row['kl_weight']:g}: spread {ci_text(row['spread'])} (in-domain effect "
                     f"{ci_text(row['in_domain'])}, out-of-domain {ci_text(row['out_of_domain'])}; vs the original "
                     f"instead of the control {ci_text(row['spread_vs_original'])}){verdict}.")
    rep.section("Narrow vs general (study 5)", "\n".join(lines))
    measures_ = list(nv["control_changes"]["in"])
    rows = [{"model": "control", **{f"{m} {sp}": ci_text(nv["control_changes"][sp][m]) for sp in ("in", "out")
                                    for m in measures_}}]
    rows += [{"model": f"narrow, KL {row['kl_weight']:g}", **{f"{m} {sp}": ci_text(row["changes"][sp][m])
                                                             for sp in ("in", "out") for m in measures_}}
             for row in nv["per_kl"]]
    rep.table("Narrow vs general: change from the original model per measure (in = in domain, out = out of "
              "domain; trait scores and Assistant-Axis projection)", rows)
    ex = nv["per_kl"][0]["examples"]
    rep.section("Narrow vs general: example answers (KL 0)", "\n".join(
        f"- {sp}: Q: {' '.join(q.split())[:160]} A: {' '.join(a.split())[:200]}" for sp, (q, a) in ex.items()))
    spread_plot(rep, nv)


def _diff_section(rep: Report, md: ModelDiff, r0: TraitResult, cfg: Config) -> None:
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
             f"overlap {overlap_text(ov)}, of {ov['k']} (chance {ov['chance']:.2f}; random {ov['k']}-latent sets, "
             f"95% band [{ov['null']['low']:.0f}, {ov['null']['high']:.0f}]; {ov['n_latents']} latents fire on the "
             "documents)"
             + ("" if ov["above_null"] else " -- not above the random band") + "."
             + (f" The control fine-tune's overlap: {md['control_overlap']}." if "control_overlap" in md else ""),
             f"- Spearman r of the two change vectors: {ci_text(sp['r'])}, over {sp['n']} latents; shuffled band "
             f"[{sp['null']['low']:.2f}, {sp['null']['high']:.2f}]" + ("" if sp["outside_null"] else
                                                                      " -- inside the band") + ".",
             *comparison_lines(md),
             f"- Persona vector |cosine| with the decoder rows of the fine-tune's top latents: "
             f"{da['mean_abs_cos']:.3f} (random latents' band [{da['null']['low']:.3f}, {da['null']['high']:.3f}]); "
             f"of the system prompt's top latents: {pa['mean_abs_cos']:.3f}."]
    rep.section("Model diffing (study 8)", "\n".join(lines))
    rep.table("Model diffing: the fine-tune's top latents", md["top_changes"])
