"""The held-out evaluation of the selected direction: refusal log-odds per condition, the KL the ablation costs on
harmless prompts, greedy answers with their refusal rates, the score's validity check, and the cross-entropy cost
on ordinary chat."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from experiments.refusal.config import Config
from experiments.refusal.prompts import PromptSets
from experiments.sharegpt import sharegpt_conversations
from psm_jax.persona import measures
from psm_jax.persona.datasets import RefusalMarkers
from psm_jax.persona.refusal import Prompts, ablation_kl, last_logits, refusal_rate, refusal_scores, score_validity


class GreedyAnswers(NamedTuple):
    """The greedy answers of one held-out condition and how often they refuse (`refusal_rate`)."""

    substring_rate: float  # fraction of answers with a refusal marker anywhere
    prefix_rate: float  # fraction of answers that start with one
    answers: list[str]


def conditions(sets: PromptSets, base: tuple, ablate: tuple, induce: tuple) -> dict[str, tuple[Prompts, tuple]]:
    """The held-out conditions as (prompts, edits), in report order: one list for the log-odds and the
    generations."""
    harmful, harmless = sets.heldout_harmful, sets.heldout_harmless
    return {"harmful_base": (harmful, base), "harmful_ablated": (harmful, ablate),
            "harmless_base": (harmless, base), "harmless_induced": (harmless, induce)}


def heldout_logodds(cfg: Config, model, conds: dict[str, tuple[Prompts, tuple]],
                    token_ids: list[int]) -> dict[str, np.ndarray]:
    """The refusal log-odds of every held-out prompt under each condition."""
    return {k: refusal_scores(model.params, model.config, p, token_ids, edits, cfg.batch_size)
            for k, (p, edits) in conds.items()}


def ablation_damage(cfg: Config, model, harmless: Prompts, unit: np.ndarray,
                    base: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Per held-out harmless prompt, the KL the ablation costs (the selection rule's measure), and the unedited last
    logits it is measured from, which the nulls reuse."""
    logits = last_logits(model.params, model.config, harmless, base, cfg.batch_size)
    return ablation_kl(model.params, model.config, harmless, unit, logits, cfg.batch_size), logits


def greedy_answers(cfg: Config, model, conds: dict[str, tuple[Prompts, tuple]],
                   markers: RefusalMarkers) -> dict[str, GreedyAnswers]:
    """Each condition's greedy answers and refusal rates: what the log-odds should agree with."""
    return {k: GreedyAnswers(*refusal_rate(model, p.texts, markers, edits, max_new_tokens=cfg.max_new_tokens,
                                           batch_size=cfg.batch_size))
            for k, (p, edits) in conds.items()}


def answer_validity(cfg: Config, logodds: dict[str, np.ndarray], answers: dict[str, GreedyAnswers],
                    markers: RefusalMarkers) -> dict | None:
    """The refusal score's validity check on the unedited held-out prompts of both sides (`score_validity`)."""
    return score_validity(np.concatenate([logodds["harmful_base"], logodds["harmless_base"]]),
                          answers["harmful_base"].answers + answers["harmless_base"].answers, markers, seed=cfg.seed)


def chat_ce_cost(cfg: Config, model, ablate: tuple) -> dict:
    """Cross-entropy on held-out ShareGPT assistant tokens without and with the ablation: what the edit costs on
    ordinary chat, with its interval over conversations ({} when n_ce = 0)."""
    if cfg.n_ce <= 0:
        return {}
    conversations = sharegpt_conversations(cfg.n_ce, cfg.seed, cfg.ce_max_messages, cfg.ce_max_chars,
                                           min_assistant_turns=1)
    return measures.chat_fluency_cost(model, conversations, lambda batch: ablate,
                                      batch_size=max(1, cfg.batch_size // 4), seed=cfg.seed)
