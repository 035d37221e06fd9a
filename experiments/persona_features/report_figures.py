"""The persona-features report's figure: every latent's Cohen's d on the discovery half against the validation half,
per contrast, so that a reader sees whether the candidates replicate or regress to 0 (selection noise)."""
from __future__ import annotations

import numpy as np

from experiments.report import Report, fmt_num, pyplot


def plots(report: Report, results, role_res):
    plt = pyplot()
    items = list(results.items()) + [("role vs default", role_res)]
    fig, axes = plt.subplots(1, len(items), figsize=(4.2 * len(items), 3.8), squeeze=False)
    for ax, (name, res) in zip(axes[0], items):
        dd, dv = res["d_discovery"], res["d_validation"]
        live = np.isfinite(dd) & np.isfinite(dv) & ((dd != 0) | (dv != 0))
        ax.scatter(np.clip(dd[live], -4, 4), np.clip(dv[live], -4, 4), s=4, alpha=0.3, color="grey")
        c = [x["latent"] for x in res["candidates"]]
        ax.scatter(np.clip(dd[c], -4, 4), np.clip(dv[c], -4, 4), s=18, color="tab:red", label="top candidates")
        ax.axhline(0, color="k", lw=0.5)
        ax.axvline(0, color="k", lw=0.5)
        ax.set_title(f"{name}: r(halves)={fmt_num(res['halves_correlation'], '.2f')}")
        ax.set_xlabel("Cohen's d, discovery half")
        ax.set_ylabel("Cohen's d, validation half")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    report.figure("contrast_halves", fig, "Per-latent Cohen's d (clipped to [-4, 4]) on the discovery questions vs "
                  "the held-out validation questions; red: the top candidates by discovery d. A real effect replicates "
                  "(large on both axes); selection noise regresses to 0 on the validation axis.")
