"""The report folder: the merged model that the refusal study loads by path, report.md, the figure and
metrics.json."""
from __future__ import annotations

import json
from pathlib import Path

from experiments.refusal_organism import report_text as T
from experiments.refusal_organism.evaluation import refuses
from experiments.refusal_organism.pipeline import Result
from experiments.refusal_organism.report_figures import loss_figure


def write_report(res: Result, folder) -> Path:
    """The report folder: report.md, the loss figure, metrics.json and the merged model as an HF folder (`model/`)."""
    from experiments.report import Report, pyplot
    from psm_jax.export import save_hf

    cfg = res.config
    rep = Report(folder, "Refusal model organism (LoRA-tuned refusal)", cfg)
    save_hf(res.params, res.model_config, Path(folder) / "model", tokenizer=res.tokenizer, overwrite=True)
    rep.section("Setup", T.setup_text(res))
    rep.table("Refusal rates on unseen requests", T.rate_rows(res))
    rep.section("Does the organism refuse?", T.reading_text(res))
    rep.section("Cost on held-out chats", T.ce_text(res))
    rep.section("Example answers (greedy)", T.examples_text(res))
    rep.figure("training_loss", loss_figure(pyplot(), res), "Training loss per step.")
    rep.section("Using the organism", f"`psm refusal model={Path(folder) / 'model'}` runs the refusal study on it.")
    rep.metric("rates", {k: {"n": r["n"], **{w: {"rate": r[w]["rate"], "ci": r[w]["ci"]} for w in ("before", "after")}}
                         for k, r in res.rates.items()})
    rep.metric("refuses", refuses(res.rates))
    rep.metric("ce", res.ce)
    rep.metric("training", {k: v for k, v in res.training.items()})
    rep.section("Timing", json.dumps({k: round(v, 1) for k, v in res.seconds.items()}))
    return rep.finish()
