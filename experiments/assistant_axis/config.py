"""The Assistant Axis study's knobs: `Config` (checked when built, so a bad value fails before any model loads) and
`PRESETS`, the named sizes `psm assistant-axis --preset` and `psm quickstart` pick from. The sizes are a CPU's, far
below the paper's (the package doc lists the deviations)."""
from __future__ import annotations

import dataclasses

from psm_jax.persona import DEFAULT_MODEL


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = DEFAULT_MODEL
    model_display_name: str = "SmolLM"  # fills "You are {model_name}." among the default prompts
    seed: int = 0
    n_roles: int | None = 54  # 6 per category; None = every role; "assistant" is never one of them
    instructions_per_role: int = 1
    # Extraction questions per role: a role vector averages this many sampled answers, and at 6 questions the
    # split-half reliability of the role-to-role spread is under 0.5 on the default model (noise spreads the
    # roles along every component); 24 brings the Spearman-Brown prediction to about 0.75.
    n_questions: int = 24
    default_samples: int = 1  # sampled responses per (default prompt, question); same questions as the roles
    include_assistant_role: bool = True  # also compute the "assistant" role's vector (a reference point)
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 1.0
    batch_size: int = 64  # decode on CPU is weight-bandwidth bound: wide batches cost little more per step
    target_layer: int | None = None  # None = n_layers // 2
    variance_fraction: float = 0.7
    judge: str = "none"  # "none" | "local" | "openai": rubric filtering of role responses
    judge_min_score: int = 3
    min_responses: int = 2
    adherence: str = "likelihood"  # "none" | "likelihood": drop role responses that read more like the Assistant
    adherence_min: float = 0.0  # keep responses with adherence score > this (nats per token, role vs Assistant)
    adherence_check_roles: int = 16  # roles whose responses are compared with default answers (the validity check)
    human_categories: tuple[str, ...] = ("profession", "social", "emotional")  # the human-archetype subset
    role_categories: tuple[str, ...] = ()  # the role set: roles of these categories only (empty: every category)
    drift_sharegpt: int = 12  # ShareGPT conversations for the drift curve (0 = skip)
    drift_max_messages: int = 12
    drift_max_chars: int = 4000
    drift_roleplay: bool = True
    drift_batch_size: int = 4

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        def need(ok, what):
            if not ok:
                raise ValueError(what)

        need(self.n_roles is None or self.n_roles >= 2, f"n_roles={self.n_roles}; expected >= 2 (or None for all)")
        need(self.instructions_per_role >= 1, f"instructions_per_role={self.instructions_per_role}; expected >= 1")
        need(self.n_questions >= 1, f"n_questions={self.n_questions}; expected >= 1")
        need(self.default_samples >= 1, f"default_samples={self.default_samples}; expected >= 1")
        need(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens}; expected >= 1")
        need(self.temperature >= 0 and 0 < self.top_p <= 1,
             f"temperature={self.temperature}, top_p={self.top_p}; expected temperature >= 0, 0 < top_p <= 1")
        need(self.batch_size >= 1 and self.drift_batch_size >= 1, "batch sizes must be >= 1")
        need(0 < self.variance_fraction <= 1, f"variance_fraction={self.variance_fraction}; expected in (0, 1]")
        need(self.judge in ("none", "local", "openai"), f"judge={self.judge!r}; expected 'none', 'local' or 'openai'")
        need(0 <= self.judge_min_score <= 3, f"judge_min_score={self.judge_min_score}; expected 0..3")
        need(self.min_responses >= 1, f"min_responses={self.min_responses}; expected >= 1")
        need(self.adherence in ("none", "likelihood"), f"adherence={self.adherence!r}; expected 'none' or 'likelihood'")
        need(self.adherence_check_roles >= 2, f"adherence_check_roles={self.adherence_check_roles}; expected >= 2")
        need(self.drift_sharegpt >= 0 and self.drift_max_messages >= 2,
             "drift_sharegpt must be >= 0 and drift_max_messages >= 2")


PRESETS = {
    "ci": dict(n_roles=4, instructions_per_role=1, n_questions=2, default_samples=1, max_new_tokens=12,
               batch_size=16, min_responses=1, drift_sharegpt=2, drift_max_chars=1200),
    "quick": dict(n_roles=10, instructions_per_role=1, n_questions=3, default_samples=1, max_new_tokens=32,
                  batch_size=16, min_responses=1, drift_sharegpt=4, drift_max_chars=2500, adherence="none"),
    "full": {},
}
