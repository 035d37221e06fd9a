"""The difference in means: the train prompts the model already scores on their side's sign (the score-sign
filter, with its fallback to the unfiltered side), and the candidate directions computed from them."""
from __future__ import annotations

import dataclasses

import numpy as np

from experiments.refusal.config import Config
from experiments.refusal.prompts import PromptSets
from psm_jax.persona.refusal import Prompts, mean_diff_directions, refusal_scores


@dataclasses.dataclass(frozen=True)
class TrainPrompts:
    """The train prompts the difference in means uses, and the filter's counts the report shows."""

    harmful: Prompts
    harmless: Prompts
    filtering: dict[str, int | bool]  # *_before, *_passing, *_unfiltered_fallback, *_after per side


def sign_filter(cfg: Config, harmful_scores: np.ndarray,
                harmless_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, int | bool]]:
    """Indices of the train prompts kept for the difference in means (with `filter_train`: the ones the model
    already scores on their side's sign) and the counts the report shows."""
    filt = {"harmful_before": len(harmful_scores), "harmless_before": len(harmless_scores)}
    keep_h, keep_s = np.arange(len(harmful_scores)), np.arange(len(harmless_scores))
    if cfg.filter_train:
        kh, ks = np.flatnonzero(harmful_scores > 0), np.flatnonzero(harmless_scores < 0)
        filt["harmful_passing"], filt["harmless_passing"] = len(kh), len(ks)
        filt["harmful_unfiltered_fallback"] = bool(len(kh) < cfg.min_filtered)
        filt["harmless_unfiltered_fallback"] = bool(len(ks) < cfg.min_filtered)
        keep_h = kh if len(kh) >= cfg.min_filtered else keep_h
        keep_s = ks if len(ks) >= cfg.min_filtered else keep_s
    filt["harmful_after"], filt["harmless_after"] = len(keep_h), len(keep_s)
    return keep_h, keep_s, filt


def train_prompts(cfg: Config, model, sets: PromptSets, token_ids: list[int], base: tuple) -> TrainPrompts:
    """The train prompts after the score-sign filter, scored unedited (`base`: every edit switched off)."""
    params, mc, bs = model.params, model.config, cfg.batch_size
    keep_h, keep_s, filtering = sign_filter(cfg, refusal_scores(params, mc, sets.train_harmful, token_ids, base, bs),
                                            refusal_scores(params, mc, sets.train_harmless, token_ids, base, bs))
    return TrainPrompts(sets.train_harmful.subset(keep_h), sets.train_harmless.subset(keep_s), filtering)


def mean_diffs(cfg: Config, model, train: TrainPrompts, offsets: np.ndarray, progress: bool) -> np.ndarray:
    """mean(harmful) - mean(harmless) of resid_pre at every post-instruction offset and layer, float64
    [position, layer, d_model]: every candidate direction, and the saved table of them."""
    return mean_diff_directions(model.params, model.config, train.harmful, train.harmless, offsets, cfg.batch_size,
                                progress=progress)
