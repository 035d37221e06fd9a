"""Persona-feature discovery: which latents separate two groups of conversations, and whether that is more than noise.

The unit of analysis is the conversation (a row of `ConversationStats`: its mean latent activation over its selected
tokens). Each conversation carries three labels, passed as parallel sequences: its group (e.g. "pos" / "neg" system
prompt, "role" / "default"), its split (`DISCOVERY` or `VALIDATION`: conversations on disjoint questions) and its
question. Latents are ranked on the discovery split and checked on the validation split, so that a latent is not
"found" for separating the very conversations it was selected on; the shuffled-label null asks how many latents the
same rule finds when the groups mean nothing (after Wang et al. 2025, Kim et al. 2026). Pure numpy over arrays; no
files, no printing.

    split_contrast(stats, groups, splits, a, b, ...)       rank on discovery, check on validation: the found rule
    shuffled_contrasts(stats, groups, splits, a, b, ...)   the same with a/b permuted within each split: its null
    specific_contrast(d_discovery, d_validation, trait)    latents ranked by their margin over every other trait's d
    latent_specificity(d_validation, best, traits, ...)    whether a contrast's best latent also separates other traits
    unit_effect(stats, groups, splits, questions, ...)     a latent's a - b effect over questions, with its interval
    cosine_band(W_dec, vector, latents, ...)               decoder-row cosines against random directions' band
    mean_resid_norm(stats)                                 typical norm of the conversations' mean residual
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from psm_jax.persona.directions import random_directions, unit
from psm_jax.persona.stats import null_band, outside_band, paired_effect, zscore
from sae.features.collect import ConversationStats
from sae.features.rank import contrast, decoder_cosine

DISCOVERY, VALIDATION = "discovery", "validation"
SPLITS = (DISCOVERY, VALIDATION)


def _check_labels(stats: ConversationStats, **labels) -> None:
    for name, values in labels.items():
        if len(values) != len(stats):
            raise ValueError(f"{name} has {len(values)} labels for {len(stats)} conversations; expected one each")


def split_contrast(stats: ConversationStats, groups: Sequence[str], splits: Sequence[str], a: str, b: str, *,
                   n_candidates: int, d_discover: float, d_replicate: float) -> dict:
    """Rank latents by Cohen's d of group `a` vs `b` on the discovery conversations and check them on the validation
    ones. A latent is *found* when it is among the top `n_candidates` by discovery d, with discovery d >=
    `d_discover` and validation d >= `d_replicate` (thresholds fixed before looking).

    Why two splits: the top of a ranking over thousands of latents is selected for noise as well as signal; only a
    d that holds on new questions counts. Returns {candidates (the top n_candidates, each with its rank, d on both
    splits, d / means / firing rates over all of a and b, and found), found (latent ids), n_found, ranking_full (the
    `LatentRanking` over all conversations of a and b), d_discovery, d_validation ([S] each), halves_correlation
    (Pearson r of the two splits' d over latents that fire at all; NaN with <= 2 of them), n (conversations per
    split and group)}."""
    _check_labels(stats, groups=groups, splits=splits)
    idx = lambda group, split: [i for i, (g, s) in enumerate(zip(groups, splits))  # noqa: E731
                                if g == group and s == split]
    disc = contrast(stats.take(idx(a, DISCOVERY)), stats.take(idx(b, DISCOVERY)))
    val = contrast(stats.take(idx(a, VALIDATION)), stats.take(idx(b, VALIDATION)))
    full = contrast(stats.take([i for i, g in enumerate(groups) if g == a]),
                    stats.take([i for i, g in enumerate(groups) if g == b]))
    top = disc.order()[:n_candidates]
    d_disc, d_val = disc.columns["cohens_d"], val.columns["cohens_d"]
    found = [int(lat) for lat in top if d_disc[lat] >= d_discover and d_val[lat] >= d_replicate]
    cands = []
    for rank, lat in enumerate(top):
        cands.append({"latent": int(lat), "rank": rank, "d_discovery": float(d_disc[lat]),
                      "d_validation": float(d_val[lat]), "d_all": float(full.columns["cohens_d"][lat]),
                      "mean_a": float(full.columns["mean_a"][lat]), "mean_b": float(full.columns["mean_b"][lat]),
                      "fire_a": float(full.columns["fire_a"][lat]), "fire_b": float(full.columns["fire_b"][lat]),
                      "found": int(lat) in found})
    # agreement of the two halves' d over latents that fire at all
    live = (full.columns["fire_a"] + full.columns["fire_b"]) > 0
    agree = (float(np.corrcoef(np.nan_to_num(d_disc[live]), np.nan_to_num(d_val[live]))[0, 1]) if live.sum() > 2
             else float("nan"))
    return {"candidates": cands, "found": found, "n_found": len(found), "ranking_full": full,
            "d_discovery": d_disc, "d_validation": d_val, "halves_correlation": agree,
            "n": {s: {g: len(idx(g, s)) for g in (a, b)} for s in SPLITS}}


def shuffled_contrasts(stats: ConversationStats, groups: Sequence[str], splits: Sequence[str], a: str, b: str, *,
                       seed: int, n_rep: int, **kw) -> list[dict]:
    """`split_contrast` with the a/b labels permuted within each split, `n_rep` times (one seeded generator, the
    discovery split permuted before the validation split in every repetition): the null of every rule that reads
    the contrast, e.g. how many latents the found rule finds when the groups mean nothing. Conversations of other
    groups keep their labels. `kw`: split_contrast's thresholds."""
    _check_labels(stats, groups=groups, splits=splits)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_rep):
        shuffled = list(groups)
        for split in SPLITS:
            ids = [i for i, (g, s) in enumerate(zip(groups, splits)) if s == split and g in (a, b)]
            labels = [groups[i] for i in ids]
            for i, g in zip(ids, rng.permutation(labels)):
                shuffled[i] = str(g)
        out.append(split_contrast(stats, shuffled, splits, a, b, **kw))
    return out


