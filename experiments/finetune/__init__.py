"""Fine-tuning studies: how training on a model's own trait-prompted answers moves its persona, whether the move is
predictable before training, whether steering during training prevents it, how far a narrow fine-tune's change
spreads and which SAE latents it moves.

    psm finetune --out runs/ft                              # evil, sycophantic, humorous; mixes 0..100%; studies 5, 8
    psm finetune --preset quick --out runs/ft_quick          # the main job's stage: one trait, plain 100% vs
                                                             # preventative steering, with the control fine-tune

Per trait (`psm_jax.persona.datasets.load_trait`), at one layer L (`layer`, default the middle block) of resid_post:

1. Persona vector: mean response activation of the model's greedy answers to the trait's extraction questions
   under its positive minus its negative system prompts (`rollouts.activation_means`, `directions.mean_difference`),
   with its split-half reliability over the questions (the cosine a vector from other questions is expected to
   share with it; every shift below is measured along this vector).
2. Training data made by the model itself: greedy answers to the fine-tuning questions
   (`psm_jax/persona/data/finetune/questions.json`, disjoint from every trait's extraction and evaluation
   questions) under the positive and negative system prompts, and under no system prompt (the model's own
   default answers). A training set of mix p has the positive answer for a seeded fraction p of the questions and
   the negative answer for the rest; it is trained *without* the system prompt. The control fine-tune trains on
   the default answers (what the model would say anyway: the null for "fine-tuning moves the persona").
3. Screening, before training: per training set, the mean over samples of the projection on the unit persona
   vector of the training answer's mean response activation minus that of the model's own default answer.
4. Fine-tunes: LoRA (`psm_jax.finetune.finetune`), the same initial key and batch order for every variant of a
   trait. Preventative steering adds c * v (c in multiples of the raw persona vector) at L on every token during
   training; CAFT projects the unit vector out at L. Edits are removed at evaluation. Optional variants:
   inoculation (the positive system prompt present during training on the 100% set) and a persona switch (every
   training question twice: with a trigger phrase and the positive answer, without it and the negative answer).
5. Evaluation on the trait's evaluation questions, default prompt: the shift is the change in the last prompt
   token's projection on the unit vector, per question (n = questions), with a band of `n_random` random
   directions at the vector's norm as the null; the behaviour change is the change in the judge-free trait score
   (`measures.answer_trait_score`, scored by the original model) of the fine-tuned model's greedy answers, per
   question, shown next to the score's validity check (positive vs negative system prompt answers). Perplexity
   cost: per-token NLL of held-out ShareGPT assistant turns, fine-tuned vs original.
6. Across the mix fine-tunes of all traits (n = fine-tunes): Pearson r of shift vs behaviour change and of screening
   vs shift. The headline r (fixed before the seed-1 run; `correlation`) is over per-trait standardised values, since
   each trait has its own vector norm and score scale, with a bootstrap resampling fine-tunes inside each trait and
   a null of pairs shuffled inside each trait; each trait's r and the unstandardised pooled r are given beside it.
   Shift and behaviour change are taken beyond the trait's control fine-tune (each mix's per-question change minus
   the control's, same questions, key and batch order): any fine-tune drifts the projection, by an amount that
   differs between traits, and that drift is not the trait's. Screening is already relative to the model's own
   answers (the control's data), so the control sits at 0 on every axis and is left out of n. The same correlations
   on the changes from the original model (control included) are reported beside them; without a control
   fine-tune they are the headline.
   Preventative steering's reduction is likewise 1 - (steered - control) / (plain - control), and its perplexity
   cost is the steered fine-tune's perplexity over the plain one's (issue 12's target: >= 50% cut at < 5% cost).
   Its interval is over evaluation questions, inside one training run. With `prevention_runs` R > 1 the plain
   100%, preventative and control fine-tunes are trained R times in all, under seeds seed, seed + 1, ... (each run
   its own training questions, LoRA initialisation and batch order; the vector, the evaluation questions and the
   held-out perplexity text stay fixed), and each run is one unit of an interval over runs (the variation a new
   training run would bring, which the per-question interval does not contain): the mean of the per-run reductions
   with a Student-t interval, and the ratio of means (1 - mean steered / mean plain shift beyond the control) with
   a leave-one-run-out jackknife at t values, which a run whose plain fine-tune barely moves cannot throw.
7. On the first trait's plain 100% fine-tune (`experiments.finetune.spread`, which documents both): narrow vs general
   (the same set trained with a KL penalty toward the original model at each `kl_weights`; the spread of the trait
   score change out of domain, beyond the control fine-tune) and model diffing (the SAE latents the fine-tune
   moves against those the system-prompt contrast moves).
"""
from __future__ import annotations

from experiments.finetune.config import HEADLINE_STATISTIC, KINDS, PRESETS, RAW_STATISTIC, TRIGGER, Config
from experiments.finetune.data import (Variant, build_variants, generation_system, greedy_answers,
                                       load_finetune_questions, positive_rows, response_projections, scoring_systems,
                                       training_data)
from experiments.finetune.vector import extraction_activations, persona_vector
from experiments.finetune.training import (chat_dataset, finetune_config, train, training_edits, training_key,
                                           training_steps)
from experiments.finetune.evaluation import evaluate, last_prompt_acts
from experiments.finetune.summary import (beyond_control, correlation, prevention_over_runs,
                                          prevention_pooled_target, prevention_runs_target, prevention_summaries,
                                          prevention_target, row_summary, summarize)
from experiments.finetune.trait_result import Beyond, FineTuneRow, Metrics, TraitMetrics, TraitResult, TraitRun
from experiments.finetune.pipeline import Result, beyond_training, prevention_run, run, run_trait, train_and_evaluate
from experiments.finetune.report_folder import write_report as report
from experiments.finetune.report_records import result_records as records

__all__ = ["Config", "PRESETS", "TRIGGER", "KINDS", "HEADLINE_STATISTIC", "RAW_STATISTIC", "run", "Result", "report",
           "records", "load_finetune_questions", "generation_system", "scoring_systems", "greedy_answers",
           "positive_rows", "response_projections", "training_data", "Variant", "build_variants",
           "extraction_activations", "persona_vector", "finetune_config", "training_edits", "chat_dataset",
           "training_steps", "train", "training_key", "last_prompt_acts", "evaluate", "correlation", "beyond_control",
           "summarize", "prevention_summaries", "prevention_over_runs", "row_summary", "prevention_target",
           "prevention_pooled_target", "prevention_runs_target", "run_trait", "train_and_evaluate", "prevention_run",
           "beyond_training", "TraitResult", "FineTuneRow", "TraitRun", "Metrics", "TraitMetrics", "Beyond"]
