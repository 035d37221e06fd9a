"""The units of the two behavioural measures, built once per trait and then read under steering and under each
system prompt: the two-choice items (split into selection and held-out halves, with their validity check) and the
response-likelihood measure's greedy reference answers (step 6b)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from experiments.persona_vectors.config import Config
from experiments.persona_vectors.trait_result import ReferenceAnswer
from psm_jax.persona import monitoring, rollouts
from psm_jax.persona.measures import prompt_validity
from psm_jax.persona.prompts import response_slots, split_items, trait_system_prompt
from psm_jax.persona.steering import ContrastPairs, answer_pairs, behaviour_measure, item_pairs


def items_measure(model, trait, systems) -> dict:
    """The two-choice items split into selection and held-out halves, and their validity check: the held-out
    items unsteered under each monitoring system prompt ([system, item]) and the paired pos - neg effect."""
    sel_items, held_items = split_items(trait.behavioural_items)
    per_unit = np.stack([behaviour_measure(model, held_items, system=s.system)[1] for s in systems])
    return {"selection": item_pairs(sel_items), "held_out": item_pairs(held_items), "per_system": per_unit,
            "behaviour": per_unit.mean(1), "validity": prompt_validity(per_unit, monitoring.validity_kinds(systems))}


def generate_reference_answers(model, trait, slots: list[dict], *, max_new_tokens: int, batch_size: int = 16,
                               progress: bool = False) -> list[dict]:
    """Greedy, unsteered answers under the slot's positive and negative system prompts: slots with 'pos', 'neg'."""
    convs = [[{"role": "system", "content": trait_system_prompt(trait.name, pol, getattr(trait.instruction_pairs[s["pair"]], pol))},
              {"role": "user", "content": s["question"]}] for pol in ("pos", "neg") for s in slots]
    rolls = rollouts.generate_responses(model, convs, max_new_tokens=max_new_tokens, temperature=0.0,
                                        batch_size=batch_size, progress=progress)
    n = len(slots)
    return [{**s, "pos": rolls[i].response, "neg": rolls[n + i].response} for i, s in enumerate(slots)]


def reference_units(model, trait, cfg: Config,
                    progress: bool) -> tuple[list[ReferenceAnswer], list[ReferenceAnswer], list[ReferenceAnswer]]:
    """The greedy reference answers per (question, pair), each marked kept (both answers non-empty) and its half
    (selection: even question index; held-out: odd): (all, kept selection, kept held-out)."""
    slots = response_slots(trait, cfg.n_response_questions, cfg.n_response_pairs)
    ref = generate_reference_answers(model, trait, slots, max_new_tokens=cfg.response_max_new_tokens,
                                     batch_size=cfg.batch_size, progress=progress)
    user = [[{"role": "user", "content": x["question"]}] for x in ref]
    n_pos = rollouts.answer_token_counts(model, user, [x["pos"] for x in ref])
    n_neg = rollouts.answer_token_counts(model, user, [x["neg"] for x in ref])
    for x, a, b in zip(ref, n_pos, n_neg):
        x.update(n_pos_tokens=int(a), n_neg_tokens=int(b), kept=bool(a > 0 and b > 0),
                 half="selection" if x["question_index"] % 2 == 0 else "held-out")
    sel = [x for x in ref if x["kept"] and x["half"] == "selection"]
    held = [x for x in ref if x["kept"] and x["half"] == "held-out"]
    if not sel or not held:
        raise ValueError(f"trait {trait.name!r}: {len(sel)} selection and {len(held)} held-out reference-answer pairs "
                         "with non-empty answers; expected at least one each (raise n_response_questions)")
    return ref, sel, held


def units_pairs(units: Sequence[dict], system: str | None = None) -> ContrastPairs:
    return answer_pairs([x["question"] for x in units], [x["pos"] for x in units], [x["neg"] for x in units], system)
