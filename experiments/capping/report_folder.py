"""The capping report folder: report.md with its sections, tables and plots, metrics.json, config.json and the axis
with the capping settings, all read from a finished `Result` (`pipeline.run`), so that the computation never writes
and the writing never computes."""
from __future__ import annotations

from pathlib import Path

from experiments.capping.jailbreak import Jailbreaks
from experiments.capping.pipeline import Result
from experiments.capping.report_figures import jailbreak_figure, plots
from experiments.capping.report_text import (POSITIONS_NOTE, interval, jailbreak_reading, qa_reading, qa_verdict,
                                             setup_text)
from experiments.report import Report
from psm_jax.persona import measures
from psm_jax.persona.directions import SITE
from psm_jax.persona.rollouts import Rollout


def write_report(res: Result, folder) -> Path:
    """report.md with its tables and plots, the axis with the capping settings (capping.safetensors), the metrics."""

    cfg, m, th, rpl = res.config, res.metrics, res.thresholds, res.roleplay
    rep = Report(folder, "Activation capping along the Assistant Axis", config=cfg)
    rep.section("Setup", setup_text(res))
    rep.table("Thresholds (floors on the unit-axis projection)", [
        {"layer": layer, "floor": float(f), "default tokens below": f"{fb:.0%}"}
        for layer, f, fb in zip(res.capped_layers, th.floors, th.frac_below)])
    rep.table("Headline (role-inducing system prompts)", _headline_rows(res))
    if res.jailbreaks is not None:
        _jailbreak_sections(rep, cfg, res.jailbreaks)
    if res.qa_accuracy:
        _qa_section(rep, res.qa_accuracy)
    if res.traits.rows:
        rep.table("Behavioural items (per-token log P(trait answer) - log P(other), mean; evidence only where the "
                  "validity check run here passes)", res.traits.rows)
        if cfg.positions == "assistant":
            rep.section("Note on assistant-only capping", POSITIONS_NOTE)
    if cfg.roleplay:
        rep.table("Long role-play conversations: identity log-odds after k scripted exchanges", rpl.rows)
        rep.section("Role-play end-of-conversation identity answers",
                    f"Keyword rate without capping {rpl.keyword_rate['plain']:.0%}, with capping "
                    f"{rpl.keyword_rate['capped']:.0%} ({len(rpl.end_prompts)} greedy answers).")
    plots(rep, res)
    ex = _example_rows(res)
    if ex:
        rep.table("Examples (greedy)", ex)
    _save_axis(rep, res)
    for k, v in m.items():
        rep.metric(k, v)
    return rep.finish()


def _headline_rows(res: Result) -> list[dict]:
    """One row per identity measure under role prompts (default, role, role + capping, gain) and the perplexity
    cost: the table the study is read by."""
    m, kw_rate, ppl = res.metrics, res.identity_keyword_rate, res.perplexity
    head = [{"measure": "identity log-odds (assistant - persona answer), role prompts", "default prompt":
             m["identity_logodds_default"], "role": m["identity_logodds_role"], "role + capping":
             m["identity_logodds_role_capped"], "gain": m["capping_identity_gain"]}]
    if kw_rate:
        head.append({"measure": "identity answers with assistant keywords", "default prompt": kw_rate["default"],
                     "role": kw_rate["role"], "role + capping": kw_rate["role+cap"],
                     "gain": m["capping_identity_keyword_gain"]})
    if res.answer_projections:
        for lab, key in ((f"axis projection of answers, layer {res.readout_layer}", "projection_readout"),
                         (f"axis projection of answers, layer {max(res.capped_layers)} (last capped)",
                          "projection_last_capped")):
            head.append({"measure": lab, "default prompt": m[key]["default"], "role": m[key]["role"],
                         "role + capping": m[key]["role+cap"], "gain": m[key]["role+cap"] - m[key]["role"]})
    if "behaviour_distance_to_default" in m:
        bd = m["behaviour_distance_to_default"]
        head.append({"measure": "trait behaviour (valid items only): mean |log-odds - default|",
                     "default prompt": 0.0,
                     "role": bd["role"], "role + capping": bd["role+cap"], "gain": bd["role"] - bd["role+cap"]})
    if ppl:
        head.append({"measure": "ShareGPT assistant-token perplexity", "default prompt": ppl["ppl"], "role": "",
                     "role + capping": ppl["ppl_capped"], "gain": f"{ppl['pct_change']:+.2f}% (cost)"})
    return head


