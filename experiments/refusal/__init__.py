"""Refusal direction (after Arditi et al. 2024): difference in means, selection, ablation, weight edit.

1. Prompts: harmful / harmless instructions (psm_jax/persona/data/refusal), each as one user turn with
   the generation prompt. Training prompts (split "train", first `n_train` after a seeded shuffle)
   give the direction, validation prompts (split "val") select it, and the *next* `n_eval`
   training prompts (never used for the direction or the selection) are the held-out evaluation.
2. Refusal score: log P(S) - log(1 - P(S)) at the last prompt position, S = the first token of
   each refusal score marker with and without a leading space (`refusal_token_ids`).
   Optionally the training prompts are filtered by its sign (harmful > 0, harmless < 0).
3. Candidates: difference in means (float64) of `resid_pre` at every layer, at each
   post-instruction template position (the chat-template tokens after the user content, e.g.
   `<|im_end|>\\n<|im_start|>assistant\\n`; given as negative offsets from the prompt's end).
4. Selection per (position, layer): bypass = mean refusal score on harmful val with the unit
   direction ablated everywhere (project_out at resid_pre, attn_out and mlp_out of every layer,
   all positions); induce = mean refusal score on harmless val with +1 x the raw direction added
   at resid_pre of that layer (all positions); KL(base || ablated) at the last position on harmless
   val. Candidates at layers >= max_layer_frac * n_layers, with KL > kl_threshold or induce <
   induce_threshold are dropped; the lowest bypass wins. Directions and layer masks are traced
   inputs of one compiled forward per edit kind: no recompilation per candidate.
5. Evaluation on the held-out prompts: refusal log-odds and refusal rate (greedy generation, a
   refusal marker found anywhere in the answer) before and after ablation (and with the direction
   added on harmless prompts); cross-entropy on held-out ShareGPT assistant tokens with and without the
   ablation (interval over conversations); the max |logit difference| between runtime ablation and
   orthogonalised weights. Two nulls, each a 95% band of the drop and of the induce rise: `n_random` random unit
   directions, and `n_shuffled` difference-in-means directions at the selected position and layer with the
   harmful / harmless labels of the train prompts shuffled (the same activations and recipe, no harmfulness);
   each is ablated like the selected direction and added at its norm like it. Beside the drops, the KL each
   ablation costs on the held-out harmless prompts (the selection rule's measure), so a drop can be read against
   the damage that comes with it. Every headline's interval is a bootstrap over the held-out prompts.
6. The score's validity check: the AUROC of the unedited refusal log-odds for telling the held-out prompts (both
   sides) whose greedy answer refuses from those whose answer does not; the log-odds headlines are evidence about
   refusal only where its interval lies above 0.5 and at least 5 answers fall on each side.

The method (prompts, scores, candidates, selection, edits, nulls) is `psm_jax.persona.refusal`; this package runs it
end to end (`pipeline.run`, a module per step), and the report modules write what it found.

    psm refusal --preset quick --out runs/refusal        psm refusal positions=-1,-5 layers=4:20 n_random=0
"""
from __future__ import annotations

from experiments.refusal.config import PRESETS, Config
from experiments.refusal.prompts import PromptSets, load_prompt_sets, score_tokens, split_texts
from experiments.refusal.candidates import candidate_indices, candidate_layers
from experiments.refusal.directions import TrainPrompts, mean_diffs, sign_filter, train_prompts
from experiments.refusal.selection import Selection, select_candidate, selected_direction
from experiments.refusal.nulls import null_effects, null_units
from experiments.refusal.evaluation import (GreedyAnswers, ablation_damage, answer_validity, chat_ce_cost,
                                            conditions, greedy_answers, heldout_logodds)
from experiments.refusal.pipeline import Result, run
from experiments.refusal.report_folder import write_report as report
from experiments.refusal.report_records import result_records as records

__all__ = ["Config", "PRESETS", "run", "Result", "report", "records", "PromptSets", "split_texts", "load_prompt_sets",
           "score_tokens", "candidate_layers", "candidate_indices", "TrainPrompts", "sign_filter", "train_prompts",
           "mean_diffs", "Selection", "select_candidate", "selected_direction", "null_units", "null_effects",
           "GreedyAnswers", "conditions", "heldout_logodds", "ablation_damage", "greedy_answers", "answer_validity",
           "chat_ce_cost"]
