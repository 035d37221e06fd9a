"""The feature-steering report folder: report.md (the setup, the headline against the random band, every edit per
trait, the two-choice items, example answers and the band plot), metrics.json and config.json. All of it is read
from a finished `Result` (`pipeline.run`), so that the computation never writes and the writing never computes."""
from __future__ import annotations

from pathlib import Path

from experiments.feature_steering.pipeline import Result
from experiments.feature_steering.report_figures import band_plot
from experiments.feature_steering.report_text import (TWO_CHOICE_NOT_RUN, answers_text, clamp_row, edit_row,
                                                      edits_heading, headline_row, setup_text, two_choice_failed_text,
                                                      two_choice_heading, two_choice_rows)
from experiments.feature_steering.trait_result import TraitSteering, TwoChoice, is_evidence
from experiments.report import Report


def write_report(result: Result, folder) -> Path:
    """Write report.md, metrics.json, config.json and the band plot into `folder`."""
    cfg = result.config
    rep = Report(folder, "Feature steering with persona latents", cfg)
    rep.section("Setup", setup_text(result))
    rep.table("Headline: the best latent's effect on the judge-free score vs the random band (z)",
              [headline_row(name, r) for name, r in result.trait_results.items()])
    for name, r in result.trait_results.items():
        _write_trait(rep, name, r, cfg)
    band_plot(rep, result)
    rep.metric("traits", {name: trait_metrics(r) for name, r in result.trait_results.items()})
    rep.metric("layer", result.sae_layer)
    rep.metric("typical_norm", result.typical_residual_norm)
    rep.metric("seconds", result.run_seconds)
    return rep.finish()


def trait_metrics(r: TraitSteering) -> dict:
    """A trait's entry of metrics.json: its result without the answers (they are in the report), with the evidence
    gate, the edits last."""
    out = {k: v for k, v in r.items() if k not in ("edits", "unsteered_answers")}
    out["evidence"] = is_evidence(r)
    out["edits"] = {k: {kk: vv for kk, vv in e.items() if kk != "answers"} for k, e in r["edits"].items()}
    return out


def _write_trait(rep: Report, name: str, r: TraitSteering, cfg) -> None:
    """A trait's sections: every edit and clamp, the two-choice items, the first question's answers."""
    rows = [edit_row(k, e, r, cfg.max_ppl_ratio) for k, e in r["edits"].items()]
    rows += [clamp_row(r["best"], c, cfg.max_ppl_ratio) for c in r["clamp"]]
    rep.table(edits_heading(name, r, cfg.strengths), rows)
    _write_two_choice(rep, name, r["two_choice"])
    rep.section(f"{name}: answers to \"{r['questions'][0]}\"", answers_text(r))


def _write_two_choice(rep: Report, name: str, tc: TwoChoice | None) -> None:
    """The two-choice items: their validity check and, where it passes, each edit's change and the best latent's z;
    or that they did not run (`two_choice=False`)."""
    if tc is None:
        rep.section(f"{name}: two-choice items", TWO_CHOICE_NOT_RUN)
    elif tc["edits"]:
        rep.table(two_choice_heading(name, tc), two_choice_rows(tc))
    else:
        rep.section(f"{name}: two-choice items", two_choice_failed_text(tc))
