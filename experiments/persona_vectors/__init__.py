"""Persona vectors (Chen, Arditi, Sleight, Evans, Lindsey 2025) on a psm-jax model.

    psm persona-vectors --out runs/pv seed=0                   # evil, sycophantic, humorous
    psm persona-vectors traits=evil --preset quick --out runs/pv_quick

Pipeline per trait (psm_jax.persona.datasets.load_trait):

1. Generation: for each of the first `n_pairs` instruction pairs, `n_questions` extraction
   questions and `n_samples` samples, a positive conversation (system "You are a/an {trait}
   assistant. {pos}") and a negative one (system "You are a helpful assistant. {neg}"), sampled
   at `temperature` with a key derived from the seed and the trait's index.
2. Judging and filtering: the judge (default: the model itself, `psm_jax.persona.judge.LocalJudge`,
   its reply started with "Score: ") scores every response 0-100 for the trait (the trait's
   rubric), and for coherence the responses of pairs that pass the trait condition; a pos/neg
   pair (same instruction pair, question and sample) is kept when pos >= 50, neg < 50 and both
   coherence >= 50. The judge is a measure like any other, so it has a validity check: its trait
   score of the positive answers minus the negative ones, per extraction question (the independent
   unit), with a 95% interval. The filter runs only where that check passes; a judge that cannot tell
   the two apart (SmolLM2-135M judging itself) would keep pairs by chance and build the vector from
   fewer of them. If the filter keeps fewer than `min_kept_pairs` pairs the run falls back to all
   pairs and says so; `filter=false` skips the filter (judging still runs for the report unless
   `judge=none`).
3. Vectors: at every layer, site resid_post (vector[i] is added to / read from the output of block
   i, i.e. HF hidden_states[i+1]), mean over the kept positive responses minus mean over the kept
   negative ones of each response's mean activation over its assistant content tokens
   ("response_avg", the main one); variants "prompt_avg" (mean over the prompt's content tokens,
   system prompt included) and "prompt_last" (the token before the response, i.e. the last token of
   the generation prompt). Unnormalised; saved as safetensors + JSON metadata.
4. Steering and layer selection: h <- h + c * s_L * v_L / |v_L| at resid_post of layer L at every
   position. With coef_unit "vector" (the default, the papers' unit) s_L = |v_L|, so c = 1 adds the raw
   persona vector; with "residual", s_L is the typical residual norm at layer L (mean per-token norm over
   the model's own responses' assistant tokens). The behavioural measure is the mean
   over the trait's two-choice items of log P(trait choice) - log P(other choice). Its validity check runs
   first: the held-out items under each of the 5 positive minus the 5 negative system prompts (no
   steering), paired by item, 95% bootstrap interval (`measures.validity`). The items are split in two
   balanced halves: the layer is chosen on the *selection* half (largest m(+c_sel) - m(-c_sel)), and the
   steering curve over `coefficients` is reported on the *held-out* half, each point with its perplexity
   ratio (the model's own unsteered answers scored steered vs not). Only a measure that passes its
   validity check gets the control: `n_random` random directions at the steered vector's norm (a 95%
   band of their m(+cmax) - m(-cmax)). Measures are evaluated as data (`psm_jax.persona.steering`): the text is
   tokenised once and a batch of steering vectors (coefficients, layers, random directions) goes through
   vmapped forwards (`steered_values`). Monotonicity (`psm_jax.persona.stats.monotonic`): `strict` over
   the sweep, `run4` (the lenient run), and the headline `strict_ppl1.5`: strictly increasing over the
   points whose perplexity ratio is <= max_ppl_ratio, >= 3 of them spanning both signs. The headline
   counts only traits whose measure passed its validity check.
5. Monitoring: over the graded system prompts (`prompts.graded_system_prompts`: the 5 positive and 5
   negative instructions, a mild positive and a mild negative one, the model's default and a few-shot
   variant of each polarity; 15 for a trait with 5 pairs), the behavioural measure (held-out items, no
   steering) vs the projection onto the unit vector at the chosen layer of (a) the last prompt token and
   (b) the mean response activation of greedy responses to evaluation questions; Pearson r across the
   prompts, overall and within polarity (each polarity cluster's means removed, so that r is not just
   positive vs negative prompts). Validity checks contrast only the 5 full positive and 5 negative
   instructions.
6. Cosine matrix across traits at a common layer (the most frequent chosen layer).
6b. A second behavioural measure, "response likelihood" (`response_measure`; off with
   response_measure=False): for the first `n_response_questions` evaluation questions and
   `n_response_pairs` instruction pairs per question, the model's own greedy answers under the positive
   and the negative system prompt (unsteered) are reference answers; m = mean over (question, pair) of
   per-token log P(pos answer | question) - per-token log P(neg answer | question), scored without the
   trait system prompt, steered at every position. Validity = m under the positive minus the negative
   system prompts per held-out unit (a prompt never scores answers generated under its own instruction
   pair); layer chosen by m on the even-indexed questions, curve (+ the random band when valid) on the
   odd-indexed ones; monitoring r = last-prompt projection vs m across the graded system prompts, at the
   layer that steering chose. Its within-polarity r is compared with the band of m shuffled among the prompts
   of one polarity and with the ceiling that both series' noise sets (`monitoring.within_reliability`: split-half
   reliability within polarity of m over held-out units and of the projection over questions); the same r
   at every layer is a descriptive curve, never the layer choice. A second
   monitoring layer is fixed on the extraction data alone (`crossfit_separation`): the layer where the
   last prompt token's projection best separates positive from negative extraction rows, cross-fitted
   over question halves; its within-polarity r is reported beside the steering layer's. A blind test of
   both layers (`holdout_monitoring`): the trait's held-out graded prompts (`monitor_holdout`, levels
   -3..3, never used for any choice) are run through the same monitoring; the target `monitoring_holdout`
   reads it at the extraction-data layer.
7. Data screening: for a dataset of (prompt, response) pairs, projection of the given response minus
   projection of the model's own (greedy) response to the same prompt (`projection_difference`);
   the report shows it for the positive and negative responses as a sanity check (expect > 0 and
   < 0).
8. Specificity matrix: cell (i, j) steers with trait i's vector at c = +-`specificity_coef` at its layer (the
   layer its valid measure chose) and measures trait j with j's valid measure (items first, then response
   likelihood) on its held-out units; the cell is the symmetric effect m(+c) - m(-c) (the steering band's
   statistic: it cancels the shift that any perturbation of that norm causes whatever its sign), as a z-score
   against the same effect of trait i's random directions at the same norm and layer (`stats.zscore`). Pass per trait: diagonal z > 3 and every
   off-diagonal |z| below it; a trait without a valid measure is marked, not used. A run of one trait has no
   off-diagonal cell, and its diagonal is the steering effect that step 4's random band already tests, so the
   matrix is computed only for two or more traits. A secondary matrix steers with each vector's trait-specific
   part instead (`trait_specific_matrix`: the component orthogonal to the other traits' vectors at its layer, at
   the whole vector's norm, against the same random band): it asks whether cross-trait effects travel on the
   vectors' shared part. The targets are scored on the whole vectors.

SmolLM2-135M-Instruct is small: claims rest on the behavioural log-prob measure, never on the
judge; null results are reported as they come.
"""
from __future__ import annotations

