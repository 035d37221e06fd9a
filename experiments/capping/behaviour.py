"""Trait behaviour under the role prompts, without and with capping: the trait two-choice items against the
default-prompt baseline, used as evidence only where their validity check, re-run here on the items used, passes
(shown next to the stored per-model check, `Trait.items_are_evidence`, benchmarks/trait_items_validity.py)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from experiments.capping.config import Config
from psm_jax.persona import measures
from psm_jax.persona.prompts import trait_system_prompt


class TraitBehaviour(NamedTuple):
    """The trait step's outputs (`trait_behaviour`)."""

    rows: list[dict]  # one row of the behaviour table per trait with items
    # "role", "role+cap" -> per trait whose items passed their check: |log-odds - default prompt's| per role prompt
    distances: dict[str, list[np.ndarray]]


def trait_items_check(model, trait, items, *, batch_size: int) -> dict:
    """The two-choice items' validity at study time on this model (first instruction pair, positive vs negative
    system prompt, over the items used), with the stored check's verdict for the model."""
    pair = trait.instruction_pairs[0]
    pos = measures.two_choice(model, items, system=trait_system_prompt(trait.name, "pos", pair.pos),
                              batch_size=batch_size)
    neg = measures.two_choice(model, items, system=trait_system_prompt(trait.name, "neg", pair.neg),
                              batch_size=batch_size)
    return measures.validity(pos, neg)


def trait_behaviour(cfg: Config, model, instr, cap_fn) -> TraitBehaviour:
    """Trait two-choice items under the role prompts without and with capping, against the default prompt. Items are
    used as evidence only where their validity check passes on this model (run here)."""
    from psm_jax.persona import datasets

    trait_rows, trait_dist = [], {"role": [], "role+cap": []}
    for t in cfg.traits:
        trait = datasets.load_trait(t)
        items = trait.behavioural_items[:cfg.n_trait_items]
        if not items:
            continue
        check = trait_items_check(model, trait, items, batch_size=cfg.batch_size)
        d0 = float(measures.two_choice(model, items, batch_size=cfg.batch_size).mean())
        d_role = np.asarray([measures.two_choice(model, items, system=s, batch_size=cfg.batch_size).mean()
                             for s in instr])
        d_cap = np.asarray([measures.two_choice(model, items, system=s, edits_fn=cap_fn,
                                                batch_size=cfg.batch_size).mean() for s in instr])
        if check["valid"]:
            trait_dist["role"].append(np.abs(d_role - d0))
            trait_dist["role+cap"].append(np.abs(d_cap - d0))
        trait_rows.append(_trait_row(cfg, t, trait, items, check, d0, d_role, d_cap))
    return TraitBehaviour(trait_rows, trait_dist)


def _trait_row(cfg: Config, name: str, trait, items, check: dict, d0: float, d_role, d_cap) -> dict:
    """One trait's row of the behaviour table: its check here and stored, and the mean log-odds and distances to
    the default prompt."""
    return {"trait": name, "items": len(items), "validity": measures.validity_text(check),
            "stored check passed": trait.items_are_evidence(cfg.model),
            "evidence": bool(check["valid"]), "default": d0, "role prompts": float(d_role.mean()),
            "role prompts + capping": float(d_cap.mean()),
            "|role - default|": float(np.mean(np.abs(d_role - d0))),
            "|capped - default|": float(np.mean(np.abs(d_cap - d0)))}
