"""The answers a trait is scored on, from one batched generation: every add edit is a row of the same forward (each
row carries its own vector), so the unsteered answers, the steered ones, the random band and the validity prompts'
answers come from one compiled function; the clamps follow on their own. `AnswerSets` names the sets by what they
are, so that no reader counts rows."""
from __future__ import annotations

import dataclasses

import numpy as np

from experiments.feature_steering.config import Config
from experiments.feature_steering.scores import score_answers_by_unit
from psm_jax import edits as E
from psm_jax.persona import measures, rollouts
from psm_jax.persona.prompts import system_conv
from psm_jax.persona.steering import per_row_steered


@dataclasses.dataclass(frozen=True)
class AnswerSets:
    """The trait scores (NaN for an empty answer) and the answers, [set, question] each. Sets, in order: the
    unsteered one, one per steering direction, one per random direction, the validity prompts' positive and negative
    ones, one per clamp."""

    scores: np.ndarray
    answers: np.ndarray
    n_directions: int
    n_random: int

    @property
    def unsteered(self) -> np.ndarray:
        return self.scores[0]

    def direction(self, k: int) -> np.ndarray:
        """Steering direction k's scores (k from 0, in the order the directions were given)."""
        return self.scores[1 + k]

    def direction_answers(self, k: int) -> list[str]:
        return list(self.answers[1 + k])

    @property
    def random(self) -> np.ndarray:
        return self.scores[1 + self.n_directions:self._validity_row]

    @property
    def validity_pair(self) -> tuple[np.ndarray, np.ndarray]:
        """The scores of the answers made under the validity prompts: (positive, negative)."""
        return self.scores[self._validity_row], self.scores[self._validity_row + 1]

    @property
    def clamped(self) -> np.ndarray:
        return self.scores[self._validity_row + 2:]

    @property
    def _validity_row(self) -> int:
        return 1 + self.n_directions + self.n_random


def steered_scores(model, layer: int, questions: list[str], directions: list[np.ndarray], random: list[np.ndarray],
                   systems: tuple[tuple[str, str], tuple[str, str]], clamps: list[E.SaeLatent],
                   cfg: Config) -> AnswerSets:
    """Generate and score every set of `AnswerSets`: `directions` and `random` (steering vectors, already scaled)
    added at `layer` row by row, the validity answers under `systems[1]`, the `clamps`; every answer is scored under
    `systems[0]` by the unsteered model."""
    plan = [np.zeros(model.config.d_model)] + directions + random
    rolls = _added_rollouts(model, layer, questions, plan, systems[1], cfg)
    for edit in clamps:
        rolls += rollouts.generate_responses(model, _user_turns(questions), max_new_tokens=cfg.max_new_tokens,
                                             batch_size=measures.even_batch(len(questions), cfg.batch_size),
                                             edits_fn=lambda batch, e=edit: (e,))
    answers = [r.response for r in rolls]
    n_sets = len(answers) // len(questions)
    scores = score_answers_by_unit(model, questions * n_sets, answers, systems[0], cfg.batch_size)
    return AnswerSets(scores=scores.reshape(n_sets, len(questions)),
                      answers=np.asarray(answers, dtype=object).reshape(n_sets, len(questions)),
                      n_directions=len(directions), n_random=len(random))


def _user_turns(questions: list[str]) -> list[list[dict]]:
    return [[{"role": "user", "content": q}] for q in questions]


def _added_rollouts(model, layer: int, questions: list[str], plan: list[np.ndarray], validity_systems: tuple[str, str],
                    cfg: Config) -> list:
    """One batched generation: each vector of `plan` added to its questions' rows, then the validity prompts' rows
    (zero vectors: unsteered under a system prompt)."""
    convs = _user_turns(questions) * len(plan) + [system_conv(sy, q) for sy in validity_systems for q in questions]
    vecs = np.concatenate([np.repeat(np.stack(plan), len(questions), axis=0),
                           np.zeros((2 * len(questions), model.config.d_model))])
    generate = lambda chunk, ef, b: rollouts.generate_responses(model, chunk, batch_size=b, edits_fn=ef,  # noqa: E731
                                                                max_new_tokens=cfg.max_new_tokens)
    return per_row_steered(generate, convs, vecs, model=model, layer=layer, batch_size=cfg.batch_size)
