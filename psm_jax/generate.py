"""Prefill and decoding from a KV cache, with edits active at every step and optional per-step monitors.

`generate` = `prefill` (one forward over the padded prompt writing the cache) + `decode` (a
`lax.while_loop` of single-token forwards that stops when every row has emitted an EOS or the
budget is spent). Shapes are static (cache size = prompt + max_new_tokens), so one compilation
serves every prompt of the same padded length. Each step writes its token's K/V into the cache in
place (the cache is carried through the layer scan and the loop). Edits whose position masks cover
only the prompt are widened to the cache size once, before the loop; `extend` on each edit says whether
generated tokens are edited.

Monitors: `Monitor(directions [n_dirs, D], site, layers)` records, inside the same loop, the dot product
of the activation at `site` and each listed layer with each direction, at the position that produced each
generated token: `Generation.monitored[b, j, l, k] = <a, d_k>` where `a` is site `site` at layer
`layers[l]` of row b at the position whose next-token logits chose token j, i.e. the last prompt token
for j = 0 and generated token j - 1 for j >= 1 (so index 0 reads the prompt's end, which predicts the
response). Entries for tokens after a row's EOS (j >= lengths[b]) are 0. Directions are traced: a new set
of the same shape does not recompile.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from psm_jax.config import ModelConfig
from psm_jax.edits import EDITABLE_SITES
from psm_jax.logits import argmax_last, categorical_last
from psm_jax.model import (Capture, ForwardOutput, KVCache, check_edits, check_tokens, forward, init_cache,
                           is_concrete)


@struct.dataclass
class Monitor:
    """Directions [n_dirs, D] whose dot products with `site` at `layers` are recorded at every decode step.

    The projection is the raw dot product <a, d> (normalise d to unit length for the component along it).
    `site` must be a residual-width site (one of edits.EDITABLE_SITES); site and layers are static.
    """

    directions: jax.Array
    site: str = struct.field(pytree_node=False, default="resid_post")
    layers: tuple[int, ...] = struct.field(pytree_node=False, default=())

    def capture(self) -> Capture:
        return Capture(sites=(self.site,), layers=self.layers)

    def project(self, captured: dict, position: int) -> jax.Array:
        """float32 [B, n_layers, n_dirs] at slot `position` of a forward's captured [n_layers, B, T, D]."""
        a = captured[self.site][:, :, position].astype(jnp.float32)
        return jnp.einsum("lbd,kd->blk", a, self.directions.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)


def check_monitor(config: ModelConfig, monitor) -> Monitor:
    """Validate a Monitor's site, layers and directions (names the offending value)."""
    if not isinstance(monitor, Monitor):
        raise TypeError(f"monitors={monitor!r}; expected a psm_jax.generate.Monitor or None")
    if monitor.site not in EDITABLE_SITES:
        raise ValueError(f"monitor site {monitor.site!r}; expected a residual-width site, one of {EDITABLE_SITES}")
    layers = (monitor.layers,) if isinstance(monitor.layers, (int, np.integer)) else monitor.layers
    if not isinstance(layers, (tuple, list)) or not layers:
        raise ValueError(f"monitor layers={monitor.layers!r}; expected a non-empty tuple of layer indices")
    for layer in layers:
        config.check_layer(int(layer) if isinstance(layer, np.integer) else layer, "monitor layer")
    d = jnp.asarray(monitor.directions)
    if d.ndim != 2 or d.shape[1] != config.d_model:
        raise ValueError(f"monitor directions have shape {tuple(d.shape)}; expected [n_dirs, d_model={config.d_model}]")
    if not jnp.issubdtype(d.dtype, jnp.floating):
        raise TypeError(f"monitor directions have dtype {d.dtype}; expected a float dtype")
    if is_concrete(d) and not bool(jnp.all(jnp.isfinite(d))):
        raise ValueError("monitor directions contain NaN or inf; expected finite values")
    return monitor.replace(directions=d, layers=tuple(int(x) for x in layers))