def _finite_or(x, fill: float) -> np.ndarray:
    return np.where(np.isfinite(x), x, fill)


def specific_contrast(d_discovery: dict, d_validation: dict, trait: str, *, n_candidates: int, d_discover: float,
                      d_replicate: float) -> dict:
    """Latents ranked by how much more they separate `trait`'s positive from negative prompts than any other
    trait's (the margin: own Cohen's d minus the largest other d, on the discovery halves). A latent is a found
    *trait-specific* latent when it is among the top `n_candidates` by that margin, with own discovery d >=
    `d_discover` and a positive discovery margin, and on the validation halves own d >= `d_replicate` and above
    every other trait's d. The plain ranking finds what the trait's prompts share with every persona prompt; this
    one asks for what they do not share. d arrays: trait -> [d_sae] (one contrast per trait, on its own rows);
    a non-finite d counts as -inf (a latent that fires for no trait ranks last). Returns {candidates (rank, margins,
    own d, the other traits' validation d, found), found, n_found, best (the first found, else the top latent)}."""
    others = [t for t in d_discovery if t != trait]
    if not others:
        raise ValueError(f"trait-specific latents need at least two traits; got only {trait!r}")
    own_disc = _finite_or(d_discovery[trait], -np.inf)
    own_val = _finite_or(d_validation[trait], -np.inf)
    other_disc = np.max([_finite_or(d_discovery[t], -np.inf) for t in others], axis=0)
    other_val = np.max([_finite_or(d_validation[t], -np.inf) for t in others], axis=0)
    with np.errstate(invalid="ignore"):  # -inf - -inf: a latent that fires for no trait, ranked last
        margin_disc = _finite_or(own_disc - other_disc, -np.inf)
        margin_val = _finite_or(own_val - other_val, -np.inf)
    top = np.argsort(-margin_disc, kind="stable")[:n_candidates]
    found = [int(lat) for lat in top if own_disc[lat] >= d_discover and margin_disc[lat] > 0
             and own_val[lat] >= d_replicate and margin_val[lat] > 0]
    cands = [{"latent": int(lat), "rank": rank, "margin_discovery": float(margin_disc[lat]),
              "margin_validation": float(margin_val[lat]), "d_discovery": float(d_discovery[trait][lat]),
              "d_validation": float(d_validation[trait][lat]),
              "d_validation_other_traits": {t: float(d_validation[t][lat]) for t in others},
              "found": int(lat) in found}
             for rank, lat in enumerate(top)]
    return {"candidates": cands, "found": found, "n_found": len(found),
            "best": int(found[0] if found else top[0])}


