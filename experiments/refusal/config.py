"""The refusal study's knobs: `Config` (checked when built, so a bad value fails before any model loads) and
`PRESETS`, the named sizes `psm refusal --preset` picks from."""
from __future__ import annotations

import dataclasses

from psm_jax.persona.stats import MIN_NULL_DRAWS


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m-instruct"
    n_train: int = 64  # per side: prompts for the difference in means (before filtering)
    n_val: int = 32  # per side: selection prompts (split "val")
    n_eval: int = 32  # per side: held-out prompts (split "train", after the first n_train)
    filter_train: bool = True  # keep harmful train prompts with score > 0 and harmless with score < 0
    min_filtered: int = 8  # a side left with fewer prompts after filtering stays unfiltered (reported)
    positions: tuple[int, ...] | None = None  # candidate post-instruction offsets (< 0); None = all
    layers: tuple[int, ...] | None = None  # candidate layers; None = every layer
    max_layer_frac: float = 0.8
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    fallback: bool = True  # if no candidate passes the rules, relax them in order (see select_with_fallback)
    selection_rule: str = "rules"  # "rules": lowest bypass under the KL threshold; "matched_damage": see below
    n_random_selection: int = 0  # random directions ablated on the val prompts: the matched_damage rule's null
    batch_size: int = 16
    max_new_tokens: int = 32
    n_ce: int = 32  # held-out ShareGPT conversations for the CE check (the interval's units)
    ce_max_messages: int = 4  # each cut to its first messages and characters
    ce_max_chars: int = 1000
    n_random: int = 20  # random directions ablated / added like the selected one: the nulls' bands (0: none)
    n_shuffled: int = 20  # label-shuffled difference-in-means directions, ablated / added like it (0: none)
    seed: int = 0

    def __post_init__(self):
        _check_counts(self)
        _check_selection(self)
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
            if not self.positions or any(p >= 0 for p in self.positions):
                raise ValueError(f"positions={self.positions}; expected negative offsets from the prompt end (e.g. -1)")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
            if not self.layers or any(x < 0 for x in self.layers):
                raise ValueError(f"layers={self.layers}; expected non-negative layer indices")


def _check_counts(cfg: Config) -> None:
    """Prompt, token and conversation counts, and the null draws: a null band needs enough draws or none at all."""
    for name in ("n_train", "n_val", "n_eval", "batch_size", "max_new_tokens", "ce_max_messages", "ce_max_chars"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)!r}; expected an int >= 1")
    for name in ("n_random", "n_shuffled", "n_random_selection"):
        n = getattr(cfg, name)
        if n != 0 and n < MIN_NULL_DRAWS:
            raise ValueError(f"{name}={n}; expected 0 (no null band) or >= {MIN_NULL_DRAWS}")
    if cfg.n_ce < 0 or cfg.min_filtered < 1:
        raise ValueError(f"n_ce={cfg.n_ce}, min_filtered={cfg.min_filtered}; expected n_ce >= 0, min_filtered >= 1")


SELECTION_RULES = ("rules", "matched_damage")


def _check_selection(cfg: Config) -> None:
    """The selection rules' layer cut and KL threshold; the matched-damage rule needs its own null draws."""
    if cfg.selection_rule not in SELECTION_RULES:
        raise ValueError(f"selection_rule={cfg.selection_rule!r}; expected one of {SELECTION_RULES}")
    if (cfg.selection_rule == "matched_damage") != (cfg.n_random_selection > 0):
        raise ValueError(f"selection_rule={cfg.selection_rule!r} with n_random_selection={cfg.n_random_selection}; "
                         "expected n_random_selection >= 1 exactly when selection_rule='matched_damage'")
    if not 0.0 < cfg.max_layer_frac <= 1.0:
        raise ValueError(f"max_layer_frac={cfg.max_layer_frac}; expected a fraction in (0, 1]")
    if not cfg.kl_threshold > 0:
        raise ValueError(f"kl_threshold={cfg.kl_threshold}; expected > 0")


PRESETS = {
    "ci": dict(n_train=8, n_val=8, n_eval=8, n_ce=2, positions=(-1,), layers=tuple(range(0, 24, 8)),
               max_new_tokens=12),
    "quick": dict(n_train=16, n_val=16, n_eval=16, n_ce=8, positions=(-1, -6), layers=tuple(range(0, 24, 4))),
    "full": {},
}
