"""The contrasts on the model: answers sampled under each trait's positive and negative prompts, and under role-play
and default prompts, read through the SAE (one conversation's mean latent activation over its assistant tokens is the
unit of analysis) and ranked by `ranking`; the same answers give the persona vectors and the Assistant axis at the
SAE's layer, so that the decoder directions are compared with directions measured on the very conversations."""
from __future__ import annotations

import jax
import numpy as np

from experiments.persona_features.config import Config
from experiments.persona_features.ranking import contrast_block
from experiments.persona_features.rows import role_rows, trait_rows
from psm_jax.persona import rollouts
from sae import features as F
from sae.features.discovery import mean_resid_norm


def _generate(model, rows, cfg, key, progress):
    """Each row's sampled answer (`response`) and its whole conversation (`conversation`), added in place."""
    rolls = rollouts.generate_responses(model, [r["messages"] for r in rows], max_new_tokens=cfg.max_new_tokens,
                                        temperature=cfg.temperature, key=key, batch_size=cfg.batch_size,
                                        progress=progress)
    for r, ro in zip(rows, rolls):
        r["response"] = ro.response
        r["conversation"] = ro.conversation()
    return rows


def _group_mean(stats, rows, group: str) -> np.ndarray:
    """Mean residual of the rows of one group that have selected tokens."""
    return stats.resid_mean[[i for i, r in enumerate(rows) if r["group"] == group and stats.n[i] > 0]].mean(0)


def _collect_last_turns(model, sae, rows, cfg: Config, bars: bool):
    """Per-conversation latent statistics over the last (generated) assistant turn of every row."""
    return F.collect(model, sae, [r["conversation"] for r in rows], batch_size=cfg.batch_size // 2 or 1,
                     last_turn_only=True, progress=bars).conv


def trait_contrasts(model, sae, traits, cfg: Config, key, say, bars: bool) -> dict:
    """Per trait: answers under its positive and negative system prompts, the latent contrast with its shuffled-
    label null, and the persona vector at the SAE's layer (positive minus negative mean residual, `vector`)."""
    results: dict = {}
    for ti, trait in enumerate(traits):
        say(f"trait {trait.name}: generating")
        rows = _generate(model, trait_rows(trait, cfg.n_pairs, cfg.n_questions, cfg.n_samples), cfg,
                         jax.random.fold_in(key, 1 + ti), bars)
        stats = _collect_last_turns(model, sae, rows, cfg, bars)
        res = contrast_block(stats, rows, "pos", "neg", cfg=cfg, seed=cfg.seed * 100 + ti)
        v = _group_mean(stats, rows, "pos") - _group_mean(stats, rows, "neg")
        res |= {"vector": v, "vector_norm": float(np.linalg.norm(v)), "typical_norm": mean_resid_norm(stats),
                "rows": rows, "stats": stats}
        results[trait.name] = res
        say(f"trait {trait.name}: found {res['n_found']} (shuffled-label null band {res['null_band']['low']:g}.."
            f"{res['null_band']['high']:g})")
    return results


def role_contrast(model, sae, cfg: Config, key, say, bars: bool) -> tuple[dict, list, np.ndarray]:
    """Role-played answers against the default Assistant's: the latent contrast, its rows, and the Assistant axis
    at the SAE's layer (default minus role mean residual)."""
    say("roles vs default: generating")
    rrows, role_names = role_rows(cfg)
    rrows = _generate(model, rrows, cfg, jax.random.fold_in(key, 999), bars)
    rstats = _collect_last_turns(model, sae, rrows, cfg, bars)
    role_res = contrast_block(rstats, rrows, "role", "default", cfg=cfg, seed=cfg.seed * 100 + 99)
    role_res["roles"] = role_names
    role_res["n_default_prompts"] = len({r["messages"][0]["content"] if r["messages"][0]["role"] == "system" else ""
                                         for r in rrows if r["group"] == "default"})
    say(f"roles: found {role_res['n_found']} (null {role_res['null_found']})")
    return role_res, rrows, _group_mean(rstats, rrows, "default") - _group_mean(rstats, rrows, "role")