from experiments.persona_vectors.config import MEASURE_KEYS, PRESETS, Config
from experiments.persona_vectors.extraction import Extraction, judge_validity, load_persona_vectors
from experiments.persona_vectors.behaviour import generate_reference_answers
from experiments.persona_vectors.steering import default_sweep_layers, steer_with_measure
from experiments.persona_vectors.monitoring import monitoring_from_vectors
from experiments.persona_vectors.cross_trait import (MIN_SPECIFICITY_TRAITS, cosine_matrix, primary_measure,
                                                     specificity_matrix, trait_specific_matrix, trait_specific_vector)
from experiments.persona_vectors.summary import (HEADLINE_CRITERIA, MIN_TARGET_TRAITS, MONITOR_MIN_WITHIN_R,
                                                 TARGET_NAMES, monotonic_counts, reliability_metrics, summary_metrics,
                                                 targets)
from experiments.persona_vectors.trait_result import (ItemsSteering, MeasureSteering, ResponseBlock, ResponseMeasure,
                                                      TraitMetrics, TraitResult)
from experiments.persona_vectors.pipeline import Result, run, run_trait
from experiments.persona_vectors.report_folder import write_report as report
from experiments.persona_vectors.report_records import result_records as records

__all__ = ["Config", "PRESETS", "MEASURE_KEYS", "run", "Result", "report", "records", "run_trait", "Extraction",
           "judge_validity", "load_persona_vectors", "generate_reference_answers", "default_sweep_layers",
           "steer_with_measure", "monitoring_from_vectors", "MIN_SPECIFICITY_TRAITS", "primary_measure",
           "specificity_matrix", "trait_specific_vector", "trait_specific_matrix", "cosine_matrix",
           "HEADLINE_CRITERIA", "MIN_TARGET_TRAITS", "MONITOR_MIN_WITHIN_R", "TARGET_NAMES", "monotonic_counts",
           "targets", "reliability_metrics", "summary_metrics", "TraitResult", "TraitMetrics", "ItemsSteering",
           "MeasureSteering", "ResponseBlock", "ResponseMeasure"]
