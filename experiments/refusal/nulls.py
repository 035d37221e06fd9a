"""The nulls the headlines are read against: random unit directions, and difference-in-means directions with the
harmful / harmless labels of the train prompts shuffled, each ablated and added like the selected direction."""
from __future__ import annotations

import numpy as np

from experiments.refusal.config import Config
from experiments.refusal.directions import TrainPrompts
from psm_jax.persona.directions import random_directions
from psm_jax.persona.refusal import Prompts, direction_nulls, shuffled_label_directions


def null_units(cfg: Config, model, train: TrainPrompts, selected: dict) -> dict[str, np.ndarray]:
    """The stand-in unit directions of each null the config asks for: random (seed + 1) and label-shuffled
    difference in means at the selected offset and layer over the (filtered) train prompts (seed + 2)."""
    units = {}
    if cfg.n_random:
        units["random"] = random_directions(cfg.seed + 1, cfg.n_random, model.config.d_model, 1.0)
    if cfg.n_shuffled:
        units["shuffled"] = shuffled_label_directions(model.params, model.config, train.harmful, train.harmless,
                                                      offset=selected["offset"], layer=selected["layer"],
                                                      n=cfg.n_shuffled, seed=cfg.seed + 2, batch_size=cfg.batch_size)
    return units


def null_effects(cfg: Config, model, units: dict[str, np.ndarray], harmful: Prompts, harmless: Prompts,
                 token_ids: list[int], logodds: dict[str, np.ndarray], norm: float, layer: int,
                 harmless_logits: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Each null's drops, rises and KL costs (`direction_nulls`), keyed like `units`: measured from the same
    unedited means as the selected direction's (`logodds`), added at its `norm` at its `layer`."""
    return {name: direction_nulls(model.params, model.config, u, harmful, harmless, token_ids,
                                  harmful_base=float(logodds["harmful_base"].mean()),
                                  harmless_base=float(logodds["harmless_base"].mean()), norm=norm, layer=layer,
                                  batch_size=cfg.batch_size, harmless_logits=harmless_logits)
            for name, u in units.items()}
