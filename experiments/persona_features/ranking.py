"""The found rule on collected latent statistics, with its shuffled-label null: candidates ranked by discovery
Cohen's d and checked on the validation half (`contrast_block`), or ranked by their margin over the other traits
(`specific_blocks`). The null applies the same rule to shuffled labels, so a count of found latents is read against
what the rule finds where there is nothing to find."""
from __future__ import annotations

from experiments.persona_features.config import Config
from experiments.persona_features.rows import labels
from psm_jax.persona.stats import null_band
from sae.features.discovery import (DISCOVERY, VALIDATION, shuffled_contrasts, specific_contrast, split_contrast,
                                    unit_effect)


def contrast_block(stats, rows, a: str, b: str, *, cfg: Config, seed: int) -> dict:
    """`split_contrast` with its shuffled-label null (>= 20 shuffles: a band; their d arrays are kept for the
    trait-specific null) and the best latent's unit-level effect on both halves."""
    kw = dict(n_candidates=cfg.n_candidates, d_discover=cfg.d_discover, d_replicate=cfg.d_replicate)
    groups, splits, questions = labels(rows)
    res = split_contrast(stats, groups, splits, a, b, **kw)
    shuffled = shuffled_contrasts(stats, groups, splits, a, b, seed=seed, n_rep=cfg.n_shuffles, **kw)
    res["null_found"] = [c["n_found"] for c in shuffled]
    res["null_band"] = null_band(res["null_found"])
    res["shuffled"] = [{"d_discovery": c["d_discovery"], "d_validation": c["d_validation"]} for c in shuffled]
    best = best_latent(res)
    res["best_effect"] = {split: unit_effect(stats, groups, splits, questions, best, a, b, split=split, seed=cfg.seed)
                          for split in (DISCOVERY, VALIDATION)}
    return res


def best_latent(res: dict) -> int:
    """The first found latent, else the top candidate by discovery d."""
    return int(res["found"][0] if res["found"] else res["candidates"][0]["latent"])


def specific_blocks(results: dict, cfg: Config) -> dict:
    """`specific_contrast` for every trait, with its null: the same rule with this trait's labels shuffled (the
    shuffles of `contrast_block`) while the other traits keep theirs; and the best latent's unit-level effect on
    the validation questions. Empty with fewer than two traits."""
    if len(results) < 2:
        return {}
    kw = dict(n_candidates=cfg.n_candidates, d_discover=cfg.d_discover, d_replicate=cfg.d_replicate)
    d_disc = {t: res["d_discovery"] for t, res in results.items()}
    d_val = {t: res["d_validation"] for t, res in results.items()}
    out = {}
    for t, res in results.items():
        spec = specific_contrast(d_disc, d_val, t, **kw)
        spec["null_found"] = [specific_contrast({**d_disc, t: sh["d_discovery"]}, {**d_val, t: sh["d_validation"]},
                                                t, **kw)["n_found"] for sh in res["shuffled"]]
        spec["null_band"] = null_band(spec["null_found"])
        spec["best_effect_validation"] = unit_effect(res["stats"], *labels(res["rows"]), spec["best"], "pos", "neg",
                                                     split=VALIDATION, seed=cfg.seed)
        out[t] = spec
    return out