@struct.dataclass
class Generation:
    tokens: jax.Array  # int32 [B, max_new_tokens]; after EOS: pad
    logprobs: jax.Array  # float32 [B, max_new_tokens]: log p(token) under the (unscaled) model
    finished: jax.Array  # bool [B]: emitted EOS
    lengths: jax.Array  # int32 [B]: generated tokens up to and including EOS
    cache: KVCache
    monitored: Any = None  # float32 [B, max_new_tokens, n_layers, n_dirs] with a Monitor (see the module doc)


def widen_edits(edits: Sequence, size: int) -> tuple:
    """Pad each edit's position mask on the slot axis to `size` with the edit's `extend` value."""
    out = []
    for e in edits:
        if getattr(e, "positions", None) is not None and e.positions.shape[1] < size:
            pad = jnp.full((e.positions.shape[0], size - e.positions.shape[1]), e.extend, bool)
            e = e.replace(positions=jnp.concatenate([e.positions, pad], axis=1))
        out.append(e)
    return tuple(out)


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r}; expected an int >= {minimum}")
    return int(value)


def check_cache_dtype(cache_dtype, params) -> jnp.dtype:
    """The KV cache's dtype: `cache_dtype` (a floating dtype), or the embedding's dtype when None."""
    if cache_dtype is None:
        return jnp.dtype(params["embed"].dtype)
    try:
        dtype = jnp.dtype(cache_dtype)
    except TypeError:
        raise TypeError(f"cache_dtype={cache_dtype!r}; expected a floating dtype such as jnp.bfloat16") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"cache_dtype={dtype}; expected a floating dtype (float32, bfloat16, float16)")
    return dtype


def prefill(params, config: ModelConfig, tokens, attention_mask=None, *, cache_size: int, edits: Sequence = (),
            capture: Capture = Capture(), cache_dtype=None) -> ForwardOutput:
    """Forward over the prompt, writing a fresh cache of `cache_size` slots; logits of the last slot.

    The cache holds K/V in `cache_dtype` (default: the weights' dtype). A bf16 cache of an f32 model halves its
    memory; attention reads it widened to f32, so only the stored K/V are rounded."""
    tokens = jnp.asarray(tokens)
    check_tokens(config, tokens)
    b, t = tokens.shape
    cache_size = _check_count("cache_size", cache_size, 1)
    if cache_size < t:
        raise ValueError(f"cache_size={cache_size} is smaller than the prompt length {t}; expected cache_size >= {t}")
    cache = init_cache(config, b, cache_size, check_cache_dtype(cache_dtype, params))
    return forward(params, config, tokens, attention_mask=attention_mask, edits=widen_edits(edits, cache_size),
                   capture=capture, cache=cache, logits_positions="last", empty_cache=True)


def extend(params, config: ModelConfig, cache: KVCache, tokens, attention_mask=None, *, edits: Sequence = (),
           capture: Capture = Capture()) -> ForwardOutput:
    """Append tokens [B, T] to an existing cache (e.g. a new user turn after a cache edit).

    Raises when the cache (concrete) has fewer than T free slots; see `forward` for the contract under jit."""
    return forward(params, config, jnp.asarray(tokens), attention_mask=attention_mask,
                   edits=widen_edits(edits, cache.size), capture=capture, cache=cache, logits_positions="last")


def _choose(logits, key, temperature, top_p, sample: bool, use_top_p: bool, top_k: int | None = None):
    """Next token: argmax, or a sample at `temperature` from the `top_k` most likely tokens (all when None) and,
    with `use_top_p`, from the smallest head of those whose probability (renormalised over them) reaches top_p.
    A small top_k also makes nucleus sampling cheap: only k logits are sorted instead of the vocabulary."""
    if not sample:
        return argmax_last(logits)
    scaled = logits / temperature
    if use_top_p or top_k is not None:
        k = scaled.shape[-1] if top_k is None else min(int(top_k), scaled.shape[-1])
        head, order = jax.lax.top_k(scaled, k)
        if use_top_p:
            probs = jax.nn.softmax(head, axis=-1)
            keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # always keeps the most likely token
            head = jnp.where(keep, head, -jnp.inf)
        choice = categorical_last(key, head)
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return categorical_last(key, scaled)


