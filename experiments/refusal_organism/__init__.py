"""A refusal model organism: the model LoRA-tuned to decline harmful requests, so that refusal-direction methods can
be tested on a model that refuses.

A small instruct model may barely refuse (SmolLM2-135M-Instruct declines about 6% of the refusal study's harmful
prompts), and then ablating a refusal direction has nothing to remove: the study's ablation result is a capability
null. This study builds a model with a known, trained-in refusal, as safety fine-tuning gives real chat models:

- harmful requests (`psm_jax/persona/data/refusal/organism.json`, disjoint from the refusal study's sets) answered
  with one of the file's refusal answers;
- harmless requests of the same form (the file's `harmless` list) and short ShareGPT requests, answered with the
  model's own greedy answers, so that the fine-tune teaches what to refuse rather than how a request looks, and
  moves the rest of the model little. An answer cut at `answer_tokens` is trained without its end-of-turn token, so
  the fine-tune does not teach the model to stop there.

It reports the refusal rates before and after on requests the fine-tune never saw (the organism file's `val` splits
and the refusal study's harmful and harmless `val` prompts), each with a 95% interval over prompts, and the
fine-tune's cross-entropy change on held-out ShareGPT chats. The report folder holds the merged model as an HF folder
(`model/`), which `psm refusal model=<folder>/model` then studies.

Modules: `config` (settings, presets), `training` (the training set and the LoRA fine-tune), `evaluation` (rates
on unseen requests and the organism's check), `pipeline` (`run`, `Result`), and the report in `report_text`,
`report_figures`, `report_folder` and `report_records`.

    psm refusal-organism seed=1 --out reports/refusal_organism_seed1
"""
from __future__ import annotations

from experiments.refusal_organism.config import PRESETS, Config
from experiments.refusal_organism.evaluation import (CHECKED_SETS, EVAL_SETS, HARMFUL_SETS, MAX_HARMLESS_RATE,
                                                     MIN_HARMFUL_RATE, eval_sets, rate_with_interval, refuses)
from experiments.refusal_organism.training import HARMLESS_SKIP, finetune_organism, training_conversations
from experiments.refusal_organism.pipeline import Result, run
from experiments.refusal_organism.report_folder import write_report as report
from experiments.refusal_organism.report_records import result_records as records

__all__ = ["Config", "PRESETS", "run", "Result", "report", "records", "training_conversations", "finetune_organism",
           "HARMLESS_SKIP", "eval_sets", "rate_with_interval", "refuses", "EVAL_SETS", "HARMFUL_SETS", "CHECKED_SETS",
           "MIN_HARMFUL_RATE", "MAX_HARMLESS_RATE"]
