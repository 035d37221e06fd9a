"""The judge-free trait score of an answer and what is read from it: the scoring and validity system prompts of a
trait, the paired effect of an edit over questions, the random directions' effects, an effect's z against their band
and the score's validity check. A question whose answer came out empty has no score and drops out of every pair."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from experiments.feature_steering.trait_result import NullBand, Effect, Validity
from psm_jax.persona import measures
from psm_jax.persona.prompts import trait_system_prompt
from psm_jax.persona.stats import MIN_NULL_DRAWS, null_band, paired_effect, zscore

MEASURE = "judge-free answer score (per-token log P(answer | positive prompt) - log P(answer | negative prompt))"


def trait_systems(trait) -> tuple[tuple[str, str], tuple[str, str]]:
    """(scoring systems, validity systems): the positive / negative prompts of instruction pair 0 score the answers;
    the validity answers are generated under pair 1 (pair 0 when the trait has one), so the check does not score a
    prompt's own greedy output."""
    pairs = trait.instruction_pairs
    make = lambda pair: tuple(trait_system_prompt(trait.name, pol, getattr(pair, pol)) for pol in ("pos", "neg"))  # noqa: E731
    return make(pairs[0]), make(pairs[1] if len(pairs) > 1 else pairs[0])


def score_answers_by_unit(model, questions: Sequence[str], answers: Sequence[str], systems: tuple[str, str],
                          batch_size: int) -> np.ndarray:
    """The judge-free score of each answer (NaN for an empty one): [n]."""
    out = np.full(len(answers), np.nan)
    keep = [i for i, a in enumerate(answers) if a]
    if keep:
        out[keep] = measures.answer_trait_score(model, [questions[i] for i in keep], [answers[i] for i in keep],
                                                *systems, batch_size=batch_size)
    return out


def paired_unit_effect(steered: np.ndarray, base: np.ndarray, seed: int) -> Effect:
    """Mean over questions of steered - unsteered score, over the questions where both answers are non-empty,
    with its 95% bootstrap interval; NaNs when fewer than one such question."""
    ok = np.isfinite(steered) & np.isfinite(base)
    if not ok.any():
        return {"estimate": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0, "excludes_zero": False}
    return paired_effect(steered[ok], base[ok], seed=seed)


def random_effects(random_scores: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Each random direction's mean score change over the questions both answers scored (NaN where none did): the
    draws of the null band. random_scores: [n_random, questions]."""
    return np.asarray([np.nanmean(r - base) if np.isfinite(r - base).any() else np.nan for r in random_scores])


def band_z(value: float, null_effects: np.ndarray) -> tuple[NullBand | None, float]:
    """(null band, z) of `value` against the random directions' effects (NaN effects dropped)."""
    x = np.asarray(null_effects, np.float64)
    x = x[np.isfinite(x)]
    if x.size < MIN_NULL_DRAWS or not np.isfinite(value):
        return None, float("nan")
    return null_band(x), zscore(value, x)


def answer_validity(pos: np.ndarray, neg: np.ndarray) -> Validity:
    """The trait score's validity check on the questions where both prompts' answers were scored."""
    ok = np.isfinite(pos) & np.isfinite(neg)
    return measures.validity(pos[ok], neg[ok])
