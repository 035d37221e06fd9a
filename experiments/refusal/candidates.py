"""The candidates' coordinates: the layers and post-instruction positions whose difference in means is scored,
checked against the model and its chat template before any forward pass."""
from __future__ import annotations

import numpy as np

from experiments.refusal.config import Config


def candidate_layers(cfg: Config, model_config) -> tuple[int, ...]:
    """The candidate layers (default: every layer), checked against the model before any work starts."""
    layers = tuple(range(model_config.n_layers)) if cfg.layers is None else cfg.layers
    for layer in layers:
        model_config.check_layer(layer, "candidate layer")
    return layers


def candidate_indices(cfg: Config, offsets: np.ndarray,
                      layers: tuple[int, ...]) -> tuple[list[int], list[tuple[int, int]]]:
    """The candidate offsets and their (position index, layer) pairs; configured positions must be
    post-instruction offsets of this chat template."""
    if cfg.positions is not None:
        bad = [p for p in cfg.positions if p not in offsets.tolist()]
        if bad:
            raise ValueError(f"positions {bad} are not post-instruction offsets; expected some of {offsets.tolist()}")
    pos_index = {int(o): i for i, o in enumerate(offsets.tolist())}
    candidate_offsets = offsets.tolist() if cfg.positions is None else list(cfg.positions)
    return candidate_offsets, [(pos_index[p], layer) for p in candidate_offsets for layer in layers]
