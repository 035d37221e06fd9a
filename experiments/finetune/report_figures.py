"""The figures of the fine-tuning report: the shift-behaviour and screening scatters, each trait's shift bars with
the random band, the training losses and the narrow-vs-general spread, each saved into the report with its caption."""
from __future__ import annotations

import numpy as np

from experiments.finetune.summary import row_summary
from experiments.finetune.trait_result import Narrow, TraitResult
from experiments.report import Report, pyplot


def scatter(rep: Report, results: list[TraitResult], key_x: str, key_y: str, name: str, caption: str, xlabel: str,
            ylabel: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for r in results:
        rows = [row_summary(row) for row in r["rows"] if row["variant"].kind in ("mix", "control")]
        pick = {"shift": lambda s: s["shift"]["estimate"], "score": lambda s: s["score_change"]["estimate"],
                "screening": lambda s: s["screening"]}
        ax.scatter([pick[key_x](s) for s in rows], [pick[key_y](s) for s in rows], label=r["trait"])
        for s in rows:
            ax.annotate(s["name"].replace("mix ", ""), (pick[key_x](s), pick[key_y](s)), fontsize=7)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.legend(fontsize=8)
    rep.figure(name, fig, caption)


def shift_bars(rep: Report, r: TraitResult) -> None:
    plt = pyplot()
    rows = [row_summary(row) for row in r["rows"]]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows)), 3.5))
    est = [s["shift"]["estimate"] for s in rows]
    err = [[e - s["shift"]["low"] for e, s in zip(est, rows)], [s["shift"]["high"] - e for e, s in zip(est, rows)]]
    ax.bar(range(len(rows)), est, yerr=err, capsize=3)
    band = rows[0]["shift_null"]
    ax.axhspan(band["low"], band["high"], color="grey", alpha=0.3, label=f"{band['n']} random directions (95%)")
    ax.set_xticks(range(len(rows)), [s["name"] for s in rows], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="last-prompt projection shift", title=f"{r['trait']}: shift per fine-tune (95% CI over questions)")
    ax.legend(fontsize=8)
    rep.figure(f"shift_{r['trait']}", fig, f"{r['trait']}: projection shift on the unit persona vector per fine-tune; "
                                           "the grey band is the null of random directions of matched norm (the band "
                                           "of the first fine-tune).")


def loss_plot(rep: Report, results: list[TraitResult]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in results:
        for row in r["rows"]:
            ax.plot(range(1, len(row["training"]["loss"]) + 1), row["training"]["loss"],
                    label=f"{r['trait']}: {row['variant'].name}", lw=1)
    ax.set(xlabel="step", ylabel="training loss (assistant-token NLL)")
    ax.legend(fontsize=6)
    rep.figure("training_loss", fig, "Training loss per fine-tune.")


def spread_plot(rep: Report, nv: Narrow) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    w = [r["kl_weight"] for r in nv["per_kl"]]
    for key, label, off in (("in_domain", "in domain", -0.15), ("out_of_domain", "out of domain", 0.15)):
        est = [r[key]["estimate"] for r in nv["per_kl"]]
        err = [[e - r[key]["low"] for e, r in zip(est, nv["per_kl"])],
               [r[key]["high"] - e for e, r in zip(est, nv["per_kl"])]]
        ax.errorbar(np.arange(len(w)) + off, est, yerr=err, fmt="o", capsize=3, label=label)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(range(len(w)), [f"KL {x:g}" for x in w])
    ax.set(ylabel=f"{nv['trait']} score change beyond control")
    ax.legend(fontsize=8)
    rep.figure("narrow_vs_general", fig, f"{nv['trait']} score change of the narrow fine-tune beyond the control, in "
                                         "and out of domain, per KL weight (95% CI over questions).")
