"""Steering with persona latents of an SAE, against the persona vector and a band of random directions.

    psm feature-steering features=reports/persona_features --out reports/feature_steering seed=0
    psm feature-steering features=runs/pf_quick --preset quick --out runs/fs_quick

Input: the output folder of `psm features` (candidates.json: the best latent per trait and its other candidates, the
SAE's source; persona_directions.safetensors: the trait vectors at the SAE's layer). Per trait, with L the SAE's
layer, n_L the typical per-token residual norm at L (held-out ShareGPT assistant tokens) and s a strength:

* latent add: h <- h + s * n_L * W_dec[i] / |W_dec[i]| at resid_post of L, every position (what
  `psm_jax.edits.sae_latent` computes in mode "add" with `normalize`), for the top `n_latents` persona latents (the
  features run's best first: picked before steering, so its z is not selected on the outcome), from the features
  run's contrast ranking or, with `ranking=specific`, its trait-specific ranking;
* the persona vector: h <- h + s * n_L * v / |v|;
* random directions: `n_random` Gaussian unit directions at the same norm s * n_L: the null band;
* clamp (secondary): encode, set f_i = m * max_act(i), decode, add back the reconstruction error.

All add edits are rows of one batched forward: each row of a batch carries its own vector
(`psm_jax.persona.steering.row_add_edit`), so the unsteered answers, the latents, the persona vector and the random
band are generated and scored together.

Matched norm and perplexity cost: per trait, one strength s, the largest of `strengths` at which both the best
latent's and the persona vector's perplexity ratio (steered / unsteered, on held-out ShareGPT assistant tokens) is
<= `max_ppl_ratio`; every direction, the random band included, is steered at s, and each one's ratio is shown.

Measures (the units are the evaluation questions):
* headline, the judge-free score (`psm_jax.persona.measures.answer_trait_score`): per-token log-likelihood of the
  greedy steered answer under the trait's positive minus its negative system prompt, read by the unsteered model.
  Its validity check runs on the model used: answers generated under another instruction pair's positive vs
  negative prompt, scored the same way, paired by question (`measures.validity`). The effect of an edit is the
  mean over questions of score(steered answer) - score(unsteered answer) with a 95% bootstrap interval; its z is
  against the random band at the same norm. A result is evidence only when the check passes.
* the two-choice items (log P(trait choice) - log P(other choice)) are shown with their own validity check and get a
  random band only when that check passes; otherwise they are never read as evidence.

The steps are modules: `inputs` (the features run's folder), `strength` (the strength unit and the perplexity
match), `answers` (the batched generation and its scores), `scores` (the measure and its statistics), `clamp`,
`two_choice`, `trait` (one trait's steering, its result typed in `trait_result`) and `pipeline` (`run`); the report
is `report_text`, `report_figures`, `report_folder` and `report_records`.
"""
from __future__ import annotations

from experiments.feature_steering.config import PRESETS, RANKINGS, Config
from experiments.feature_steering.trait_result import (PERSONA_VECTOR, NullBand, ClampEffect, EditEffect, Effect,
                                                       TraitSteering, TwoChoice, Validity, is_evidence, latent_name)
from experiments.feature_steering.inputs import FeaturesRun, load_features, ranked_info, read_directions, top_latents
from experiments.feature_steering.strength import (PerplexityDocs, StrengthMatch, common_strength, match_strength,
                                                   ppl_docs, strength_grid_ratios, typical_residual_norm)
from experiments.feature_steering.scores import (MEASURE, answer_validity, band_z, paired_unit_effect,
                                                 random_effects, score_answers_by_unit, trait_systems)
from experiments.feature_steering.clamp import clamp_edit, clamp_edits, clamp_effects
from experiments.feature_steering.answers import AnswerSets, steered_scores
from experiments.feature_steering.two_choice import two_choice_block
from experiments.feature_steering.trait import decoder_cosines, edit_effects, steer_trait, steering_units
from experiments.feature_steering.pipeline import Result, run
from experiments.feature_steering.report_folder import write_report as report
from experiments.feature_steering.report_records import result_records as records

__all__ = ["Config", "PRESETS", "RANKINGS", "run", "Result", "report", "records", "MEASURE", "PERSONA_VECTOR",
           "latent_name", "Effect", "NullBand", "Validity", "EditEffect", "ClampEffect", "TwoChoice", "TraitSteering",
           "is_evidence", "FeaturesRun", "read_directions", "load_features", "ranked_info", "top_latents",
           "PerplexityDocs", "ppl_docs", "typical_residual_norm", "strength_grid_ratios", "common_strength",
           "StrengthMatch", "match_strength", "trait_systems", "score_answers_by_unit", "paired_unit_effect",
           "random_effects", "band_z", "answer_validity", "clamp_edit", "clamp_edits", "clamp_effects", "AnswerSets",
           "steered_scores", "two_choice_block", "steer_trait", "steering_units", "edit_effects", "decoder_cosines"]