def _example_rows(res: Result) -> list[dict]:
    """Greedy answers without and with capping (the first probe of each role and of each role-play conversation), so
    the numbers can be read against text."""
    answers, rpl = res.identity_answers, res.roleplay
    ex = []
    if answers.answers:
        step = max(1, len(answers.questions))
        for i in range(0, len(answers.role_prompts), step):
            ex.append({"role": res.eval_roles[i // step].name, "probe": answers.role_prompts[i][-1]["content"],
                       "no cap": _one_line(answers.answers["role"][i]),
                       "capped": _one_line(answers.answers["role+cap"][i])})
    step = max(1, len(res.config.roleplay_probes))
    for i in range(0, len(rpl.end_prompts), step):
        ex.append({"role": rpl.conversations[i // step].id + " (role-play, end)",
                   "probe": rpl.end_prompts[i][-1]["content"], "no cap": _one_line(rpl.end_answers_plain[i]),
                   "capped": _one_line(rpl.end_answers_capped[i])})
    return ex


def _one_line(answer: Rollout) -> str:
    """An example answer on one line, cut to 120 characters."""
    return answer.response.replace("\n", " ")[:120]


def _save_axis(rep, res: Result) -> None:
    """The axis with the capping settings and floors, so the cap can be re-applied without re-running the study."""
    cfg = res.config
    # (strings are kept out of the top level where they could look like JSON to load_vectors)
    rep.save_vectors("capping", {"axis": res.axis},
                     {"model": cfg.model, "site": SITE, "layers": list(res.capped_layers),
                      "method": "activation capping: floor on <h, axis/|axis|> per capped layer",
                      "capping": {"form": cfg.form, "positions": cfg.positions, "percentile": cfg.percentile,
                                  "floors": [float(x) for x in res.thresholds.floors],
                                  "axis_source": res.axis_info.get("source")}})


def _jailbreak_sections(rep, cfg, jb: Jailbreaks) -> None:
    """The jailbreak table (validity, shift, random band per measure), how to read it, and its figure."""
    summ = jb.summary
    rows = []
    for k in measures.JAILBREAK_MEASURES:
        r = summ[k]
        band = r.get("band")
        rows.append({"measure": k, "validity (default vs persona prompt)": measures.validity_text(r["validity"]),
                     "default prompt": r["default"], "persona prompt": r["persona"],
                     "persona + capping": r["persona_capped"], "capping shift [95% CI]": interval(r["shift"]),
                     f"random caps band ({jb.n_random})": f"[{band['low']:.3f}, {band['high']:.3f}]" if band else
                     "none", "outside band": r.get("outside_band", "")})
    rep.table(f"Persona jailbreaks ({len(jb.ids)} prompts): capping off vs on", rows)
    rep.section("How to read the jailbreak table", jailbreak_reading(cfg, jb))
    jailbreak_figure(rep, jb)


def _qa_section(rep, qa) -> None:
    """The chance-level check and the accuracy table without and with capping, with the paired change."""
    a0, a1, ch = qa["accuracy"], qa["accuracy_capped"], qa["change"]
    verdict = qa_verdict(qa)
    rep.section("Capability check against chance", qa_reading(qa))
    rep.table(f"Capability: held-out multiple-choice questions ({qa['n']} items, likelihood choice; {verdict})", [
        {"condition": "no capping", "accuracy [95% CI]": interval(a0, ".2f"), "chance": qa["chance"]},
        {"condition": "capping", "accuracy [95% CI]": interval(a1, ".2f"), "chance": qa["chance"]},
        {"condition": "change (paired)", "accuracy [95% CI]": interval(ch, "+.3f"),
         "chance": f"{qa['changed_answers']} answers changed"}])
