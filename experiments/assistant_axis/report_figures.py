"""The Assistant Axis report's figures: persona space's variance, the axis-PC1 cosine by layer, the roles' PC1
loadings and the multi-turn drift, each drawn from a finished `AxisResult`."""
from __future__ import annotations

import numpy as np

from experiments.assistant_axis.result import AxisResult, drift_ref


def plots(rep, res: AxisResult, drift: dict, n_layers: int):
    """The report's figures: persona space's variance, the axis-PC1 cosine by layer, role loadings, drift."""
    from experiments.report import pyplot

    plt = pyplot()
    _variance_figure(rep, plt, res)
    _pc1_cosine_figure(rep, plt, res, n_layers)
    _loadings_figure(rep, plt, res)
    if drift:
        _drift_figure(rep, plt, res, drift)


def _variance_figure(rep, plt, res: AxisResult) -> None:
    sp = res.space
    ratio = np.asarray(sp["explained_ratio"])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    k = np.arange(1, len(ratio) + 1)
    ax.bar(k, ratio, color="#9bb", label="per PC")
    ax.plot(k, np.cumsum(ratio), "o-", ms=3, color="#155", label="cumulative")
    ax.axhline(res.config.variance_fraction, ls="--", color="gray", lw=1)
    ax.axvline(sp["n_pcs"], ls=":", color="C3", lw=1,
               label=f"{sp['n_pcs']} PCs reach {res.config.variance_fraction:.0%}")
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance ratio")
    ax.set_title(f"Persona space, layer {res.target_layer} ({len(res.role_names)} roles)")
    ax.legend(fontsize=8)
    rep.figure("variance_explained", fig, "Variance explained by the PCs of the mean-centred role vectors.")


def _pc1_cosine_figure(rep, plt, res: AxisResult, n_layers: int) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(np.arange(n_layers), res.cosines, "o-", ms=3)
    ax.axvline(res.target_layer, ls=":", color="gray")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("layer (resid_post)")
    ax.set_ylabel("|cos(axis, PC1)|")
    ax.set_title("Assistant Axis vs PC1 of persona space")
    rep.figure("axis_pc1_cosine", fig, "Cosine between the Assistant Axis and PC1 at every layer.")


def _loadings_figure(rep, plt, res: AxisResult) -> None:
    """Every role's PC1 score as a bar coloured by its category, with the default Assistant's projection."""
    sp = res.space
    scores = np.asarray(sp["scores"])
    order = np.argsort(scores)
    cats = sorted(set(res.role_categories))
    colours = {c: plt.cm.tab10(i % 10) for i, c in enumerate(cats)}
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.16 * len(order) + 1)))
    ax.barh(np.arange(len(order)), scores[order], color=[colours[res.role_categories[i]] for i in order])
    ax.set_yticks(np.arange(len(order)))
    ax.set_yticklabels([res.role_names[i] for i in order], fontsize=6)
    ax.axvline(sp["default_score"], color="k", ls="--", lw=1.2, label="default Assistant")
    if "assistant_role_score" in sp:
        ax.axvline(sp["assistant_role_score"], color="C3", ls=":", lw=1.2, label="'assistant' role")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[c]) for c in cats]
    ax.legend(handles + ax.get_legend_handles_labels()[0], cats + ax.get_legend_handles_labels()[1], fontsize=6,
              loc="lower right")
    ax.set_xlabel("PC1 score (oriented toward the default Assistant)")
    ax.set_title(f"PC1 loadings, layer {res.target_layer}")
    rep.figure("pc1_loadings", fig, "Role scores on PC1; dashed line: the default Assistant's projection.")


def _drift_figure(rep, plt, res: AxisResult, drift: dict) -> None:
    """Per assistant turn, each drift condition's mean projection on the unit axis with its s.e.m. band."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, (proj, _) in drift.items():
        p = proj[:, 0, :]
        mean = np.nanmean(p, axis=0)
        cnt = np.sum(~np.isnan(p), axis=0)
        sem = np.nanstd(p, axis=0) / np.sqrt(np.maximum(cnt, 1))
        x = np.arange(1, p.shape[1] + 1)
        ax.plot(x, mean, "o-", ms=3, label=f"{name} (n={p.shape[0]})")
        ax.fill_between(x, mean - sem, mean + sem, alpha=0.2)
    ax.axhline(drift_ref(res)["default"], color="k", ls="--", lw=1, label="default vector")
    ax.axhline(drift_ref(res)["roles"], color="gray", ls=":", lw=1, label="mean role vector")
    ax.set_xlabel("assistant turn")
    ax.set_ylabel(f"projection on unit axis (layer {res.target_layer})")
    ax.set_title("Multi-turn drift (teacher-forced)")
    ax.legend(fontsize=7)
    rep.figure("drift", fig, "Per-turn mean assistant-token projection on the unit Assistant Axis (mean ± s.e.m.).")

