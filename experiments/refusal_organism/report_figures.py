"""The report's figure: the fine-tune's loss curve."""
from __future__ import annotations

from experiments.refusal_organism.pipeline import Result


def loss_figure(plt, res: Result):
    """The training loss per step."""
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(1, len(res.training["loss"]) + 1), res.training["loss"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats per target token)")
    return fig
