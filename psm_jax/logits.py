"""Logit utilities: continuation log-probs, token-set log-odds, KL between runs."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits, tokens):
    """log p(tokens[:, t+1] | prefix) for each t: [B, T-1] from logits [B, T, V]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def continuation_logprob(logits, tokens, target_mask):
    """Sum of log p over the tokens where target_mask [B, T] is true (e.g. a continuation)."""
    lp = token_logprobs(logits, tokens)
    return jnp.sum(jnp.where(target_mask[:, 1:], lp, 0.0), axis=-1)


def token_set_log_odds(last_logits, token_ids):
    """log P(S) - log(1 - P(S)) for a token set S at the last position; last_logits [B, V]."""
    logp = jax.nn.log_softmax(last_logits.astype(jnp.float32), axis=-1)
    log_p_set = jax.nn.logsumexp(logp[:, jnp.asarray(token_ids)], axis=-1)
    log_rest = jnp.log1p(-jnp.exp(jnp.minimum(log_p_set, -1e-7)))
    return log_p_set - log_rest


def kl_divergence(logits_p, logits_q, mask=None):
    """Mean over (masked) tokens of KL(p || q) with p, q the softmaxes of the two runs' logits."""
    lp = jax.nn.log_softmax(logits_p.astype(jnp.float32), axis=-1)
    lq = jax.nn.log_softmax(logits_q.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)
    if mask is None:
        return jnp.mean(kl)
    m = mask.astype(jnp.float32)
    return jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0)


def cross_entropy(logits, tokens, mask=None):
    """Mean next-token cross-entropy over positions whose *target* token is in mask [B, T]."""
    lp = token_logprobs(logits, tokens)
    m = jnp.ones_like(lp) if mask is None else mask[:, 1:].astype(jnp.float32)
    return -jnp.sum(lp * m) / jnp.maximum(jnp.sum(m), 1.0)
