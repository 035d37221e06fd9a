"""The selection: every candidate's bypass, induce and KL on the val prompts, then either the selection rules with
their pre-declared fallback or the rule calibrated against damage (random directions ablated on the same val
prompts), and the winner as the raw difference in means (added) and its unit vector (ablated)."""
from __future__ import annotations

import dataclasses

import numpy as np

from experiments.refusal.config import Config
from experiments.refusal.prompts import PromptSets
from psm_jax.persona.directions import random_directions
from psm_jax.persona.refusal import (ablation_nulls, evaluate_candidates, last_logits, refusal_scores,
                                     select_matched_damage, select_with_fallback)


@dataclasses.dataclass(frozen=True)
class Selection:
    """The selected candidate, every candidate's scores and the unedited val means the rules read."""

    selected: dict  # the winner's row: position, layer, bypass, induce, kl, norm, offset, token
    candidate_scores: list[dict]  # every candidate's row, annotated by the configured rule (kept, reason)
    tier: str  # "strict", the fallback tier that found the winner, or "matched_damage"
    harmful_val_logodds: float  # mean unedited refusal log-odds on the val prompts
    harmless_val_logodds: float
    selection_nulls: dict[str, np.ndarray] | None = None  # matched_damage: the random directions' val drops, kls


def _select(cfg: Config, scores: list[dict], sets: PromptSets, n_layers: int, harmful_baseline: float,
            harmless_baseline: float, nulls: dict | None) -> tuple[dict, list[dict], str]:
    """The candidate scores labelled with their offset and template token, then the configured rule (the selection
    rules with the pre-declared fallback, or the matched-damage rule on `nulls`); a run where no candidate passes
    stops here."""
    labelled = [dict(s, offset=int(sets.offsets[s["position"]]), token=sets.position_tokens[s["position"]])
                for s in scores]
    if cfg.selection_rule == "matched_damage":
        best, annotated = select_matched_damage(
            labelled, n_layers, null_drops=nulls["drops"], null_kls=nulls["kls"], harmful_baseline=harmful_baseline,
            harmless_baseline=harmless_baseline, max_layer_frac=cfg.max_layer_frac)
        tier = "matched_damage"
    else:
        best, annotated, tier = select_with_fallback(
            labelled, n_layers, harmless_baseline=harmless_baseline, max_layer_frac=cfg.max_layer_frac,
            kl_threshold=cfg.kl_threshold, induce_threshold=cfg.induce_threshold, fallback=cfg.fallback)
    if best is None:
        raise RuntimeError(f"no candidate direction passes the {cfg.selection_rule!r} selection filters (see the "
                           "scores); widen the candidates, enable the fallback or add null directions")
    return best, annotated, tier


def selection_nulls(cfg: Config, model, sets: PromptSets, token_ids: list[int], base: tuple,
                    harmful_baseline: float) -> dict[str, np.ndarray] | None:
    """The matched-damage rule's null: `n_random_selection` random unit directions (key seed + 3, apart from the
    held-out nulls' seed + 1) ablated on the val prompts, their drops and KLs; None under the fixed rules."""
    if cfg.selection_rule != "matched_damage":
        return None
    params, mc = model.params, model.config
    units = random_directions(cfg.seed + 3, cfg.n_random_selection, mc.d_model, 1.0)
    logits = last_logits(params, mc, sets.val_harmless, base, cfg.batch_size)
    return ablation_nulls(params, mc, units, sets.val_harmful, sets.val_harmless, token_ids,
                          harmful_base=harmful_baseline, batch_size=cfg.batch_size, harmless_logits=logits)


def select_candidate(cfg: Config, model, mean_diffs: np.ndarray, indices: list[tuple[int, int]], sets: PromptSets,
                     token_ids: list[int], base: tuple, progress: bool) -> Selection:
    """Scores every candidate on the val prompts and applies the rules, the harmless val mean being the baseline
    of the first fallback tier."""
    params, mc, bs = model.params, model.config, cfg.batch_size
    scores = evaluate_candidates(params, mc, mean_diffs, indices, sets.val_harmful, sets.val_harmless, token_ids, bs,
                                 progress=progress)
    harmless = float(refusal_scores(params, mc, sets.val_harmless, token_ids, base, bs).mean())
    harmful = float(refusal_scores(params, mc, sets.val_harmful, token_ids, base, bs).mean())
    nulls = selection_nulls(cfg, model, sets, token_ids, base, harmful)
    best, annotated, tier = _select(cfg, scores, sets, mc.n_layers, harmful, harmless, nulls)
    return Selection(selected=best, candidate_scores=annotated, tier=tier, harmful_val_logodds=harmful,
                     harmless_val_logodds=harmless, selection_nulls=nulls)


def selected_direction(mean_diffs: np.ndarray, selected: dict) -> tuple[np.ndarray, np.ndarray]:
    """The winning difference in means (float64) and its unit vector: the raw one is added, the unit one ablated."""
    direction = np.asarray(mean_diffs[selected["position"], selected["layer"]], np.float64)
    return direction, direction / np.linalg.norm(direction)