def latent_specificity(d_validation: dict, best: dict, traits: Sequence[str], d_replicate: float) -> dict:
    """Per contrast: its best latent's validation d on every trait contrast but its own, the traits where that d
    also reaches `d_replicate` (the latent is shared with them), and for a trait contrast whether its own d is above
    every other trait's (trait-specific; None for a contrast that is not a trait). A latent that separates every
    persona prompt from the default is a persona-prompt latent, not a latent of one trait. d_validation: contrast ->
    [d_sae] (the traits' and any other contrast's); best: contrast -> latent id."""
    out = {}
    for name, latent in best.items():
        others = {t: float(d_validation[t][latent]) for t in traits if t != name}
        own = float(d_validation[name][latent])
        out[name] = {"d_validation_other_traits": others,
                     "shared_with": [t for t, d in others.items() if d >= d_replicate],
                     "specific": (all(own > d for d in others.values()) if name in traits else None)}
    return out


def unit_effect(stats: ConversationStats, groups: Sequence[str], splits: Sequence[str], questions: Sequence,
                latent: int, a: str, b: str, *, split: str, seed: int) -> dict:
    """The latent's contrast over independent units: per question of `split`, its mean activation over group a's
    conversations minus over group b's (conversations with no selected tokens left out), with a 95% bootstrap
    interval over questions (`paired_effect`). The conversations of one question share it, so they are not
    independent; the questions are. {estimate, low, high, n (questions), n_conversations, excludes_zero}; NaN
    with n 0 when no question has conversations of both groups."""
    _check_labels(stats, groups=groups, splits=splits, questions=questions)
    by_q: dict = {}
    for i, (g, s, q) in enumerate(zip(groups, splits, questions)):
        if s == split and g in (a, b) and stats.n[i] > 0:
            by_q.setdefault(q, {a: [], b: []})[g].append(float(stats.mean[i, latent]))
    qs = [q for q, gs in sorted(by_q.items()) if gs[a] and gs[b]]
    if not qs:
        return {"estimate": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0, "n_conversations": 0,
                "excludes_zero": False}
    eff = paired_effect([np.mean(by_q[q][a]) for q in qs], [np.mean(by_q[q][b]) for q in qs], seed=seed)
    return {**eff, "n_conversations": int(sum(len(by_q[q][a]) + len(by_q[q][b]) for q in qs))}


def cosine_band(W_dec, vector, latents: Sequence[int], *, n_random: int, seed: int) -> dict:
    """Decoder-row cosine of `latents` with `vector` against random unit directions' cosine with it (the band a
    direction unrelated to the vector falls in; `random_directions(seed, n_random, ...)`, n_random >= 20): whether
    the latents a contrast found point along a persona vector more than chance does at this width.
    {cosines, band (`null_band`), z (per latent), outside (how many lie outside the band), n}."""
    v = np.asarray(vector, np.float64)
    null = random_directions(seed, n_random, v.shape[0], 1.0).astype(np.float64) @ unit(v)
    band = null_band(null)
    cos = decoder_cosine(W_dec[np.asarray(list(latents), np.int64)], v) if latents else np.zeros(0)
    return {"cosines": {int(lat): float(c) for lat, c in zip(latents, cos)}, "band": band,
            "z": {int(lat): zscore(float(c), null) for lat, c in zip(latents, cos)},
            "outside": int(sum(outside_band(float(c), band) for c in cos)), "n": len(cos)}


def mean_resid_norm(stats: ConversationStats) -> float:
    """Mean norm of the per-conversation mean residual over the conversations with selected tokens: the typical
    size of an activation at the SAE's site, the unit a steering coefficient is expressed in."""
    return float(np.mean(np.linalg.norm(stats.resid_mean[stats.n > 0], axis=-1)))
