"""What the study computes per trait (`TraitSteering` and its parts), the names its edits go by, and the evidence gate
that reads it. The parts are plain dicts with declared keys, so that metrics.json writes them as they are while every
reader can see which keys exist."""
from __future__ import annotations

from typing import TypedDict

import numpy as np

from psm_jax.persona.measures import Validity
from psm_jax.persona.stats import Effect, NullBand

PERSONA_VECTOR = "persona vector"  # the edit along the trait's persona vector


def latent_name(latent: int) -> str:
    """The edit that adds latent `latent`'s decoder row: the key of `TraitSteering["edits"]`."""
    return f"latent {latent}"


class EditEffect(TypedDict):
    """One steering direction at the trait's matched strength."""

    strength: float  # x the typical residual norm
    ppl_ratio: float  # at `strength`
    ppl_ratios: list[float]  # over the sorted strength grid
    effect: Effect  # on the judge-free score, steered minus unsteered answer
    band: NullBand | None  # the random directions' effects; None with fewer than a band needs
    z: float  # the effect against the band (NaN without one)
    answers: list[str]  # the steered answers, one per question
    empty: int  # answers with no content (left out of the effect)


class ClampEffect(TypedDict):
    """The best latent clamped to `multiple` x its max activation."""

    multiple: float
    value: float  # the clamped activation
    ppl_ratio: float
    effect: Effect


class TwoChoice(TypedDict, total=False):
    """The two-choice items (secondary measure); `band` and `z` exist only when `validity` passes."""

    validity: Validity
    stored_validity: dict | None  # the trait file's stored check for the model (an ItemValidity as a dict), if any
    n_items: int
    unsteered: float  # the mean log P(trait choice) - log P(other choice) without steering
    edits: dict[str, Effect]  # empty when the check fails
    band: NullBand | None
    z: float


class TraitSteering(TypedDict):
    """Everything `steer_trait` computes for one trait."""

    latents: list[int]  # the steered latents, the features run's best first
    best: str  # the best latent's edit name
    strength: float  # the matched strength every direction is steered at
    within_ceiling: bool  # whether the best latent and the vector both stay under the perplexity ceiling there
    questions: list[str]  # the evaluation questions: the units
    systems: dict[str, tuple[str, str]]  # "score" / "validity" -> (positive, negative) system prompt
    validity: Validity  # the judge-free score's check on this model
    edits: dict[str, EditEffect]  # the latents, then the persona vector
    random_effects: list[float]  # each random direction's mean score change (NaN where no answer scored)
    band_ppl_ratio_median: float  # the median perplexity ratio of the first random directions
    unsteered_answers: list[str]
    clamp: list[ClampEffect]  # one per clamp multiple
    two_choice: TwoChoice | None  # None when not run
    max_act: float  # the best latent's max activation in the features run (1 when it has none)
    decoder_cosine_with_vector: dict[str, float]  # latent edit name -> cos(W_dec row, persona vector)


def is_evidence(trait_result: TraitSteering) -> bool:
    """The gate: a trait's steering result is evidence only when the judge-free measure passed its validity check on
    this model and the best latent has a z against a random band."""
    z = trait_result["edits"][trait_result["best"]]["z"]
    return bool(trait_result["validity"]["valid"] and np.isfinite(z))
