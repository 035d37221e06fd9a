"""Logit utilities: continuation log-probs, token-set log-odds, KL between runs, the argmax over a vocabulary."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def token_logprobs(logits, tokens):
    """log p(tokens[:, t+1] | prefix) for each t: [B, T-1] from logits [B, T, V]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def continuation_logprob(logits, tokens, target_mask):
    """Sum of log p over the tokens where target_mask [B, T] is true (e.g. a continuation)."""
    lp = token_logprobs(logits, tokens)
    return jnp.sum(jnp.where(target_mask[:, 1:], lp, 0.0), axis=-1)


def target_window_size(target_mask, multiple: int = 8) -> int:
    """Host-side width of `target_positions`' window for a batch: the most targets any row has (a target's
    prediction is read one position earlier, so the first token is never one), rounded up to `multiple` so
    that a few compiled shapes serve batches of similar answers; at least 1, at most T - 1."""
    m = np.asarray(target_mask, bool)
    most = int(m[:, 1:].sum(1).max()) if m.size else 0
    return int(min(max(1, -(-most // multiple) * multiple), max(1, m.shape[1] - 1)))


def target_positions(target_mask, window: int):
    """The positions t whose next token is a target (target_mask[:, t+1]), the first `window` of them per row in
    order, and which of those slots are real: ([B, window] int32, [B, window] bool). `window` must be at least
    the row's target count (`target_window_size`) or the later targets are dropped."""
    pred = target_mask[:, 1:].astype(bool)
    order = jnp.argsort(~pred, axis=1, stable=True)[:, :window].astype(jnp.int32)
    return order, jnp.take_along_axis(pred, order, axis=1)


def windowed_logprob(logits, tokens, positions, valid):
    """Sum over the real slots of log p(tokens[t+1]) from `logits` [B, A, V] taken at `positions` [B, A]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nxt = jnp.take_along_axis(tokens, positions + 1, axis=1)
    lp = jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, lp, 0.0), axis=-1)


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


def argmax_last(x) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` as int32 (the first index of the maximum; a NaN counts as the maximum), computed as
    plain reductions (any NaN, max, then the smallest index holding it). XLA's CPU backend runs argmax's paired
    (value, index) reduce serially, several times slower over a 49k-token vocabulary than these; `benchmarks/
    decode.py --parts argmax` measures both, alone and inside the decode loop."""
    nan = jnp.isnan(x)
    has_nan = jnp.any(nan, axis=-1, keepdims=True)
    hit = jnp.where(has_nan, nan, x == jnp.max(x, axis=-1, keepdims=True))
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, index, x.shape[-1]), axis=-1)


def categorical_last(key, logits) -> jax.Array:
    """A sample of `jax.random.categorical(key, logits)` over the last axis (the same draw: Gumbel noise from the
    same key, then the argmax) through `argmax_last`."""
    return argmax_last(jax.random.gumbel(key, logits.shape, logits.dtype) + logits)

