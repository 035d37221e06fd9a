"""Persona vectors (after Chen et al. 2025): mean-difference vectors of a trait from contrasting conversations, the
layer rule that reads extraction data alone, and data screening by projection difference.

    extract_vectors(model, pos, neg)          one [n_layers, d_model] vector per variant (VARIANTS) at resid_post
    extraction_activations / vectors_from_activations   the same in two steps, keeping the per-row activations
    crossfit_separation(acts, pos_q, neg_q)   per layer, the cross-fitted separation of the last prompt token's
                                              projection (no row scores a vector it helped to make)
    rule_layer(separations)                   the layer the rule picks
    projection_difference(model, ...)         per sample, a given response's projection minus the model's own

Pure functions over a model and arrays; no files, no printing.
"""
from __future__ import annotations

import numpy as np

from psm_jax.persona import rollouts
from psm_jax.persona.directions import SITE, mean_difference, project
from psm_jax.persona.prompts import with_answer
from psm_jax.persona.stats import cohens_d

VARIANTS = ("response_avg", "prompt_avg", "prompt_last")
LAYER_INDEXING = ("vector[i] lives at resid_post of block i (the output of block i) = HF hidden_states[i+1]; "
                  "add it there to steer")


def extract_vectors(model, pos_conversations, neg_conversations, *, batch_size: int = 16,
                    progress: bool = False) -> dict[str, np.ndarray]:
    """Mean-difference vectors [n_layers, D] at resid_post of every layer, for each variant in VARIANTS.

    Conversations end with the assistant response whose tokens are averaged.
    """
    return vectors_from_activations(extraction_activations(model, pos_conversations, neg_conversations,
                                                          batch_size=batch_size, progress=progress))


def extraction_activations(model, pos_conversations, neg_conversations, *, batch_size: int = 16,
                           progress: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """{"pos", "neg"}: `rollouts.activation_means` of each polarity's conversations at resid_post of every layer."""
    return {name: rollouts.activation_means(model, convs, site=SITE, batch_size=batch_size, progress=progress)
            for name, convs in (("pos", pos_conversations), ("neg", neg_conversations))}


def vectors_from_activations(acts: dict) -> dict[str, np.ndarray]:
    """The mean-difference vector of each variant from `extraction_activations`' output."""
    key = {"response_avg": "response_mean", "prompt_avg": "prompt_mean", "prompt_last": "last_prompt"}
    return {v: mean_difference(acts["pos"][key[v]], acts["neg"][key[v]]) for v in VARIANTS}


def crossfit_separation(acts: dict, pos_questions, neg_questions) -> np.ndarray | None:
    """Per layer, how well the last prompt token's projection onto the response-average vector separates the
    positive from the negative extraction rows, cross-fitted so that no row scores a vector it helped to make: the
    rows split by question parity, the vector from one half's rows, the separation (d) of the other half's
    projections, averaged over the two directions. [n_layers], or None when a half has fewer than 2 rows of a
    polarity. This is the monitoring layer rule: it reads only extraction data, never a monitoring prompt or a
    behavioural measure."""
    pos_q, neg_q = np.asarray(pos_questions) % 2, np.asarray(neg_questions) % 2
    if min(np.sum(pos_q == f) for f in (0, 1)) < 2 or min(np.sum(neg_q == f) for f in (0, 1)) < 2:
        return None
    folds = []
    for f in (0, 1):
        vec = mean_difference(acts["pos"]["response_mean"][pos_q != f], acts["neg"]["response_mean"][neg_q != f])
        pos_probe, neg_probe = acts["pos"]["last_prompt"][pos_q == f], acts["neg"]["last_prompt"][neg_q == f]
        folds.append([float(cohens_d(project(pos_probe[:, L], vec[L]), project(neg_probe[:, L], vec[L])))
                      for L in range(vec.shape[0])])
    return np.mean(np.asarray(folds), axis=0)


def rule_layer(separations) -> int | None:
    """The layer of largest cross-fitted separation (None without a finite one)."""
    if separations is None or not np.isfinite(separations).any():
        return None
    return int(np.nanargmax(separations))


def projection_difference(model, prompts, given_responses, vector, layer: int, *, own_responses=None,
                          max_new_tokens: int = 48, batch_size: int = 16) -> dict:
    """Data screening: per sample, projection onto `vector` (at resid_post of `layer`, mean over the
    response's assistant tokens) of the given response minus that of the model's own response to the
    same prompt (generated greedily when `own_responses` is None). prompts[i]: messages ending with
    a user turn. Returns dict(diff [N], given [N], own [N], mean, own_responses)."""
    if len(prompts) != len(given_responses):
        raise ValueError(f"{len(prompts)} prompts but {len(given_responses)} given responses; expected equal counts")
    if not prompts:
        raise ValueError("projection_difference needs at least one prompt")
    if own_responses is None:
        rolls = rollouts.generate_responses(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                                            batch_size=batch_size)
        own_responses = [r.response for r in rolls]
    if len(own_responses) != len(prompts):
        raise ValueError(f"{len(own_responses)} own responses for {len(prompts)} prompts; expected equal counts")
    convs = [with_answer(p, r) for p, r in zip(prompts, given_responses)]
    convs += [with_answer(p, r) for p, r in zip(prompts, own_responses)]
    acts = rollouts.activation_means(model, convs, layers=(int(layer),), site=SITE, batch_size=batch_size)
    proj = project(acts["response_mean"][:, 0], vector)
    n = len(prompts)
    diff = proj[:n] - proj[n:]
    return {"diff": diff, "given": proj[:n], "own": proj[n:], "mean": float(np.mean(diff)),
            "own_responses": list(own_responses)}
