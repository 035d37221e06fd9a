"""Prefill and decoding from a KV cache, with edits active at every step.

`generate` = `prefill` (one forward over the padded prompt writing the cache) + `decode` (a
`lax.while_loop` of single-token forwards that stops when every row has emitted an EOS or the
budget is spent). Shapes are static (cache size = prompt + max_new_tokens), so one compilation
serves every prompt of the same padded length. Edits whose position masks cover only the prompt
are widened to the cache size; `extend` on each edit says whether generated tokens are edited.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from psm_jax.config import ModelConfig
from psm_jax.model import Capture, ForwardOutput, KVCache, forward, init_cache


@struct.dataclass
class Generation:
    tokens: jax.Array  # int32 [B, max_new_tokens]; after EOS: pad
    logprobs: jax.Array  # float32 [B, max_new_tokens]: log p(token) under the (unscaled) model
    finished: jax.Array  # bool [B]: emitted EOS
    lengths: jax.Array  # int32 [B]: generated tokens up to and including EOS
    cache: KVCache


def widen_edits(edits: Sequence, size: int) -> tuple:
    """Pad each edit's position mask on the slot axis to `size` with the edit's `extend` value."""
    out = []
    for e in edits:
        if e.positions is not None and e.positions.shape[1] < size:
            pad = jnp.full((e.positions.shape[0], size - e.positions.shape[1]), e.extend, bool)
            e = e.replace(positions=jnp.concatenate([e.positions, pad], axis=1))
        out.append(e)
    return tuple(out)


def prefill(params, config: ModelConfig, tokens, attention_mask=None, *, cache_size: int, edits: Sequence = (),
            capture: Capture = Capture(), cache_dtype=None) -> ForwardOutput:
    """Forward over the prompt, writing a fresh cache of `cache_size` slots; logits of the last slot."""
    b, t = tokens.shape
    if cache_size < t:
        raise ValueError(f"cache_size={cache_size} is smaller than the prompt length {t}")
    dtype = cache_dtype or params["embed"].dtype
    cache = init_cache(config, b, cache_size, dtype)
    return forward(params, config, tokens, attention_mask=attention_mask, edits=widen_edits(edits, cache_size),
                   capture=capture, cache=cache, logits_positions="last")


def extend(params, config: ModelConfig, cache: KVCache, tokens, attention_mask=None, *, edits: Sequence = (),
           capture: Capture = Capture()) -> ForwardOutput:
    """Append tokens [B, T] to an existing cache (e.g. a new user turn after a cache edit)."""
    return forward(params, config, tokens, attention_mask=attention_mask, edits=widen_edits(edits, cache.size),
                   capture=capture, cache=cache, logits_positions="last")


def _choose(logits, key, temperature, top_p, sample: bool, use_top_p: bool, top_k: int | None = None):
    """Next token: argmax, or a sample at `temperature` from the `top_k` most likely tokens (all when None) and,
    with `use_top_p`, from the smallest head of those whose probability (renormalised over them) reaches top_p.
    A small top_k also makes nucleus sampling cheap: only k logits are sorted instead of the vocabulary."""
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature
    if use_top_p or top_k is not None:
        k = scaled.shape[-1] if top_k is None else min(int(top_k), scaled.shape[-1])
        head, order = jax.lax.top_k(scaled, k)
        if use_top_p:
            probs = jax.nn.softmax(head, axis=-1)
            keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # always keeps the most likely token
            head = jnp.where(keep, head, -jnp.inf)
        choice = jax.random.categorical(key, head, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


def decode(params, config: ModelConfig, cache: KVCache, last_logits, *, max_new_tokens: int, key=None,
           temperature=1.0, top_p=1.0, sample: bool = False, use_top_p: bool = False, edits: Sequence = (),
           eos_ids: tuple[int, ...] = (), pad_id: int = 0, top_k: int | None = None) -> Generation:
    """Decode up to `max_new_tokens` tokens continuing from `cache` whose next-token logits are
    `last_logits` [B, V]. The cache must have room for max_new_tokens - 1 more slots."""
    b = last_logits.shape[0]
    key = jax.random.key(0) if key is None else key
    edits = widen_edits(edits, cache.size)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def pick(logits, key, done):
        tok = _choose(logits, key, temperature, top_p, sample, use_top_p, top_k)
        tok = jnp.where(done, pad_id, tok)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
        return tok, jnp.where(done, 0.0, lp), done | jnp.isin(tok, eos)

    key, sub = jax.random.split(key)
    done0 = jnp.zeros((b,), bool)
    tok, lp, done = pick(last_logits, sub, done0)
    toks = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    lps = jnp.zeros((b, max_new_tokens), jnp.float32).at[:, 0].set(lp)
    lengths = jnp.ones((b,), jnp.int32)

    def cond(state):
        i, _, _, done, _, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, toks, lps, done, lengths, cache, key = state
        prev = jax.lax.dynamic_slice_in_dim(toks, i - 1, 1, axis=1)
        out = forward(params, config, prev, edits=edits, cache=cache)
        key, sub = jax.random.split(key)
        tok, lp, new_done = pick(out.logits[:, -1], sub, done)
        toks = jax.lax.dynamic_update_slice_in_dim(toks, tok[:, None], i, axis=1)
        lps = jax.lax.dynamic_update_slice_in_dim(lps, lp[:, None], i, axis=1)
        lengths = lengths + (~done).astype(jnp.int32)
        return i + 1, toks, lps, new_done, lengths, out.cache, key

    state = (jnp.ones((), jnp.int32), toks, lps, done, lengths, cache, key)
    _, toks, lps, done, lengths, cache, _ = jax.lax.while_loop(cond, body, state)
    return Generation(tokens=toks, logprobs=lps, finished=done, lengths=lengths, cache=cache)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "sample", "use_top_p", "eos_ids", "pad_id",
                                             "top_k"))
def _generate(params, config, tokens, attention_mask, edits, key, temperature, top_p, *, max_new_tokens, sample,
              use_top_p, eos_ids, pad_id, top_k=None):
    out = prefill(params, config, tokens, attention_mask, cache_size=tokens.shape[1] + max_new_tokens, edits=edits)
    return decode(params, config, out.cache, out.logits[:, -1], max_new_tokens=max_new_tokens, key=key,
                  temperature=temperature, top_p=top_p, sample=sample, use_top_p=use_top_p, edits=edits,
                  eos_ids=eos_ids, pad_id=pad_id, top_k=top_k)


def generate(params, config: ModelConfig, tokens, attention_mask=None, *, max_new_tokens: int = 32, key=None,
             temperature: float = 0.0, top_p: float = 1.0, edits: Sequence = (), eos_ids=None,
             pad_id: int | None = None, top_k: int | None = None) -> Generation:
    """Greedy (temperature 0) or sampled generation for a left-padded batch; jitted as a whole.

    temperature/top_p are traced (a sweep does not recompile); whether to sample and whether to
    apply top-p are decided from their Python values. top_k (static) samples among the k most likely tokens
    (then top-p among those, renormalised, as Hugging Face's warpers do).
    """
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature}, top_p={top_p}; expected temperature >= 0 and 0 < top_p <= 1")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}; expected None or an int >= 1")
    sample = temperature > 0
    if sample and key is None:
        raise ValueError("sampling (temperature > 0) needs an explicit PRNG key")
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.ones(tokens.shape, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    eos_ids = tuple(config.eos_token_ids) if eos_ids is None else tuple(eos_ids)
    pad_id = (config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)) \
        if pad_id is None else pad_id
    key = jax.random.key(0) if key is None else key
    return _generate(params, config, tokens, mask, tuple(edits), key, jnp.float32(max(temperature, 1e-6)),
                     jnp.float32(top_p), max_new_tokens=max_new_tokens, sample=sample, use_top_p=top_p < 1.0,
                     eos_ids=eos_ids, pad_id=int(pad_id), top_k=None if top_k is None else int(top_k))
