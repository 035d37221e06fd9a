"""The feature-steering study's knobs (`Config`, defaults = the full run) and its named sizes (`PRESETS`). The
strength grid, the perplexity ceiling and the size of the random band are fixed here, before any effect is seen."""
from __future__ import annotations

import dataclasses

from psm_jax.persona.stats import MIN_NULL_DRAWS

RANKINGS = ("contrast", "specific")


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m-instruct"
    features: str = "reports/persona_features"  # output folder of `psm features`
    sae: str | None = None  # override the SAE location recorded in candidates.json
    traits: tuple[str, ...] | None = None  # None: every trait in candidates.json
    n_latents: int = 3  # top persona latents steered: the features run's best, then its other candidates
    ranking: str = "contrast"  # the features run's ranking: "contrast" (d of pos vs neg) or "specific" (its margin)
    strengths: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4, 0.8)  # x typical residual norm, candidates for the ppl match
    max_ppl_ratio: float = 1.5
    n_random: int = 24  # random directions in the null band (>= 20)
    clamp_multiples: tuple[float, ...] = (0.0, 4.0)  # x the latent's max activation (0 ablates it); () for none
    n_questions: int = 20  # evaluation questions (every packaged one): the independent units
    max_new_tokens: int = 32
    n_ppl_docs: int = 8  # held-out ShareGPT conversations for the perplexity ratio
    ppl_max_chars: int = 600
    batch_size: int = 32
    two_choice: bool = True  # the two-choice items as a secondary measure (their validity, effects and band)
    seed: int = 0

    def __post_init__(self):
        if not self.strengths or any(not s > 0 for s in self.strengths):
            raise ValueError(f"strengths={self.strengths}; expected one or more positive values")
        if self.n_random < MIN_NULL_DRAWS:
            raise ValueError(f"n_random={self.n_random}; expected >= {MIN_NULL_DRAWS} (a null band)")
        for name in ("n_latents", "n_questions", "max_new_tokens", "n_ppl_docs", "ppl_max_chars", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected a positive integer")
        if self.n_questions < 2:
            raise ValueError(f"n_questions={self.n_questions}; expected >= 2 (an interval over questions)")
        if self.ranking not in RANKINGS:
            raise ValueError(f"ranking={self.ranking!r}; expected one of {RANKINGS}")
        if not self.max_ppl_ratio > 1:
            raise ValueError(f"max_ppl_ratio={self.max_ppl_ratio}; expected > 1")


PRESETS = {
    "ci": dict(n_latents=1, strengths=(0.5,), n_random=20, clamp_multiples=(), n_questions=2, max_new_tokens=6,
               n_ppl_docs=2, ppl_max_chars=200, batch_size=16, two_choice=False),
    # the main job: the features run's best latent per trait (the headline), the persona vector and the 20-direction
    # band; the clamp (a secondary edit), the two-choice items (a secondary measure whose band costs one forward over
    # every item per random direction) and the other candidates are in `full`
    "quick": dict(n_latents=1, strengths=(0.1, 0.2, 0.4), n_random=20, clamp_multiples=(), n_questions=4,
                  max_new_tokens=16, n_ppl_docs=4, ppl_max_chars=400, batch_size=48, two_choice=False),
    "full": {},
}
