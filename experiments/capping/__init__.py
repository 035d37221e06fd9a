"""Activation capping along the Assistant Axis (after Lu et al. 2026): does a floor on the axis projection keep
the model in its Assistant persona under role prompts and persona jailbreaks, and at what capability cost?

The method (`psm_jax.persona.capping`): tau_l = the `percentile`-th percentile (default 25th) of <h_l, u_l> over the
assistant content tokens of default-prompt rollouts, for each layer l in a range (default about 60-85% depth),
u_l = axis_l / |axis_l|, h_l the block output (resid_post); the cap is a floor at tau_l (`form="floor"`) or the
paper's equivalent ceiling on -u_l (`form="ceiling"`), at every position (`positions="all"`, the paper) or on
assistant tokens only (prompt assistant turns + generated tokens).

Evaluation, each with and without capping (greedy decoding; log-prob measures need no judge):
  * role-inducing system prompts (held-out roles, a held-out instruction): axis projection of the
    model's own answers at every layer; identity probes answered as the assistant (keyword scorer on
    greedy answers; log P("I am an AI assistant.") - log P("I am a <role>.")); trait behavioural items
    (log-odds of the trait choice) against the default-prompt baseline;
  * long scripted role-play conversations: identity log-odds after k = 0..n scripted exchanges,
    per-turn axis projection of the scripted replies, identity answers at the end;
  * persona-jailbreak prompts (data/jailbreak): a persona set-up plus a mild request. Identity = per-token
    log P(the Assistant's self-description) - log P(the persona's), compliance = per-token log P(a compliant
    opening) - log P(a declining one), answers length-matched. Each measure's validity check compares the
    Assistant's default prompt with the persona prompt (no capping). Capping's shift (capped minus uncapped,
    paired over prompts, 95% bootstrap) is set against a band of caps along >= 20 random directions at the same
    percentile thresholds;
  * cost: perplexity on ShareGPT assistant turns (percent change) and accuracy on held-out four-option questions
    (data/capability/qa.json, answered by likelihood in the cloze form, `measures.multiple_choice`; paired
    bootstrap of the change; chance 25%). The accuracy change counts as a capability cost only where the
    uncapped accuracy's 95% interval lies above chance on the model (`qa["valid"]`; flagged otherwise).

Trait two-choice items count as evidence only where their validity check, re-run here on the items used, passes;
the table shows it next to the stored per-model check (`Trait.items_are_evidence`, benchmarks/trait_items_validity.py).

    psm capping axis_file=reports/assistant_axis/axis.safetensors layers=18:26 percentile=25 --out runs/capping
    psm capping --preset quick axis_file=none --out runs/capping_quick    # estimates a small axis itself
"""
from __future__ import annotations

from experiments.capping.config import PRESETS, Config
from experiments.capping.thresholds import Thresholds, capped_layers, load_axis, threshold_step
from experiments.capping.identity import (IdentityAnswers, held_out_roles, identity_answers, identity_logodds,
                                          keyword_rate, logodds, projections_by_layer)
from experiments.capping.behaviour import TraitBehaviour, trait_behaviour, trait_items_check
from experiments.capping.roleplay import RolePlay, roleplay_step
from experiments.capping.jailbreak import Jailbreaks, jailbreak_step, jailbreak_summary, run_jailbreaks
from experiments.capping.capability import perplexity_cost, qa_cost, qa_step
from experiments.capping.summary import identity_gain_ci, metrics
from experiments.capping.pipeline import Result, run
from experiments.capping.report_folder import write_report as report
from experiments.capping.report_records import result_records as records
from psm_jax.persona.prompts import role_phrase  # the "{role}" phrasing of the persona answers

__all__ = ["Config", "PRESETS", "run", "Result", "report", "records", "Thresholds", "load_axis", "capped_layers",
           "threshold_step", "held_out_roles", "IdentityAnswers", "identity_answers", "keyword_rate",
           "projections_by_layer", "logodds", "identity_logodds", "trait_items_check", "TraitBehaviour",
           "trait_behaviour", "RolePlay", "roleplay_step", "Jailbreaks", "jailbreak_summary", "run_jailbreaks",
           "jailbreak_step", "qa_cost", "qa_step", "perplexity_cost",
           "identity_gain_ci", "metrics", "role_phrase"]
