"""The Assistant Axis on a model: role and default vectors from sampled answers, per-turn projections.

Role vector = mean over a role's responses of each response's mean resid_post activation over its assistant
content tokens; default vector = the same over the default prompts' responses; the axis
(`directions.axis_from_vectors`) points from the roles' mean toward the default Assistant.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from psm_jax.chat import Role as TokRole
from psm_jax.model import Capture, forward
from psm_jax.persona.directions import SITE, group_means, unit
from psm_jax.persona.prompts import system_conv
from psm_jax.reductions import per_turn_mean


def response_means(model, conversations, *, batch_size: int = 16, progress: bool = False):
    """Per-response mean over assistant content tokens of resid_post at every layer: ([N, L, D], n_tokens [N])."""
    from psm_jax.persona.rollouts import activation_means

    acts = activation_means(model, conversations, site=SITE, batch_size=batch_size, progress=progress)
    return acts["response_mean"], acts["n_response"]


def role_and_default_vectors(model, roles, questions, *, default_prompts=None, instructions_per_role: int = 1,
                             default_questions=None, batch_size: int = 16, max_new_tokens: int = 48,
                             temperature: float = 0.7, top_p: float = 1.0, seed: int = 0, progress: bool = False,
                             model_display_name: str = "SmolLM"):
    """Role vectors [R, L, D] and the default vector [L, D] (no judge filtering; roles with no
    non-empty response get NaN rows). A compact entry point for other experiments."""
    from psm_jax.persona import datasets
    from psm_jax.persona.rollouts import generate_responses

    if default_prompts is None:
        default_prompts = datasets.load_default_prompts(model_display_name)
    default_questions = list(questions) if default_questions is None else list(default_questions)
    convs, groups = [], []
    for g, role in enumerate(roles):
        for instr in role.instructions[:instructions_per_role]:
            for q in questions:
                convs.append(system_conv(instr, q))
                groups.append(g)
    dconvs = [system_conv(p, q) for p in default_prompts for q in default_questions]
    key = jax.random.key(seed)
    rolls = generate_responses(model, convs + dconvs, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, key=key, batch_size=batch_size, progress=progress)
    means, ntok = response_means(model, [r.conversation() for r in rolls], batch_size=batch_size, progress=progress)
    n = len(convs)
    role_vecs, _ = group_means(means[:n], groups, len(roles), keep=ntok[:n] > 0)
    default_vec = means[n:][ntok[n:] > 0].mean(axis=0)
    return role_vecs, default_vec


@functools.partial(jax.jit, static_argnames=("config", "layers", "n_turns"))
def _turn_projections(params, config, tokens, attention_mask, roles, turns, units, edits, *, layers, n_turns):
    out = forward(params, config, tokens, attention_mask=attention_mask, edits=edits,
                  capture=Capture(sites=(SITE,), layers=layers), return_logits=False)
    h = out.captured[SITE]  # [nl, B, T, D]
    proj = jnp.einsum("lbtd,ld->btl", h.astype(jnp.float32), units)  # [B, T, nl]
    means, counts = per_turn_mean(proj, turns, roles == TokRole.ASSISTANT, n_turns)  # [B, n, nl], [B, n]
    return means, counts


def per_turn_projections(model, conversations, directions, *, layers, batch_size: int = 4, edits_fn=None,
                         progress: bool = False, desc: str = "per-turn projections"):
    """Mean projection of each assistant turn's content tokens onto unit(directions[i]) at layers[i].

    conversations: message lists (teacher-forced, nothing generated); directions [len(layers), D].
    Returns (proj [N, len(layers), K], n_tokens [N, K]) with K = the most assistant turns in any
    conversation; turn k is the k-th assistant message; NaN (and 0 tokens) where a conversation has
    fewer assistant turns."""
    from psm_jax.persona.rollouts import encode_batch, static_batches

    layers = tuple(int(x) for x in layers)
    for layer in layers:
        model.config.check_layer(layer)
    directions = np.asarray(directions, np.float32).reshape(len(layers), -1)
    units = jnp.asarray(unit(directions), jnp.float32)
    n_msgs = max(len(c) for c in conversations)
    n_turns = -(-n_msgs // 4) * 4  # static, rounded to limit recompiles
    a_idx = [[i for i, m in enumerate(c) if m["role"] == "assistant"] for c in conversations]
    K = max(1, max(len(a) for a in a_idx))
    proj = np.full((len(conversations), len(layers), K), np.nan)
    ntok = np.zeros((len(conversations), K), np.int64)
    for start, convs, n_real in static_batches(conversations, batch_size, progress=progress, desc=desc):
        _, batch = encode_batch(model, convs, add_generation_prompt=False, multiple_of=64)
        edits = tuple(edits_fn(batch)) if edits_fn is not None else ()
        means, counts = _turn_projections(model.params, model.config, batch.tokens, batch.attention_mask,
                                          batch.roles, batch.turns, units, edits, layers=layers, n_turns=n_turns)
        means, counts = np.asarray(means), np.asarray(counts)
        for i in range(n_real):
            for k, mi in enumerate(a_idx[start + i]):
                if counts[i, mi] > 0:
                    proj[start + i, :, k] = means[i, mi]
                    ntok[start + i, k] = int(counts[i, mi])
    return proj, ntok


def adherence_scores(model, systems, questions, answers, assistant_system: str, *, batch_size: int = 32):
    """Judge-free role adherence of each answer, scored by the model itself: per-token log P(answer | systems[i],
    q) - per-token log P(answer | assistant_system, q). Positive: the answer reads more like the role than like the
    Assistant. Empty answers (no content tokens) get NaN. [N] float64.

    The per-item role instruction is what lets every role's answers go through one set of static batches (a small
    model judges a 0-3 rubric poorly; its own likelihoods need no judge)."""
    from psm_jax.persona.rollouts import answer_token_counts, score_answers

    n = len(answers)
    if len(systems) != n or len(questions) != n:
        raise ValueError(f"{len(systems)} systems, {len(questions)} questions and {n} answers; expected equal counts")
    if not assistant_system:
        raise ValueError("adherence_scores needs a non-empty assistant_system prompt; got an empty one")
    out = np.full(n, np.nan)
    idx = [i for i, a in enumerate(answers) if a.strip()]
    if not idx:
        return out
    prompts = ([system_conv(systems[i], questions[i]) for i in idx]
               + [system_conv(assistant_system, questions[i]) for i in idx])
    texts = [answers[i] for i in idx] * 2
    counts = answer_token_counts(model, prompts, texts)
    lp = score_answers(model, prompts, texts, batch_size=batch_size) / np.maximum(counts, 1)
    scores = lp[:len(idx)] - lp[len(idx):]
    scores[counts[:len(idx)] == 0] = np.nan
    out[idx] = scores
    return out
