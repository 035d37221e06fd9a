"""The two-choice items, a secondary measure (log P(trait choice) - log P(other choice) per item). Its own validity
check runs on the model first; only a measure that passes it is steered and given a random band, because a measure
that does not respond to the trait's prompts says nothing about steering either way."""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from experiments.feature_steering.config import Config
from experiments.feature_steering.scores import band_z
from experiments.feature_steering.trait_result import TwoChoice
from psm_jax.persona import measures
from psm_jax.persona.stats import paired_effect
from psm_jax.persona.steering import const_edits_fn


def two_choice_block(model, trait, steer: dict, *, layer: int, valid_sys, band_vectors, cfg: Config) -> TwoChoice:
    """The two-choice measure: its validity check on this model (positive vs negative system prompt, paired by item),
    the stored check for `cfg.model` when the trait file has one, and the unsteered value. Only when the check passes:
    each steering vector's change (`steer`: name -> vector, the best latent first) and the random band for the best
    latent; a measure that fails its check is not used further."""
    items = list(trait.behavioural_items)
    measure = _items_measure(model, items, layer, cfg.batch_size)
    check = measures.validity(measure(valid_sys[0]), measure(valid_sys[1]))
    base = measure()
    out: TwoChoice = {"validity": check, "stored_validity": _stored_validity(trait, cfg.model), "n_items": len(items),
                      "unsteered": float(base.mean()), "edits": {}}
    if check["valid"]:
        _add_steered(out, measure, base, steer, band_vectors, cfg.seed)
    return out


def _items_measure(model, items: list, layer: int, batch_size: int) -> Callable[..., np.ndarray]:
    """measure(system=None, vector=None): the items' values [n_items] under `system`, with `vector` added at `layer`
    (none: a zero vector, the same edit structure, so that one compiled forward serves every call)."""
    def measure(system: str | None = None, vector=None) -> np.ndarray:
        v = np.zeros(model.config.d_model) if vector is None else vector
        return measures.two_choice(model, items, system=system, edits_fn=const_edits_fn(model.config, layer, v),
                                   batch_size=batch_size)
    return measure


def _stored_validity(trait, model_name: str) -> dict | None:
    """The trait file's stored check of the items on `model_name`, as a dict (None: never checked there)."""
    stored = trait.items_validity(model_name) if hasattr(trait, "items_validity") else None
    return dataclasses.asdict(stored) if stored is not None else None


def _add_steered(out: TwoChoice, measure, base: np.ndarray, steer: dict, band_vectors, seed: int) -> None:
    """Each steering vector's paired change over the items, and the best latent's (the first) band and z against the
    random vectors' mean changes."""
    out["edits"] = {name: paired_effect(measure(vector=v), base, seed=seed) for name, v in steer.items()}
    null = np.asarray([measure(vector=v).mean() - base.mean() for v in band_vectors])
    out["band"], out["z"] = band_z(out["edits"][next(iter(steer))]["estimate"], null)
