"""The persona-features study's knobs (`Config`, defaults = the full run) and its named sizes (`PRESETS`); the
found rule's thresholds are fixed here, before any contrast is looked at."""
from __future__ import annotations

import dataclasses

from psm_jax.persona.stats import MIN_NULL_DRAWS


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m-instruct"
    layer: int | None = None  # None: n_layers // 2 (resid_post, the block output = HF hidden_states[layer + 1])
    sae: str | None = None  # SAELens folder / sae.train run dir; None: train (cached in sae_cache)
    sae_cache: str = "runs/persona_features_sae"
    train_tokens: int = 250_000
    train_docs: int = 4000  # ShareGPT conversations offered to the harvest (it stops at train_tokens)
    # fraction of those conversations that open with a role-play system prompt (`training_role_prompts`); 0 keeps
    # ShareGPT as it is
    train_role_prompts: float = 0.0
    train_steps: int = 600
    train_batch: int = 4096
    context_len: int = 256
    d_sae: int = 4608
    k: int = 32
    traits: tuple[str, ...] = ("evil", "sycophantic", "humorous")
    n_pairs: int = 5
    # extraction questions; first half discovery, second half validation. The validation questions are the
    # headline's independent units: every packaged question, so that the interval rests on 10 of them
    n_questions: int = 20
    n_samples: int = 2  # sampled responses per (pair, question, polarity)
    max_new_tokens: int = 48
    temperature: float = 1.0
    n_roles: int = 8
    role_instructions: int = 1
    role_questions: int = 6  # split in halves as above
    n_candidates: int = 10  # top latents per contrast considered (and recorded)
    d_discover: float = 0.8
    d_replicate: float = 0.5
    n_shuffles: int = 20  # shuffled-label repetitions of the found rule (the null band)
    n_random_directions: int = 200  # random unit directions: the band for decoder-vector cosines
    n_cosine: int = 3  # top decoder-cosine latents recorded per direction
    diff: bool = True
    diff_layer_offset: int = 4
    diff_coef: float = 0.5  # x typical residual norm at the steered layer
    n_diff: int = 3  # top diff latents recorded per trait
    context_docs: int = 120  # ShareGPT conversations in the context corpus (disjoint from training)
    context_max_len: int = 256
    n_bins: int = 10
    per_bin: int = 2
    n_top_examples: int = 5
    n_random: int = 10
    n_detect: int = 3  # detection scoring for the top n_detect candidates of each contrast + found latents
    max_detect: int = 16  # ... at most this many latents (the local scorer runs one forward per window)
    explainer: str = "local"  # local | openai | none
    scorer: str = "local"  # local | openai | none
    batch_size: int = 16
    export_sae: bool = True
    seed: int = 0

    def __post_init__(self):
        if not self.traits:
            raise ValueError("traits is empty; expected at least one trait name")
        for name in ("n_pairs", "n_samples", "max_new_tokens", "batch_size", "n_candidates", "train_tokens",
                     "train_steps", "train_batch", "d_sae", "k", "context_len", "context_max_len", "n_bins"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected a positive integer")
        if self.n_questions < 2 or self.role_questions < 2:
            raise ValueError(f"n_questions={self.n_questions}, role_questions={self.role_questions}; expected >= 2 "
                             "(split into discovery and validation halves)")
        if self.n_roles < 2:
            raise ValueError(f"n_roles={self.n_roles}; expected >= 2")
        for name in ("explainer", "scorer"):
            if getattr(self, name) not in ("local", "openai", "none"):
                raise ValueError(f"{name}={getattr(self, name)!r}; expected 'local', 'openai' or 'none'")
        for name in ("n_shuffles", "n_random_directions"):
            if int(getattr(self, name)) < MIN_NULL_DRAWS:
                raise ValueError(f"{name}={getattr(self, name)}; expected >= {MIN_NULL_DRAWS} (a null band)")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}; expected >= 0")
        if not 0.0 <= self.train_role_prompts <= 1.0:
            raise ValueError(f"train_role_prompts={self.train_role_prompts}; expected a fraction in [0, 1]")


PRESETS = {
    "ci": dict(traits=("evil",), n_pairs=2, n_questions=4, max_new_tokens=12, n_roles=4, role_questions=4,
               n_candidates=4, context_docs=12, context_max_len=96, n_bins=3, per_bin=2, n_random=4,
               train_tokens=20_000, train_docs=300, train_steps=30, train_batch=1024, context_len=128,
               n_detect=1, max_detect=2, diff=False),
    # the main job: the SAE (harvest and training, most of the stage) at half the full dictionary on 40k tokens
    "quick": dict(traits=("evil",), n_pairs=2, n_questions=4, max_new_tokens=32, n_roles=4, role_questions=4,
                  n_candidates=4, context_docs=24, context_max_len=128, n_bins=5, per_bin=2, n_random=6,
                  train_tokens=40_000, train_docs=600, train_steps=120, train_batch=2048, context_len=256,
                  d_sae=2304, n_cosine=2, n_diff=2, n_detect=1, max_detect=2),
    "full": {},
}
