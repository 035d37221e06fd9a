"""The figures of the refusal report: the selection scores per candidate, the held-out log-odds per condition, the
difference in means' norms, and the ablation's drop against its damage beside the nulls'. Each returns the figure;
`report_folder` saves it with its caption."""
from __future__ import annotations

import numpy as np

from experiments.refusal.pipeline import Result
from experiments.refusal.report_text import NULL_NAMES, mean


def selection_figure(plt, res: Result):
    """Bypass, induce and KL per (position, layer) with the winner starred and the layer cut dashed: where the
    selection rules found the direction."""
    offsets, tokens, L, selected = res.position_offsets, res.position_tokens, res.n_layers, res.selected
    titles = {"bypass": " (harmful val, ablated)", "induce": " (harmless val, +direction)",
              "kl": " (harmless val, ablated vs base, last position)"}
    P = len(offsets)
    grids = {k: np.full((P, L), np.nan) for k in titles}
    for r in res.candidate_scores:
        for k in grids:
            grids[k][r["position"], r["layer"]] = r[k]
    fig, axes = plt.subplots(3, 1, figsize=(10, 7.5), sharex=True)
    for ax, k in zip(axes, grids):
        im = ax.imshow(grids[k], aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(P), [f"{o} {n!r}" for o, n in zip(offsets.tolist(), tokens)], fontsize=7)
        ax.set_title(k + titles[k], fontsize=9)
        fig.colorbar(im, ax=ax)
        ax.plot([selected["layer"]], [selected["position"]], "r*", ms=12)
        ax.axvline(res.config.max_layer_frac * L - 0.5, color="w", lw=1, ls="--")
    axes[-1].set_xlabel("layer (resid_pre)")
    return fig


def logodds_figure(plt, logodds: dict[str, np.ndarray]):
    """Histograms of the held-out refusal log-odds per condition: the ablation's effect prompt by prompt."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = np.linspace(min(min(v.min() for v in logodds.values()), -8),
                       max(max(v.max() for v in logodds.values()), 2), 40)
    for k, v in logodds.items():
        ax.hist(v, bins=bins, alpha=0.5, label=f"{k} (mean {v.mean():.2f})")
    ax.set_xlabel("refusal log-odds (last prompt position)")
    ax.legend(fontsize=7)
    return fig


def norms_figure(plt, res: Result):
    """The norm of the difference in means per layer, one line per candidate position."""
    fig, ax = plt.subplots(figsize=(7, 3))
    for p in sorted({r["position"] for r in res.candidate_scores}):
        rs = sorted([r for r in res.candidate_scores if r["position"] == p], key=lambda r: r["layer"])
        ax.plot([r["layer"] for r in rs], [r["norm"] for r in rs], marker=".",
                label=f"{res.position_offsets[p]} {res.position_tokens[p]!r}")
    ax.set_xlabel("layer")
    ax.set_ylabel("|mean diff|")
    ax.legend(fontsize=7)
    return fig


def damage_figure(plt, res: Result):
    """Drop against KL (log scale) for the selected direction and every null direction."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, null), colour in zip(res.nulls.items(), ("grey", "tab:blue")):
        ax.scatter(np.maximum(null["kls"], 1e-6), null["drops"], s=18, color=colour, label=NULL_NAMES[name])
    ax.scatter([max(mean(res.ablation_kl), 1e-6)], [res.logodds_drop], marker="*", s=160, color="red",
               label="selected")
    if res.selection_nulls is None:
        ax.axvline(res.config.kl_threshold, ls="--", color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("KL on held-out harmless prompts (nats)")
    ax.set_ylabel("refusal log-odds drop on held-out harmful prompts")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