def decode(params, config: ModelConfig, cache: KVCache, last_logits, *, max_new_tokens: int, key=None,
           temperature=1.0, top_p=1.0, sample: bool = False, use_top_p: bool = False, edits: Sequence = (),
           eos_ids: tuple[int, ...] = (), pad_id: int = 0, top_k: int | None = None, monitor: Monitor | None = None,
           first_monitored=None) -> Generation:
    """Decode up to `max_new_tokens` tokens continuing from `cache` whose next-token logits are `last_logits` [B, V].

    Token j >= 1 is chosen after writing token j - 1 into the cache, so the cache needs max_new_tokens - 1 free
    slots: checked (ValueError) when cache.length is concrete. Under jit the loop also stops when the cache is
    full, so a short cache yields fewer tokens (`lengths`, `finished` say so) and never overwrites slots.
    With a `monitor`, `first_monitored` [B, n_layers, n_dirs] is the projection at the position that produced
    `last_logits` (generate passes the prefill's; zeros when omitted).
    """
    max_new_tokens = _check_count("max_new_tokens", max_new_tokens, 1)
    if is_concrete(cache.length) and int(cache.length) + max_new_tokens - 1 > cache.size:
        raise ValueError(f"max_new_tokens={max_new_tokens} needs {max_new_tokens - 1} free cache slots but the cache "
                         f"has {cache.size - int(cache.length)} (length {int(cache.length)} of {cache.size}); "
                         "expected cache.length + max_new_tokens - 1 <= cache.size")
    b = last_logits.shape[0]
    key = jax.random.key(0) if key is None else key
    edits = widen_edits(edits, cache.size)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    capture = Capture() if monitor is None else monitor.capture()

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
    mon = None
    if monitor is not None:
        shape = (b, max_new_tokens, len(monitor.layers), monitor.directions.shape[0])
        first = jnp.zeros(shape[:1] + shape[2:], jnp.float32) if first_monitored is None else first_monitored
        mon = jnp.zeros(shape, jnp.float32).at[:, 0].set(first.astype(jnp.float32))

    def cond(state):
        i, _, _, done, _, cache, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done) & (cache.length < cache.size)

    def body(state):
        i, toks, lps, done, lengths, cache, key, mon = state
        prev = jax.lax.dynamic_slice_in_dim(toks, i - 1, 1, axis=1)
        out = forward(params, config, prev, edits=edits, cache=cache, capture=capture)
        key, sub = jax.random.split(key)
        tok, lp, new_done = pick(out.logits[:, -1], sub, done)
        toks = jax.lax.dynamic_update_slice_in_dim(toks, tok[:, None], i, axis=1)
        lps = jax.lax.dynamic_update_slice_in_dim(lps, lp[:, None], i, axis=1)
        if mon is not None:
            proj = jnp.where(done[:, None, None], 0.0, monitor.project(out.captured, 0))
            mon = jax.lax.dynamic_update_index_in_dim(mon, proj, i, axis=1)
        lengths = lengths + (~done).astype(jnp.int32)
        return i + 1, toks, lps, new_done, lengths, out.cache, key, mon

    state = (jnp.ones((), jnp.int32), toks, lps, done, lengths, cache, key, mon)
    _, toks, lps, done, lengths, cache, _, mon = jax.lax.while_loop(cond, body, state)
    return Generation(tokens=toks, logprobs=lps, finished=done, lengths=lengths, cache=cache, monitored=mon)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "sample", "use_top_p", "eos_ids", "pad_id",
                                             "top_k", "cache_dtype"))
def _generate(params, config, tokens, attention_mask, edits, key, temperature, top_p, monitor, *, max_new_tokens,
              sample, use_top_p, eos_ids, pad_id, top_k=None, cache_dtype=None):
    capture = Capture() if monitor is None else monitor.capture()
    out = prefill(params, config, tokens, attention_mask, cache_size=tokens.shape[1] + max_new_tokens, edits=edits,
                  capture=capture, cache_dtype=cache_dtype)
    first = None if monitor is None else monitor.project(out.captured, -1)
    return decode(params, config, out.cache, out.logits[:, -1], max_new_tokens=max_new_tokens, key=key,
                  temperature=temperature, top_p=top_p, sample=sample, use_top_p=use_top_p, edits=edits,
                  eos_ids=eos_ids, pad_id=pad_id, top_k=top_k, monitor=monitor, first_monitored=first)


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}={value!r} has type {type(value).__name__}; expected a Python or NumPy real number")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name}=nan; expected a number")
    return value


