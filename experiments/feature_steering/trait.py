"""One trait's steering (`steer_trait`): the steered directions, the strength matched by perplexity cost, the answers
and their scores, each direction's effect with its z against the random band, the clamp and the two-choice items.
Every direction of a trait, the random band included, is steered at the one matched strength, so that their effects
compare at the same norm."""
from __future__ import annotations

import numpy as np

from experiments.feature_steering.answers import AnswerSets, steered_scores
from experiments.feature_steering.clamp import clamp_edits, clamp_effects
from experiments.feature_steering.config import Config
from experiments.feature_steering.inputs import top_latents
from experiments.feature_steering.scores import (answer_validity, band_z, paired_unit_effect, random_effects,
                                                 trait_systems)
from experiments.feature_steering.strength import PerplexityDocs, StrengthMatch, match_strength
from experiments.feature_steering.trait_result import PERSONA_VECTOR, EditEffect, TraitSteering, latent_name
from experiments.feature_steering.two_choice import two_choice_block
from psm_jax.persona.directions import unit
from psm_jax.persona.steering import perplexity_ratios
from sae import features as F


def steer_trait(model, sae: F.FeatureSae, trait, info: dict, vector, *, cfg: Config, norm: float, ppl: PerplexityDocs,
                rand_units: np.ndarray, progress=None) -> TraitSteering:
    """Everything `run` computes for one trait (see the package doc): `info` is the trait's entry of the features
    run's ranking, `vector` its persona vector, `norm` the strength unit, `rand_units` the random band's directions."""
    say = progress or (lambda msg: None)
    latents = top_latents(info, cfg.n_latents)
    best = latent_name(latents[0])
    units = steering_units(sae, latents, vector)
    match = match_strength(model, units, (best, PERSONA_VECTOR), norm, ppl, sae.layer, cfg)
    say(_strength_message(trait.name, units, match))
    questions = list(trait.evaluation_questions[:cfg.n_questions])
    score_sys, valid_sys = trait_systems(trait)
    max_act = float(info.get("max_act") or 1.0)
    clamps = clamp_edits(model, sae, latents[0], max_act, cfg)
    say(f"{trait.name}: generating {(len(units) + len(rand_units) + 3) * len(questions)} answers "
        f"({len(units) + len(rand_units)} edits x {len(questions)} questions)")
    s_star = match.strength
    sets = steered_scores(model, sae.layer, questions, [u * s_star * norm for u in units.values()],
                          [r * s_star * norm for r in rand_units], (score_sys, valid_sys), clamps, cfg)
    band_effects = random_effects(sets.random, sets.unsteered)
    return TraitSteering(
        latents=latents, best=best, strength=s_star, within_ceiling=match.within_ceiling, questions=questions,
        systems={"score": score_sys, "validity": valid_sys}, validity=answer_validity(*sets.validity_pair),
        edits=edit_effects(sets, list(units), match, band_effects, cfg.seed), random_effects=band_effects.tolist(),
        band_ppl_ratio_median=float(np.median(perplexity_ratios(model, *ppl, rand_units[:4] * s_star * norm,
                                                                sae.layer, batch_size=cfg.batch_size))),
        unsteered_answers=list(sets.answers[0]),
        clamp=clamp_effects(model, clamps, max_act, sets.clamped, sets.unsteered, ppl, cfg),
        two_choice=(two_choice_block(model, trait, {n: units[n] * s_star * norm for n in (best, PERSONA_VECTOR)},
                                     layer=sae.layer, valid_sys=valid_sys, band_vectors=rand_units * s_star * norm,
                                     cfg=cfg) if cfg.two_choice else None),
        max_act=max_act, decoder_cosine_with_vector=decoder_cosines(sae, latents, vector))


def steering_units(sae: F.FeatureSae, latents: list[int], vector) -> dict[str, np.ndarray]:
    """The unit directions steered, by edit name: each latent's decoder row (the best first), then the persona
    vector."""
    units = {latent_name(i): unit(np.asarray(sae.W_dec[i], np.float64)) for i in latents}
    units[PERSONA_VECTOR] = unit(np.asarray(vector, np.float64))
    return units


def edit_effects(sets: AnswerSets, names: list[str], match: StrengthMatch, band_effects: np.ndarray,
                 seed: int) -> dict[str, EditEffect]:
    """Per steering direction (`names`, in the order of `sets`' directions and of `match`'s ratio rows): its
    perplexity cost, its paired effect on the score and that effect's z against the random band."""
    out = {}
    for k, name in enumerate(names):
        scores = sets.direction(k)
        eff = paired_unit_effect(scores, sets.unsteered, seed)
        band, z = band_z(eff["estimate"], band_effects)
        out[name] = EditEffect(strength=match.strength, ppl_ratio=match.ratio_at_match(k),
                               ppl_ratios=match.ratios[k].tolist(), effect=eff, band=band, z=z,
                               answers=sets.direction_answers(k), empty=int(np.sum(~np.isfinite(scores))))
    return out


def decoder_cosines(sae: F.FeatureSae, latents: list[int], vector) -> dict[str, float]:
    """cos(decoder row, persona vector) of each steered latent, by edit name."""
    return {latent_name(i): float(F.decoder_cosine(sae.W_dec[[i]], vector)[0]) for i in latents}


def _strength_message(trait_name: str, units: dict, match: StrengthMatch) -> str:
    return (f"{trait_name}: strength {match.strength} x typical norm (within the ceiling: {match.within_ceiling}); "
            f"perplexity ratios over {match.strengths}: "
            + "; ".join(f"{n} {np.round(r, 2).tolist()}" for n, r in zip(units, match.ratios)))
