"""The figures of the capping report: the jailbreak shifts against the random caps' band, the identity answers'
axis projection by layer, and the role-play log-odds and drift, each saved into the report with its caption."""
from __future__ import annotations

import numpy as np

from experiments.capping.jailbreak import Jailbreaks
from experiments.capping.pipeline import Result
from experiments.capping.roleplay import RolePlay
from experiments.report import pyplot
from psm_jax.persona import measures


def jailbreak_figure(rep, jb: Jailbreaks) -> None:
    plt = pyplot()
    fig, axs = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, k in zip(axs, measures.JAILBREAK_MEASURES):
        r = jb.summary[k]
        if "random_shifts" in r:
            ax.axhspan(r["band"]["low"], r["band"]["high"], color="0.85", label="random caps, 95% band")
            ax.plot(np.zeros(len(r["random_shifts"])) + 0.3, r["random_shifts"], "k.", ms=3, alpha=0.6)
        sh = r["shift"]
        ax.errorbar([0], [sh["estimate"]], yerr=[[sh["estimate"] - sh["low"]], [sh["high"] - sh["estimate"]]],
                    fmt="o", color="C3", capsize=4, label="axis cap (95% CI over prompts)")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks([0, 0.3], ["axis cap", "random"])
        ax.set_xlim(-0.5, 0.8)
        ax.set_title(f"{k}: capped - uncapped")
        ax.set_ylabel("nats per token")
        ax.legend(fontsize=7)
    rep.figure("jailbreak_shift", fig, "Shift of each jailbreak measure under capping (persona prompts), against caps "
               "along random directions at matched thresholds.")


def _projection_figure(rep, plt, res: Result) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for k, v in res.answer_projections.items():
        ax.plot(np.arange(v.shape[1]), v.mean(0), "o-", ms=2.5, label=k)
    layers = res.capped_layers
    ax.axvspan(min(layers) - 0.5, max(layers) + 0.5, color="C3", alpha=0.08, label="capped layers")
    ax.plot(list(layers), res.metrics["thresholds_floor"], "k_", ms=10, label="floor")
    ax.set_xlabel("layer (resid_post)")
    ax.set_ylabel("mean projection on unit axis")
    ax.set_title("Identity answers under role prompts: axis projection by layer")
    ax.legend(fontsize=7)
    rep.figure("projection_by_layer", fig,
               "Mean assistant-token projection of the greedy answers on the unit axis.")


def _roleplay_figure(rep, plt, readout: int, rpl: RolePlay) -> None:
    rp_rows, d_plain, d_cap = rpl.rows, rpl.drift_plain, rpl.drift_capped
    fig, axs = plt.subplots(1, 2, figsize=(10, 3.6))
    k = [r["exchanges before probe"] for r in rp_rows]
    axs[0].plot(k, [r["log-odds (no cap)"] for r in rp_rows], "o-", label="no capping")
    axs[0].plot(k, [r["log-odds (capped)"] for r in rp_rows], "o-", label="capping")
    axs[0].set_xlabel("scripted role-play exchanges before the identity probe")
    axs[0].set_ylabel("log P(assistant) - log P(persona)")
    axs[0].legend(fontsize=8)
    axs[0].set_title("Identity log-odds in role-play")
    x = np.arange(1, d_plain.shape[2] + 1)
    axs[1].plot(x, np.nanmean(d_plain[:, 0], 0), "o-", label="no capping")
    axs[1].plot(x, np.nanmean(d_cap[:, 0], 0), "o-", label="capping")
    axs[1].set_xlabel("assistant turn (scripted)")
    axs[1].set_ylabel(f"projection on unit axis, layer {readout}")
    axs[1].legend(fontsize=8)
    axs[1].set_title("Role-play replies on the axis")
    rep.figure("roleplay", fig, "Long role-play conversations with and without capping.")


def plots(rep, res: Result) -> None:
    """The projection-by-layer figure (with generated identity answers) and the role-play figure (with role-play)."""
    plt = pyplot()
    if res.answer_projections:
        _projection_figure(rep, plt, res)
    if res.roleplay.rows:
        _roleplay_figure(rep, plt, res.readout_layer, res.roleplay)
