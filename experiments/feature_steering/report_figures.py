"""The feature-steering report's figure: per trait, each edit's effect against the histogram of the random
directions' effects at the same norm, so that a reader sees at a glance whether a latent moves the score more than
a random push of the same size."""
from __future__ import annotations

import numpy as np

from experiments.feature_steering.pipeline import Result
from experiments.report import Report, pyplot


def band_plot(report: Report, result: Result) -> None:
    plt = pyplot()
    names = list(result.trait_results)
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        r = result.trait_results[name]
        s = r["edits"][r["best"]]["strength"]
        null = np.asarray(r["random_effects"], np.float64)
        ax.hist(null[np.isfinite(null)], bins=12, color="lightgrey", label=f"random (s={s:g})")
        for k, (label, e) in enumerate(r["edits"].items()):
            ax.axvline(e["effect"]["estimate"], color=f"C{k}", lw=1.5, label=label)
        ax.set_title(f"{name}: measure {'valid' if r['validity']['valid'] else 'NOT valid'}", fontsize=9)
        ax.set_xlabel("change of the judge-free score")
        ax.legend(fontsize=7)
    fig.tight_layout()
    report.figure("steering_band", fig, "The effect of each edit (vertical lines) against the random directions at "
                  "the same norm (histogram).")
