"""The refusal report folder: report.md with its sections, tables and figures, the selected and the candidate
directions as safetensors, and metrics.json with every number shown, all read from a finished `Result`
(`pipeline.run`), so that the computation never writes and the writing never computes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from experiments.refusal.pipeline import Result
from experiments.refusal.report_figures import damage_figure, logodds_figure, norms_figure, selection_figure
from experiments.refusal.report_text import (ablation_text, baseline_text, candidate_name, examples_text, mean,
                                             selection_damage_text, setup_text, validity_text)


def _heldout_rows(res: Result) -> list[dict]:
    """One table row per held-out condition: mean refusal log-odds and both refusal rates."""
    labels = {"harmful_base": ("harmful held-out", "baseline"), "harmful_ablated": ("harmful held-out", "ablated"),
              "harmless_base": ("harmless held-out", "baseline"),
              "harmless_induced": ("harmless held-out", f"+1x direction at L{res.selected['layer']}")}
    return [dict(prompts=prompts, condition=condition, refusal_logodds=mean(res.heldout_logodds[k]),
                 refusal_rate=res.heldout_answers[k].substring_rate, prefix_rate=res.heldout_answers[k].prefix_rate)
            for k, (prompts, condition) in labels.items()]


def _selection_tables(rep, res: Result) -> None:
    """The selected direction, and the best candidates with the rule that dropped each one."""
    best = res.selected
    rep.table("Selected direction", [dict(position=candidate_name(best), layer=best["layer"], bypass=best["bypass"],
                                          induce=best["induce"], kl=best["kl"], norm=best["norm"],
                                          tier=res.selection_tier)])
    if res.selection_nulls is None:
        rep.table("Candidates, lowest bypass first (top 15)",
                  [dict(candidate=candidate_name(r), bypass=r["bypass"], induce=r["induce"], kl=r["kl"],
                        kept=r["kept"], dropped_for=r["reason"])
                   for r in sorted(res.candidate_scores, key=lambda r: r["bypass"])[:15]])
        return
    rep.section("Selection against damage", selection_damage_text(res))
    ranked = sorted(res.candidate_scores, key=lambda r: -r["matched_z"] if np.isfinite(r["matched_z"]) else np.inf)
    rep.table("Candidates, largest matched-damage z first (top 15)",
              [dict(candidate=candidate_name(r), drop=r["drop"], kl=r["kl"], induce=r["induce"],
                    n_matched=r["n_matched"], z=r["matched_z"], p=r["matched_p"], kept=r["kept"],
                    dropped_for=r["reason"]) for r in ranked[:15]])


def _figures(rep, plt, res: Result) -> None:
    rep.figure("selection_scores", selection_figure(plt, res),
               "Selection scores per (position, layer); blank = not evaluated; red star = selected; dashed line = "
               "layer cut.")
    rep.figure("heldout_logodds", logodds_figure(plt, res.heldout_logodds),
               "Held-out refusal log-odds before/after ablation and with the direction added.")
    rep.figure("direction_norms", norms_figure(plt, res), "Norm of the difference in means per layer and position.")
    if res.nulls:
        rep.figure("ablation_damage", damage_figure(plt, res),
                   "Refusal log-odds drop on the held-out harmful prompts against the KL the same ablation costs on "
                   "the held-out harmless prompts: the selected direction and each null direction.")


def _vectors(rep, res: Result) -> None:
    """The selected direction (raw and unit) and every candidate's difference in means, with what they are."""
    cfg, best = res.config, res.selected
    rep.save_vectors("refusal_direction", {"direction": res.direction, "unit": res.unit_direction},
                     dict(model=cfg.model, layer=best["layer"], site="resid_pre", method="diff-in-means",
                          position_offset=best["offset"], position_token=best["token"], d_model=res.d_model))
    rep.save_vectors("candidate_directions", {"mean_diff": res.mean_diffs},
                     dict(model=cfg.model, site="resid_pre", method="diff-in-means", layers="all",
                          position_offsets=res.position_offsets.tolist(), position_tokens=res.position_tokens,
                          shape="position x layer x d_model"))


def _metrics(res: Result) -> dict:
    """metrics.json, in file order: the headline numbers first, then the selection, the evaluation, timings."""
    answers, ce = res.heldout_answers, res.chat_ce
    return {"refusal_logodds_drop": res.logodds_drop, "refusal_ce_change": ce.get("ce_pct_change"), "ce": ce,
            "score_validity": res.validity,
            "ablation_kl": dict(mean=mean(res.ablation_kl), values=res.ablation_kl),
            "nulls": {name: {k: [float(x) for x in v] for k, v in null.items()} for name, null in res.nulls.items()},
            "selected": dict(res.selected, tier=res.selection_tier),
            "val_baseline_logodds": dict(harmful=res.harmful_val_logodds, harmless=res.harmless_val_logodds),
            "candidates": res.candidate_scores, "filtering": res.filtering,
            "heldout_logodds": {k: dict(mean=mean(v), values=v) for k, v in res.heldout_logodds.items()},
            "heldout_refusal_rate": {k: dict(substring=v.substring_rate, prefix=v.prefix_rate)
                                     for k, v in answers.items()},
            "answers": {k: v.answers for k, v in answers.items()},
            "orthogonalized_max_abs_logit_diff": res.orthogonalized_max_logit_diff,
            "orthogonalized_logodds_mean": mean(res.orthogonalized_logodds),
            "refusal_token_ids": res.score_token_ids, "seconds": res.seconds,
            **({} if res.selection_nulls is None else {"selection_nulls": {
                k: [float(x) for x in v] for k, v in res.selection_nulls.items()}})}


def write_report(res: Result, folder) -> Path:
    """The report folder of a finished run: setup, baseline refusal and the score's validity, the selection, the
    held-out evaluation, the ablation's effect and cost, example answers, figures, directions and metrics."""
    from experiments.report import Report, pyplot

    plt = pyplot()
    answers = res.heldout_answers
    rep = Report(folder, "Refusal direction (difference in means, directional ablation)", res.config)
    rep.section("Setup", setup_text(res))
    rep.section("Baseline refusal", baseline_text(answers["harmful_base"].substring_rate,
                                                  answers["harmless_induced"].substring_rate)
                + "\n\n" + validity_text(res))
    _selection_tables(rep, res)
    rep.table(f"Held-out evaluation ({res.config.n_eval} prompts per side)", _heldout_rows(res))
    rep.section("Ablation effect", ablation_text(res))
    rep.section("Example answers (greedy)", examples_text(res))
    _figures(rep, plt, res)
    _vectors(rep, res)
    for name, value in _metrics(res).items():
        rep.metric(name, value)
    rep.section("Timing", json.dumps({k: round(v, 1) for k, v in res.seconds.items()}))
    return rep.finish()
