"""The persona-vectors study's knobs: `Config` (checked when built, so a bad value fails before any model loads)
and `PRESETS`, the named sizes `psm persona-vectors --preset` and `psm quickstart` pick from."""
from __future__ import annotations

import dataclasses


MEASURE_KEYS = (("items", "steering"), ("response_likelihood", "response"))  # measure name, key in a trait's result


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m-instruct"
    traits: tuple[str, ...] = ("evil", "sycophantic", "humorous")  # shipped names or paths to trait files
    n_pairs: int = 5  # instruction pairs used (of 5)
    n_questions: int = 20  # extraction questions used (of 20); the questions are the units of the vectors' reliability
    n_samples: int = 1  # samples per (pair, question, polarity)
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16
    judge: str = "local"  # local | openai | none
    judge_answer_prefix: str = "Score: "  # local judge: start of its reply, so that a small model answers with a number
    filter: bool = True
    trait_threshold: float = 50.0
    coherence_threshold: float = 50.0
    min_kept_pairs: int = 4  # fewer kept pairs -> use all pairs (reported)
    sweep_layers: tuple[int, ...] | None = None  # None: 5 layers from 20% to 80% depth
    coef_unit: str = "vector"  # "vector": c = 1 adds the raw persona vector; "residual": a typical residual norm
    select_coef: float = 2.0  # layer selection: m(+c) - m(-c) on the selection items
    coefficients: tuple[float, ...] = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)
    n_random: int = 20  # random directions at the steered vector's norm (the null band needs >= 20)
    band_measures: tuple[str, ...] = ("items", "response_likelihood")  # measures whose curve gets the random band
    max_ppl_ratio: float = 1.5  # fluency ceiling of the headline criterion (perplexity of the model's own answers)
    specificity_coef: float = 2.0  # specificity matrix: m(+c) - m(-c) of trait i's vector at its chosen layer
    n_monitor_questions: int = 10  # evaluation questions per system prompt for monitoring
    monitor_max_new_tokens: int = 32
    n_steer_examples: int = 2  # evaluation questions shown steered
    steer_example_coefs: tuple[float, ...] = (-2.0, 0.0, 2.0)
    screening: bool = True
    # second behavioural measure: contrastive likelihood of the model's own pos/neg-prompted answers (package doc)
    response_measure: bool = True
    n_response_questions: int = 20  # evaluation questions (first n); split alternately into selection / held-out
    n_response_pairs: int = 1  # instruction pairs per question; question q uses pairs (q + k) % 5, k < n
    response_max_new_tokens: int = 32  # length of the greedy reference answers
    holdout_monitoring: bool = True  # monitoring also on the trait's held-out graded prompts (`monitor_holdout`)
    seed: int = 0

    def __post_init__(self):
        if not self.traits:
            raise ValueError("traits is empty; expected at least one trait name or path")
        for name in ("n_pairs", "n_questions", "n_samples", "max_new_tokens", "batch_size", "n_monitor_questions"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected a positive integer")
        if self.n_pairs > 5:
            raise ValueError(f"n_pairs={self.n_pairs}; a trait has 5 instruction pairs")
        if self.coef_unit not in ("vector", "residual"):
            raise ValueError(f"coef_unit={self.coef_unit!r}; expected 'vector' or 'residual'")
        if self.n_random < 1:
            raise ValueError(f"n_random={self.n_random}; expected >= 1 random direction")
        unknown = set(self.band_measures) - {name for name, _ in MEASURE_KEYS}
        if unknown:
            raise ValueError(f"band_measures={self.band_measures}; {sorted(unknown)} not among "
                             f"{[name for name, _ in MEASURE_KEYS]}")
        if not self.max_ppl_ratio > 1:
            raise ValueError(f"max_ppl_ratio={self.max_ppl_ratio}; expected a perplexity ratio ceiling > 1")
        if self.specificity_coef == 0:
            raise ValueError(f"specificity_coef={self.specificity_coef}; expected a non-zero steering coefficient")
        if self.judge not in ("local", "openai", "none"):
            raise ValueError(f"judge={self.judge!r}; expected 'local', 'openai' or 'none'")
        if 0.0 not in self.coefficients or not any(c < 0 for c in self.coefficients) \
                or not any(c > 0 for c in self.coefficients):
            raise ValueError(f"coefficients={self.coefficients}; expected 0 and values of both signs")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}; expected >= 0")
        if self.response_measure:
            if int(self.n_response_questions) < 2:
                raise ValueError(f"n_response_questions={self.n_response_questions}; expected >= 2 (a selection and a "
                                 "held-out half)")
            if not 1 <= int(self.n_response_pairs) <= 5:
                raise ValueError(f"n_response_pairs={self.n_response_pairs}; expected 1 to 5 (a trait has 5 "
                                 "instruction pairs)")
            if int(self.response_max_new_tokens) < 1:
                raise ValueError(f"response_max_new_tokens={self.response_max_new_tokens}; expected a positive integer")


PRESETS = {
    "ci": dict(traits=("evil",), n_pairs=2, n_questions=2, n_samples=1, max_new_tokens=12, judge="none", filter=False,
               sweep_layers=(15,), n_monitor_questions=1, coefficients=(-2.0, 0.0, 2.0), screening=False,
               n_response_questions=4, response_max_new_tokens=12, n_random=2, holdout_monitoring=False),
    # quick: every generation is one static batch of 18 (3 pairs x 3 questions x 2 polarities; 3 own answers + 15
    # graded prompts x 1 question; 8 questions x 2 reference answers), so no batch is padded twice over
    "quick": dict(traits=("evil",), n_pairs=3, n_questions=3, n_samples=1, max_new_tokens=32, judge="none",
                  filter=False, sweep_layers=(9, 15, 21), n_monitor_questions=1, monitor_max_new_tokens=24,
                  batch_size=18, coefficients=(-3.0, -1.5, 0.0, 1.5, 3.0), screening=False, n_response_questions=8,
                  response_max_new_tokens=24, n_random=20, n_steer_examples=1, steer_example_coefs=(-2.0, 2.0),
                  band_measures=("response_likelihood",), holdout_monitoring=False),
    "full": {},
}
