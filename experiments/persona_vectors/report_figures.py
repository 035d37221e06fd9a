"""The figures of the persona-vectors report: steering curves, layer sweeps, monitoring scatters, the specificity,
cosine and reliability plots, each saved into the report with its caption."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from experiments.persona_vectors.config import Config
from experiments.persona_vectors.summary import MONITOR_MIN_WITHIN_R
from experiments.persona_vectors.trait_result import SteeringCurve, TraitResult
from experiments.report import Report, pyplot
from experiments.report import fmt_num as _fmt
from psm_jax.persona import measures


def _line_figure(report: Report, fig, ax, name: str, caption: str, *, title: str, xlabel: str, ylabel: str,
                 legend_fontsize: int = 8) -> None:
    """Label a one-axes line plot, add its legend and save it into the report."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=legend_fontsize)
    ax.set_title(title)
    report.figure(name, fig, caption)


def steering_figure(report: Report, results: Sequence[TraitResult], key: str, name: str, caption: str, *, title: str,
                    ylabel: str) -> None:
    """Measure vs coefficient per trait at its chosen layer (results[i][key]), the random directions' mean dotted
    (absent where the measure failed its validity check), a failing measure's curve dashed."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for r in results:
        st: SteeringCurve = r[key]
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


def specificity_figure(report: Report, sp: dict) -> None:
    """The specificity matrix (as metrics.json holds it) as a heat map of z-scores, failing measures' columns
    marked."""
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


def reliability_figure(report: Report, rel: dict) -> None:
    """Each vector's predicted rerun cosine per layer (`reliability_metrics`), its steering layer marked."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for name, x in rel.items():
        ax.plot(x["predicted_by_layer"], marker=".", label=name)
        ax.plot([x["layer"]], [x["predicted"]], marker="o", color=ax.lines[-1].get_color())
    ax.axhline(0, color="gray", lw=0.5)
    _line_figure(report, fig, ax, "vector_reliability", "Predicted rerun cosine of each response-average vector per "
                 "layer (split halves of the extraction questions, stepped up); the dot marks the steering layer.",
                 title="Vector reliability per layer", xlabel="layer (resid_post)", ylabel="predicted rerun cosine")


def write_layer_figures(report: Report, cfg: Config, results: list[TraitResult]) -> None:
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


def _monitor_panels(r: TraitResult) -> list[tuple[str, dict]]:
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


def write_monitoring_figure(report: Report, results: list[TraitResult]) -> None:
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


def cosine_figure(report: Report, common: int, names: list[str], cos) -> None:
    """The cosine matrix across traits (`cosine_matrix`) as a heat map."""
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
