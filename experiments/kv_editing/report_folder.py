"""The KV-editing report folder: report.md with its sections, tables and figure, and metrics.json with every number
shown, read from a finished `Result` (`pipeline.run` computes the rows, `psm_jax.persona.kv_identity` their
statistics; the report modules only write)."""
from __future__ import annotations

from pathlib import Path

from experiments.kv_editing.pipeline import Result
from experiments.kv_editing.report_text import (histories_text, samples_text, setup_text, target_text,
                                                validity_text)
from psm_jax.persona.kv_identity import condition_means, control_shifts, identity_shifts, identity_validity


def _effects_figure(plt, agg: list[dict]):
    """Identity log-odds and answer projection against strength: one line per mode, kind and layer range, each
    starting from the unedited cache at strength 0."""
    base = next(a for a in agg if a["mode"] == "none")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, ls in (("recompute", "-"), ("direct", "--")):
        for kind, lr in sorted({(a["kind"], a["layers"]) for a in agg if a["mode"] == mode}):
            pts = sorted([(0.0, base)] + [(a["strength"], a) for a in agg if a["mode"] == mode and a["kind"] == kind
                                          and a["layers"] == lr], key=lambda p: p[0])
            for ax, k in zip(axes, ("identity_logodds", "answer_projection")):
                ax.plot([p[0] for p in pts], [p[1][k] for p in pts], ls, marker="o", label=f"{mode} {kind} L{lr}")
    for ax, k in zip(axes, ("identity log-odds per token (assistant vs persona)", "answer projection on axis")):
        ax.set_xlabel("edit strength")
        ax.set_title(k)
        ax.axvline(0, color="grey", lw=0.5)
    axes[0].legend(fontsize=7)
    return fig


def _by_history(rows: list[dict], seed: int, histories: list[str]) -> list[dict]:
    """The axis edits' and the controls' shifts per history kind, one table row each (condition: mode or control)."""
    return [dict(history=h, condition=v.get("control", v.get("mode")),
                 **{k: x for k, x in v.items() if k not in ("mode", "control")}) for h in histories
            for v in list(identity_shifts(rows, seed, h).values()) + list(control_shifts(rows, seed, h).values())]


def write_report(result: Result, folder) -> Path:
    """The report folder of a finished run: setup, effects table and figure, the validity check, the shifts against
    their targets and controls, samples and histories; metrics.json holds every number shown."""
    from experiments.report import Report, pyplot

    plt = pyplot()
    cfg, rows = result.config, result.rows
    histories = sorted({r["history"] for r in rows})
    rep = Report(folder, "KV-cache editing of a persisted persona", cfg)
    rep.section("Setup", setup_text(result, histories))
    agg = condition_means(rows)
    rep.table("Effect of cache edits (mean over rows; n = conversation x probe units)", agg)
    rep.figure("kv_edit_effects", _effects_figure(plt, agg),
               "Identity log-odds and answer projection vs edit strength.")
    shifts, controls = identity_shifts(rows, cfg.seed), control_shifts(rows, cfg.seed)
    validity = identity_validity(rows, result.reference, cfg.seed)
    rep.section("Validity of the identity measure", validity_text(validity))
    rep.table("Identity log-odds shift at the largest strength (95% bootstrap interval over units)",
              list(shifts.values()))
    if controls:
        rep.table("Control edits at the largest strength (identity log-odds shift, 95% interval over units; expected "
                  "to contain 0)", list(controls.values()))
    rep.section("Targets", target_text(shifts, controls))
    if len(histories) > 1:
        rep.table("By history kind (largest strength; 95% interval over units)", _by_history(rows, cfg.seed, histories))
    rep.table("Control: capping on assistant tokens only (projection shift at the readout layer)", result.control)
    rep.section("Sample answers (first probe)", samples_text(result.samples))
    if result.histories:
        rep.section("Generated histories (the model's own in-character turns, first 160 characters each)",
                    histories_text(result.histories))
    if result.reference_histories:
        rep.section("The Assistant's own replies (the validity reference, first 160 characters each)",
                    histories_text(result.reference_histories))
    for name, value in (("kv_edit_identity_shift", shifts), ("kv_edit_control_shift", controls),
                        ("identity_validity", validity), ("rows", rows), ("reference", result.reference),
                        ("control", result.control), ("generated_histories", result.histories),
                        ("reference_histories", result.reference_histories), ("seconds", result.seconds)):
        rep.metric(name, value)
    return rep.finish()
