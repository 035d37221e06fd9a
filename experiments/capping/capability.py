"""Capping's capability cost: accuracy on held-out four-option questions (evidence only where the uncapped model
beats chance) and perplexity on ShareGPT assistant turns, each without and with the cap."""
from __future__ import annotations

import numpy as np

from experiments.capping.config import Config
from experiments.sharegpt import sharegpt_conversations
from psm_jax.persona import measures
from psm_jax.persona.stats import bootstrap_ci, paired_effect


def qa_cost(model, items, cap_fn, *, batch_size: int, seed: int) -> dict:
    """Held-out multiple-choice accuracy without and with capping: each with its bootstrap interval over items,
    the paired change (capped - plain, per item 0/1) with its interval, and chance."""
    plain = measures.multiple_choice(model, items, batch_size=batch_size)
    capped = measures.multiple_choice(model, items, edits_fn=cap_fn, batch_size=batch_size)
    a0, a1 = plain["correct"].astype(np.float64), capped["correct"].astype(np.float64)
    acc = bootstrap_ci(a0, seed=seed)
    # the measure's validity check: without capping the model must beat chance, or a change in accuracy says nothing
    return {"n": len(items), "chance": plain["chance"], "accuracy": acc, "valid": bool(acc["low"] > plain["chance"]),
            "accuracy_capped": bootstrap_ci(a1, seed=seed), "change": paired_effect(a1, a0, seed=seed),
            "changed_answers": int(np.sum(plain["choice"] != capped["choice"]))}


def qa_step(cfg: Config, model, cap_fn) -> dict:
    """A capability cost of capping: held-out multiple-choice accuracy (`qa_cost`). ({} when skipped.)"""
    from psm_jax.persona import datasets

    qa_items = datasets.load_qa()
    qa_items = qa_items if cfg.n_qa is None else qa_items[:cfg.n_qa]
    if not qa_items:
        return {}
    return qa_cost(model, qa_items, cap_fn, batch_size=cfg.batch_size, seed=cfg.seed)


def perplexity_cost(cfg: Config, model, cap_fn, progress: bool) -> dict:
    """A capability cost of capping: perplexity on ShareGPT assistant turns without and with it, and the percent
    change. ({} when skipped.)"""
    if cfg.n_ppl_conversations <= 0:
        return {}
    sg = sharegpt_conversations(cfg.n_ppl_conversations, cfg.seed + 7, 8, cfg.ppl_max_chars, min_assistant_turns=1)
    cost = measures.chat_fluency_cost(model, sg, cap_fn, batch_size=cfg.ppl_batch_size, seed=cfg.seed,
                                      progress=progress)
    ppl = {"tokens": cost["tokens"], "ppl": cost["ppl"], "ppl_capped": cost["ppl_edited"],
           "pct_change": cost["ppl_pct_change"], "n_conversations": cost["n_conversations"]}
    if "ppl_pct_change_ci" in cost:
        ppl["pct_change_ci"] = cost["ppl_pct_change_ci"]
    return ppl
