"""The strength unit and the perplexity match: the typical residual norm at the SAE's layer on held-out ShareGPT
answers, each direction's perplexity ratio over the strength grid, and the one strength per trait at which both the
best latent and the persona vector stay under the ceiling. Matching the cost keeps a latent from looking strong only
because it was pushed harder than the vector."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from psm_jax.persona import measures
from psm_jax.persona.directions import typical_norms
from psm_jax.persona.steering import perplexity_ratios

# (prompts ending with a user turn, the assistant answers that follow them)
PerplexityDocs = tuple[list[list[dict]], list[str]]


def ppl_docs(n: int, seed: int, max_chars: int) -> PerplexityDocs:
    """(prompts, answers) of `n` held-out ShareGPT exchanges: a user turn and the assistant's reply."""
    from experiments.sharegpt import sharegpt_conversations

    convs = sharegpt_conversations(n, seed=seed + 7919, max_messages=2, max_chars=max_chars, min_assistant_turns=1)
    return [c[:-1] for c in convs], [c[-1]["content"] for c in convs]


def typical_residual_norm(model, ppl: PerplexityDocs, layer: int, batch_size: int) -> float:
    """The mean per-token residual norm at `layer` over the answers of `ppl`: the unit every strength is read in."""
    convs = [p + [{"role": "assistant", "content": a}] for p, a in zip(*ppl)]
    return float(typical_norms(model, convs, batch_size=measures.even_batch(len(ppl[0]), batch_size))[layer])


@dataclasses.dataclass(frozen=True)
class StrengthMatch:
    """A trait's strength grid, every direction's perplexity ratio over it and the strength matched on it."""

    strengths: list[float]  # the grid, ascending
    ratios: np.ndarray  # [directions, strengths]
    strength: float  # the matched strength (`common_strength`)
    within_ceiling: bool  # whether the compared directions stay under the ceiling there

    def ratio_at_match(self, k: int) -> float:
        """Direction k's perplexity ratio at the matched strength."""
        return float(self.ratios[k][self.strengths.index(self.strength)])


def match_strength(model, units: dict[str, np.ndarray], compared: tuple[str, str], norm: float, ppl: PerplexityDocs,
                   layer: int, cfg) -> StrengthMatch:
    """Every unit direction's perplexity ratio over the sorted `cfg.strengths` (x `norm`), and the largest strength
    at which both `compared` directions (the best latent and the persona vector) stay within `cfg.max_ppl_ratio`."""
    strengths = sorted(cfg.strengths)
    ratios = strength_grid_ratios(model, units, strengths, norm, ppl, layer, cfg.batch_size)
    names = list(units)
    pick = common_strength(strengths, ratios[[names.index(n) for n in compared]], cfg.max_ppl_ratio)
    return StrengthMatch(strengths=strengths, ratios=ratios, strength=pick["strength"],
                         within_ceiling=pick["within_ceiling"])


def strength_grid_ratios(model, units: dict[str, np.ndarray], strengths: Sequence[float], norm: float,
                         ppl: PerplexityDocs, layer: int, batch_size: int) -> np.ndarray:
    """The perplexity ratio of every unit direction at every strength (x `norm`), one batched pass: [K, S], rows in
    the order of `units`, columns in the order of `strengths`."""
    grid = np.stack([u * s * norm for u in units.values() for s in strengths])
    ratios = perplexity_ratios(model, *ppl, grid, layer, batch_size=batch_size)
    return ratios.reshape(len(units), len(strengths))


def common_strength(strengths: Sequence[float], ratios: np.ndarray, max_ratio: float) -> dict:
    """The largest strength at which every compared direction's perplexity ratio (rows of `ratios` [K, S], columns
    in the order of `strengths`) is <= max_ratio; else the smallest strength, with `within_ceiling` False."""
    s, r = np.asarray(strengths, np.float64), np.atleast_2d(np.asarray(ratios, np.float64))
    if r.shape[1] != s.size:
        raise ValueError(f"ratios have {r.shape[1]} columns for {s.size} strengths; expected one per strength")
    ok = np.flatnonzero(np.all(np.isfinite(r) & (r <= max_ratio), axis=0))
    i = int(ok[np.argmax(s[ok])]) if ok.size else int(np.argmin(s))
    return {"strength": float(s[i]), "ppl_ratios": r[:, i].tolist(), "within_ceiling": bool(ok.size)}
