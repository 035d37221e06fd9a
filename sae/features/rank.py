"""Rankings of SAE latents (each a `LatentRanking`: a score per latent, higher = more relevant, plus named columns).

* `contrast(a, b)` - activation contrast between two conversation sets (e.g. trait-positive vs
  trait-negative system prompts, role prompts vs default prompts) on the selected tokens
  (default: assistant content tokens). The unit of analysis is the *conversation*: each
  conversation contributes its mean latent activation over its selected tokens, so the effect size
  is not inflated by the (correlated) tokens of one response. Columns: mean_a, mean_b, mean_diff
  (mean over conversations of the per-conversation means, a - b), cohens_d (mean_diff / pooled
  standard deviation of the per-conversation means, ddof=1; 0 where both are constant), fire_a,
  fire_b, fire_diff (token-pooled firing rates: tokens with f > 0 / selected tokens, a - b).
  `by` picks the score: "cohens_d" (default), "mean_diff" or "fire_diff".
* `rank_by_cosine(W_dec, direction)` - cosine of each decoder row with a direction living at the
  SAE's site and layer (a persona vector, the Assistant Axis). `sign=-1` ranks the most negative
  first (e.g. latents pointing away from the Assistant end of the axis).
* `model_diff(...)` - model diffing (Wang et al. 2025): the mean latent activation on a prompt set
  under the original model vs an edited one (psm_jax edits via `edits_fn(batch)`) or another
  parameter set of the same architecture (`params_b`, e.g. a fine-tuned copy), teacher-forced on the
  same tokens. Columns: mean_a (original), mean_b (edited), diff = b - a, fire_a, fire_b, fire_diff.
  An edit at the SAE's own site and layer is applied before the SAE reads the activation.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from psm_jax.chat import Role
from psm_jax.persona.stats import cohens_d
from sae.features.collect import ConversationStats, FeatureSae, collect

CRITERIA = ("cohens_d", "mean_diff", "fire_diff")

# ------------------------------------------------------------------------------------------- rankings


@dataclasses.dataclass
class LatentRanking:
    """A relevance score per latent (higher = more relevant) and named per-latent columns."""

    criterion: str
    scores: np.ndarray  # [S]
    columns: dict[str, np.ndarray]

    def order(self) -> np.ndarray:
        """Latent ids by descending score (NaN last, ties by id)."""
        s = np.where(np.isfinite(self.scores), self.scores, -np.inf)
        return np.lexsort((np.arange(len(s)), -s))

    def top(self, n: int) -> list[dict]:
        rows = []
        for rank, lat in enumerate(self.order()[:n]):
            row = {"latent": int(lat), "rank": rank, "score": float(self.scores[lat])}
            row.update({k: float(v[lat]) for k, v in self.columns.items()})
            rows.append(row)
        return rows

    def rank_of(self, latent: int) -> int:
        return int(np.flatnonzero(self.order() == int(latent))[0])


def contrast(a: ConversationStats, b: ConversationStats, *, by: str = "cohens_d") -> LatentRanking:
    """Rank latents by how much more they fire on conversations `a` than on `b` (selected tokens)."""
    if by not in CRITERIA:
        raise ValueError(f"by={by!r}; expected one of {CRITERIA}")
    a, b = a.valid(), b.valid()
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"contrast needs >= 2 conversations with selected tokens per side; got {len(a)} and {len(b)}")
    if a.mean.shape[1] != b.mean.shape[1]:
        raise ValueError(f"the two sides have {a.mean.shape[1]} and {b.mean.shape[1]} latents; expected equal")
    mean_a, mean_b = a.mean.astype(np.float64).mean(0), b.mean.astype(np.float64).mean(0)
    fire_a = (a.fire.astype(np.float64) * a.n[:, None]).sum(0) / a.n.sum()
    fire_b = (b.fire.astype(np.float64) * b.n[:, None]).sum(0) / b.n.sum()
    cols = {"mean_a": mean_a, "mean_b": mean_b, "mean_diff": mean_a - mean_b, "cohens_d": cohens_d(a.mean, b.mean),
            "fire_a": fire_a, "fire_b": fire_b, "fire_diff": fire_a - fire_b}
    return LatentRanking(criterion=by, scores=cols[by].copy(), columns=cols)


def decoder_cosine(W_dec, direction) -> np.ndarray:
    """cos(W_dec[i], direction) for every latent: [S]."""
    W = np.asarray(W_dec, np.float64)
    v = np.asarray(direction, np.float64).reshape(-1)
    if W.ndim != 2 or W.shape[1] != v.shape[0]:
        raise ValueError(f"W_dec has shape {W.shape} and the direction width {v.shape[0]}; expected [S, {v.shape[0]}]")
    nv = np.linalg.norm(v)
    if nv == 0:
        raise ValueError("the direction has zero norm; expected a non-zero vector")
    return (W @ v) / (np.maximum(np.linalg.norm(W, axis=1), 1e-12) * nv)


def rank_by_cosine(W_dec, direction, *, sign: int = 1) -> LatentRanking:
    """Latents whose decoder rows point along `direction` (sign=+1) or against it (sign=-1)."""
    if sign not in (1, -1):
        raise ValueError(f"sign={sign}; expected +1 or -1")
    cos = decoder_cosine(W_dec, direction)
    return LatentRanking(criterion="cosine" if sign > 0 else "-cosine", scores=sign * cos, columns={"cosine": cos})


def model_diff(model, sae: FeatureSae, documents: Sequence, *, edits_fn=None, params_b=None,
               select_roles: Sequence[int] = (Role.ASSISTANT,), by: str = "diff", batch_size: int = 8,
               max_len: int = 512, progress: bool = False) -> LatentRanking:
    """Mean latent activation on `documents` (selected tokens, teacher-forced) under the original
    model (a) vs the edited model (b: `edits_fn` and/or `params_b`). by: "diff" (b - a, increases
    first), "abs_diff" or "cohens_d" (unpaired, over conversations)."""
    if edits_fn is None and params_b is None:
        raise ValueError("model_diff needs edits_fn and/or params_b (the edited or fine-tuned model)")
    if by not in ("diff", "abs_diff", "cohens_d"):
        raise ValueError(f"by={by!r}; expected 'diff', 'abs_diff' or 'cohens_d'")
    kw = dict(select_roles=select_roles, batch_size=batch_size, max_len=max_len, progress=progress)
    a = collect(model, sae, documents, **kw).conv.valid()
    b = collect(model, sae, documents, edits_fn=edits_fn, params=params_b, **kw).conv.valid()
    if len(a) == 0:
        raise ValueError("no document has selected tokens (check select_roles)")
    mean_a, mean_b = a.mean.astype(np.float64).mean(0), b.mean.astype(np.float64).mean(0)
    fire_a = (a.fire.astype(np.float64) * a.n[:, None]).sum(0) / a.n.sum()
    fire_b = (b.fire.astype(np.float64) * b.n[:, None]).sum(0) / b.n.sum()
    cols = {"mean_a": mean_a, "mean_b": mean_b, "diff": mean_b - mean_a, "fire_a": fire_a, "fire_b": fire_b,
            "fire_diff": fire_b - fire_a}
    if len(a) >= 2:
        cols["cohens_d"] = cohens_d(b.mean, a.mean)
    elif by == "cohens_d":
        raise ValueError("by='cohens_d' needs >= 2 documents with selected tokens")
    scores = {"diff": cols["diff"], "abs_diff": np.abs(cols["diff"])}.get(by, cols.get("cohens_d"))
    return LatentRanking(criterion=by, scores=np.asarray(scores, np.float64).copy(), columns=cols)
