"""The clamp, a secondary edit: encode with the SAE, set the best latent to a multiple of its max activation, decode
and add back the reconstruction error, at every position. Unlike the add edits it cannot share a batched forward
with other rows, so its answers are generated on their own (`answers.steered_scores`) and its perplexity cost is
measured here."""
from __future__ import annotations

import numpy as np

from experiments.feature_steering.config import Config
from experiments.feature_steering.scores import paired_unit_effect
from experiments.feature_steering.strength import PerplexityDocs
from experiments.feature_steering.trait_result import ClampEffect
from psm_jax import edits as E
from psm_jax.persona import measures
from sae import features as F


def clamp_edit(model, sae: F.FeatureSae, latent: int, value: float) -> E.SaeLatent:
    """Encode, set latent `latent` to `value`, decode, add back the reconstruction error (every position)."""
    return E.sae_latent(model.config, latent=int(latent), value=float(value), layers=[sae.layer], mode="clamp",
                        **sae.edit_kwargs())


def clamp_edits(model, sae: F.FeatureSae, latent: int, max_act: float, cfg: Config) -> list[E.SaeLatent]:
    """One clamp of `latent` per `cfg.clamp_multiples`, at that multiple of its max activation."""
    return [clamp_edit(model, sae, latent, m * max_act) for m in cfg.clamp_multiples]


def clamp_effects(model, edits: list[E.SaeLatent], max_act: float, clamped_scores: np.ndarray, base: np.ndarray,
                  ppl: PerplexityDocs, cfg: Config) -> list[ClampEffect]:
    """Per clamp multiple m (`edits` from `clamp_edits`, `clamped_scores` [multiples, questions] the scores of their
    answers): the clamped value, its perplexity ratio and its trait-score effect."""
    if not cfg.clamp_multiples:
        return []
    bs = cfg.batch_size
    nll0 = measures.answer_nll(model, *ppl, batch_size=bs)
    out = []
    for m, edit, scores in zip(cfg.clamp_multiples, edits, clamped_scores):
        nll = measures.answer_nll(model, *ppl, edits_fn=lambda batch, e=edit: (e,), batch_size=bs)
        out.append({"multiple": float(m), "value": m * max_act, "ppl_ratio": float(np.exp(nll - nll0)),
                    "effect": paired_unit_effect(scores, base, cfg.seed)})
    return out