def _token_ids(config: ModelConfig, name: str, ids) -> tuple[int, ...]:
    ids = (ids,) if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool) else ids
    try:
        ids = tuple(ids)
    except TypeError:
        raise TypeError(f"{name}={ids!r}; expected a sequence of token ids") from None
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"{name} contains {i!r}; expected int token ids")
        if not 0 <= i < config.vocab_size:
            raise ValueError(f"{name} contains id {i}; expected ids in [0, {config.vocab_size}) (vocab_size)")
    return tuple(int(i) for i in ids)


def generate(params, config: ModelConfig, tokens, attention_mask=None, *, max_new_tokens: int = 32, key=None,
             temperature: float = 0.0, top_p: float = 1.0, edits: Sequence = (), eos_ids=None,
             pad_id: int | None = None, top_k: int | None = None, monitors: Monitor | None = None,
             cache_dtype=None) -> Generation:
    """Greedy (temperature 0) or sampled generation for a left-padded batch; jitted as a whole.

    temperature/top_p are traced (a sweep does not recompile); whether to sample and whether to
    apply top-p are decided from their Python values. top_k (static) samples among the k most likely tokens
    (then top-p among those, renormalised, as Hugging Face's warpers do). `monitors` (a Monitor) fills
    `Generation.monitored` (see the module doc). `cache_dtype` (static) is the KV cache's dtype (see `prefill`):
    jnp.bfloat16 halves the cache of an f32 model. Inputs are validated here: temperature a finite real >= 0,
    0 < top_p <= 1, max_new_tokens an int >= 1, prompt + max_new_tokens <= config.max_position, token ids,
    eos_ids and pad_id in [0, vocab_size).
    """
    temperature, top_p = _check_real("temperature", temperature), _check_real("top_p", top_p)
    if not 0 <= temperature < math.inf or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature}, top_p={top_p}; expected a finite temperature >= 0 "
                         "and 0 < top_p <= 1")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}; expected None or an int >= 1")
    max_new_tokens = _check_count("max_new_tokens", max_new_tokens, 1)
    sample = temperature > 0
    if sample and key is None:
        raise ValueError("sampling (temperature > 0) needs an explicit PRNG key")
    tokens = jnp.asarray(tokens)
    check_tokens(config, tokens)
    if tokens.shape[1] + max_new_tokens > config.max_position:
        raise ValueError(f"prompt length {tokens.shape[1]} + max_new_tokens={max_new_tokens} exceeds the model's "
                         f"max_position={config.max_position}; expected at most max_position positions")
    tokens = tokens.astype(jnp.int32)
    mask = jnp.ones(tokens.shape, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    eos_ids = _token_ids(config, "eos_ids", config.eos_token_ids if eos_ids is None else eos_ids)
    if pad_id is None:
        pad_id = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    pad_id = _token_ids(config, "pad_id", (pad_id,))[0]
    monitor = None if monitors is None else check_monitor(config, monitors)
    edits = widen_edits(edits, tokens.shape[1] + max_new_tokens)
    check_edits(config, edits, tokens.shape[0], tokens.shape[1] + max_new_tokens)
    key = jax.random.key(0) if key is None else key
    return _generate(params, config, tokens, mask, tuple(edits), key, jnp.float32(max(temperature, 1e-6)),
                     jnp.float32(top_p), monitor, max_new_tokens=max_new_tokens, sample=sample,
                     use_top_p=top_p < 1.0, eos_ids=eos_ids, pad_id=pad_id,
                     top_k=None if top_k is None else int(top_k), cache_dtype=check_cache_dtype(cache_dtype, params))
