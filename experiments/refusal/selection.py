"""The selection: every candidate's bypass, induce and KL on the val prompts, the selection rules with their
pre-declared fallback, and the winner as the raw difference in means (added) and its unit vector (ablated)."""
from __future__ import annotations

import dataclasses

import numpy as np

from experiments.refusal.config import Config
from experiments.refusal.prompts import PromptSets
from psm_jax.persona.refusal import evaluate_candidates, refusal_scores, select_with_fallback


@dataclasses.dataclass(frozen=True)
class Selection:
    """The selected candidate, every candidate's scores and the unedited val means the rules read."""

    selected: dict  # the winner's row: position, layer, bypass, induce, kl, norm, offset, token
    candidate_scores: list[dict]  # every candidate's row, annotated by the strict rules (kept, reason)
    tier: str  # "strict", or the fallback tier that found the winner
    harmful_val_logodds: float  # mean unedited refusal log-odds on the val prompts
    harmless_val_logodds: float


def _select(cfg: Config, scores: list[dict], sets: PromptSets, n_layers: int,
            harmless_baseline: float) -> tuple[dict, list[dict], str]:
    """The candidate scores labelled with their offset and template token, then the selection rules with the
    pre-declared fallback; a run where no candidate passes stops here."""
    labelled = [dict(s, offset=int(sets.offsets[s["position"]]), token=sets.position_tokens[s["position"]])
                for s in scores]
    best, annotated, tier = select_with_fallback(
        labelled, n_layers, harmless_baseline=harmless_baseline, max_layer_frac=cfg.max_layer_frac,
        kl_threshold=cfg.kl_threshold, induce_threshold=cfg.induce_threshold, fallback=cfg.fallback)
    if best is None:
        raise RuntimeError("no candidate direction passes the selection filters (see the scores); "
                           "widen the candidates or enable the fallback")
    return best, annotated, tier


def select_candidate(cfg: Config, model, mean_diffs: np.ndarray, indices: list[tuple[int, int]], sets: PromptSets,
                     token_ids: list[int], base: tuple, progress: bool) -> Selection:
    """Scores every candidate on the val prompts and applies the rules, the harmless val mean being the baseline
    of the first fallback tier."""
    params, mc, bs = model.params, model.config, cfg.batch_size
    scores = evaluate_candidates(params, mc, mean_diffs, indices, sets.val_harmful, sets.val_harmless, token_ids, bs,
                                 progress=progress)
    harmless = float(refusal_scores(params, mc, sets.val_harmless, token_ids, base, bs).mean())
    harmful = float(refusal_scores(params, mc, sets.val_harmful, token_ids, base, bs).mean())
    best, annotated, tier = _select(cfg, scores, sets, mc.n_layers, harmless)
    return Selection(selected=best, candidate_scores=annotated, tier=tier, harmful_val_logodds=harmful,
                     harmless_val_logodds=harmless)


def selected_direction(mean_diffs: np.ndarray, selected: dict) -> tuple[np.ndarray, np.ndarray]:
    """The winning difference in means (float64) and its unit vector: the raw one is added, the unit one ablated."""
    direction = np.asarray(mean_diffs[selected["position"], selected["layer"]], np.float64)
    return direction, direction / np.linalg.norm(direction)
