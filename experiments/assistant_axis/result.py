"""What a run hands to the report (`AxisResult`), and the two reference points a drift curve is read between
(`drift_ref`). A module of its own because the metrics, which the pipeline imports, read a result as well as the
report does."""
from __future__ import annotations

import dataclasses

import numpy as np

from experiments.assistant_axis.config import Config
from psm_jax.persona.directions import unit


@dataclasses.dataclass
class AxisResult:
    config: Config
    role_names: list[str]
    role_categories: list[str]
    role_vectors: np.ndarray  # [R, L, D]
    default_vector: np.ndarray  # [L, D]
    axis: np.ndarray  # [L, D]
    target_layer: int
    space: dict
    cosines: np.ndarray  # [L]
    metrics: dict
    d_model: int = 0
    n_questions: int = 0  # extraction questions per role instruction (the default prompts get the same)
    n_default_prompts: int = 0
    assistant_vector: np.ndarray | None = None  # the held-out "assistant" role's vector [L, D]
    drift: dict = dataclasses.field(default_factory=dict)  # conversation set -> (projections, token counts)
    drift_rows: list = dataclasses.field(default_factory=list)
    examples: list = dataclasses.field(default_factory=list)


def drift_ref(res: AxisResult) -> dict:
    """The default Assistant's and the mean role's projections on the unit axis at the target layer: the two ends a
    drift curve is read between."""
    u = unit(res.axis[res.target_layer])
    return {"default": float(res.default_vector[res.target_layer] @ u),
            "roles": float(np.nanmean(res.role_vectors[:, res.target_layer], axis=0) @ u)}
