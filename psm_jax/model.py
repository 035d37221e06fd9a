"""The forward pass: embed -> lax.scan(block) -> final norm -> unembed, with sites, edits, capture
and an optional KV cache.

The cache's stacked K/V [L, B, S, KV, hd] are carried through the layer scan: each layer writes its new
slots with one `dynamic_update_slice` at [layer, :, cache.length], which XLA performs in place (also
inside generate's decode loop), so a decode step writes one slot per layer rather than a fresh cache.
Attention masks and RoPE angles are built once per forward, outside the scan.

Sites are defined here, once (see `SITES` in edits.py). Mapping to Hugging Face
`output_hidden_states`: `resid_pre[i] == hidden_states[i]` and `resid_post[i] ==
hidden_states[i + 1]` (HF's last entry additionally has the final norm applied; ours does not).
`attn_out` / `mlp_out` are what is added to the residual stream (after Gemma's post-norms).
`q`, `k` are post-RoPE (and post QK-norm), `q_prerope`/`k_prerope` before RoPE; shape
[B, T, heads, head_dim]. Captured sites come back as [n_captured_layers, B, T, ...].
Projections go through `psm_jax.native.amx.dense`: XLA's dot, except bf16 on an AMX CPU (a compiled tile kernel);
layer weights may also come as raw bf16 bits (`amx.kernel_layout`, inference only: no weight gradients).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from psm_jax.attention import (apply_rope, attention_bias, cached_attention, grouped_attention, rope_angles,
                               rope_inv_freq)
from psm_jax.config import ModelConfig
from psm_jax.edits import SITES, apply_edits
from psm_jax.native import amx


@dataclasses.dataclass(frozen=True)
class Capture:
    """Which sites at which layers a forward returns (static: part of the compiled function)."""

    sites: tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None  # None = every layer

    def __post_init__(self):
        object.__setattr__(self, "sites", tuple(self.sites))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        for s in self.sites:
            if s not in SITES:
                raise ValueError(f"unknown site {s!r}; expected one of {SITES}")

    def layer_list(self, config: ModelConfig) -> tuple[int, ...]:
        layers = tuple(range(config.n_layers)) if self.layers is None else self.layers
        for layer in layers:
            config.check_layer(layer, "capture layer")
        return layers


@struct.dataclass
class KVCache:
    """Keys (post-RoPE) and values per layer on a slot axis, with each slot's position and validity.

    k, v: [L, B, S, n_kv_heads, head_dim]; positions: int32 [B, S]; valid: bool [B, S];
    length: int32 scalar, the next free slot; next_position: int32 [B], position of the next token.
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    valid: jax.Array
    length: jax.Array
    next_position: jax.Array

    @property
    def size(self) -> int:
        return self.k.shape[2]


def init_cache(config: ModelConfig, batch: int, size: int, dtype=jnp.float32) -> KVCache:
    shape = (config.n_layers, batch, size, config.n_kv_heads, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), positions=jnp.zeros((batch, size), jnp.int32),
                   valid=jnp.zeros((batch, size), bool), length=jnp.zeros((), jnp.int32),
                   next_position=jnp.zeros((batch,), jnp.int32))


@struct.dataclass
class ForwardOutput:
    logits: jax.Array
    captured: dict
    cache: Any = None
    residual: Any = None  # [B, T, D] after the last layer run, when a forward stops early or returns no logits


def rms_norm(x, weight, eps: float, offset: float):
    """RMSNorm computed in float32 (as HF does), weight applied as (offset + w)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * (offset + weight.astype(jnp.float32))).astype(x.dtype)


def _activation(config: ModelConfig, x):
    if config.activation == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=True)


def project_kv(config: ModelConfig, lp: dict, x, cos, sin):
    """K (pre- and post-RoPE) and V [B, T, KV, hd] from the normed block input x."""
    b, t, _ = x.shape
    k = amx.dense(x, lp["wk"])
    v = amx.dense(x, lp["wv"])
    if config.qkv_bias:
        k, v = k + lp["bk"], v + lp["bv"]
    k = k.reshape(b, t, config.n_kv_heads, config.head_dim)
    v = v.reshape(b, t, config.n_kv_heads, config.head_dim)
    if config.qk_norm:
        k = rms_norm(k, lp["k_norm"], config.norm_eps, config.norm_offset)
    return k, apply_rope(k, cos, sin), v


def _rope_tables(config: ModelConfig, positions):
    """(cos, sin) for global layers and, when the config has them, local (sliding) layers."""
    glob = rope_angles(jnp.asarray(rope_inv_freq(config.rope, config.head_dim)), positions)
    if config.rope_local is None:
        return glob, glob
    return glob, rope_angles(jnp.asarray(rope_inv_freq(config.rope_local, config.head_dim)), positions)


_READ_ONLY_SITES = ("q", "k", "v", "q_prerope", "k_prerope")  # captured, never edited


def _site(edits, capture_sites, layer, slot_index, out: dict, name: str, value):
    """A named activation site: the edits acting there applied (not at the attention's read-only q / k / v sites),
    then the value recorded in `out` when `name` is captured."""
    if name not in _READ_ONLY_SITES:
        value = apply_edits(edits, name, layer, value, slot_index)
    if name in capture_sites:
        out[name] = value
    return value


def _block(config: ModelConfig, edits, capture_sites, slot_index, rope, attn_ctx, carry, layer_in):
    """One decoder block. carry = (h, cache_k, cache_v) (the caches are None without a KV cache).

    Returns (carry, per-layer outputs: the captured sites).
    """
    h, cache_k, cache_v = carry
    lp, layer, is_sliding = layer_in
    c = config
    out = {}
    site = functools.partial(_site, edits, capture_sites, layer, slot_index, out)
    h = site("resid_pre", h)
    x = site("attn_in", rms_norm(h, lp["attn_norm"], c.norm_eps, c.norm_offset))
    o, cache_k, cache_v = _attention(c, lp, x, layer, is_sliding, rope, attn_ctx, cache_k, cache_v, site)
    h = site("resid_mid", h + site("attn_out", o))
    x = site("mlp_in", rms_norm(h, lp["mlp_norm"], c.norm_eps, c.norm_offset))
    h = site("resid_post", h + site("mlp_out", _mlp(c, lp, x)))
    return (h, cache_k, cache_v), out


def project_q(config: ModelConfig, lp: dict, x):
    """Q before RoPE [B, T, H, hd] from the normed block input x."""
    b, t, _ = x.shape
    q = amx.dense(x, lp["wq"])
    if config.qkv_bias:
        q = q + lp["bq"]
    q = q.reshape(b, t, config.n_heads, config.head_dim)
    if config.qk_norm:
        q = rms_norm(q, lp["q_norm"], config.norm_eps, config.norm_offset)
    return q


def _write_cache(cache, x, at):
    """`cache` with x [B, T, KV, hd] written in place at `at` (layer, 0, slot, 0, 0), in the cache's dtype.

    A 16-bit float cache is updated through its raw bits: XLA's CPU backend computes a 16-bit float
    dynamic-update-slice in f32, converting the whole cache there and back at every write."""
    x = x.astype(cache.dtype)[None]
    if cache.dtype.itemsize != 2 or not jnp.issubdtype(cache.dtype, jnp.floating):
        return jax.lax.dynamic_update_slice(cache, x, at)
    bits = jax.lax.bitcast_convert_type
    return bits(jax.lax.dynamic_update_slice(bits(cache, jnp.uint16), bits(x, jnp.uint16), at), cache.dtype)


def _attention(config: ModelConfig, lp: dict, x, layer, is_sliding, rope, attn_ctx, cache_k, cache_v, site):
    """The attention sublayer's output (before the residual add) and the caches.

    With a cache, this layer's new K/V are written into the carried [L, B, S, KV, hd] arrays at
    [layer, :, write_at] (an in-place update of T slots) and attention reads the layer's slots back
    (`cached_attention`: in place on the f32 CPU decoding kernel). When the cache held nothing before these tokens
    (`empty_cache`, a prefill), its other slots are all masked, so attention reads only the new K/V (as stored in
    the cache's dtype) and skips the keys after each query block, as without a cache."""
    c = config
    (gcos, gsin), (lcos, lsin) = rope
    cos = jnp.where(is_sliding, lcos, gcos)
    sin = jnp.where(is_sliding, lsin, gsin)
    q = site("q_prerope", project_q(c, lp, x))
    q = site("q", apply_rope(q, cos, sin))
    k_pre, k, v = project_kv(c, lp, x, cos, sin)
    site("k_prerope", k_pre)
    site("k", k)
    site("v", v)

    global_bias, local_bias, write_at, empty_cache = attn_ctx
    bias = global_bias if local_bias is None else jnp.where(is_sliding, local_bias, global_bias)
    scale = c.query_scale if c.query_scale is not None else c.head_dim ** -0.5
    if cache_k is None:
        attn = grouped_attention(q, k, v, bias, scale=scale, softcap=c.attn_logit_softcap, causal=True)
    else:
        at = (layer, 0, write_at, 0, 0)
        cache_k, cache_v = _write_cache(cache_k, k, at), _write_cache(cache_v, v, at)
        if empty_cache:
            k, v = k.astype(cache_k.dtype).astype(q.dtype), v.astype(cache_v.dtype).astype(q.dtype)
            attn = grouped_attention(q, k, v, bias, scale=scale, softcap=c.attn_logit_softcap, causal=True)
        else:
            attn = cached_attention(q, cache_k, cache_v, layer, bias, scale=scale, softcap=c.attn_logit_softcap)
    b, t = x.shape[:2]
    o = amx.dense(attn.reshape(b, t, c.n_heads * c.head_dim), lp["wo"])
    if c.o_bias:
        o = o + lp["bo"]
    if c.sandwich_norms:
        o = rms_norm(o, lp["post_attn_norm"], c.norm_eps, c.norm_offset)
    return o, cache_k, cache_v


def _mlp(config: ModelConfig, lp: dict, x):
    """The MLP sublayer's output (before the residual add) from its normed input x."""
    c = config
    if c.activation == "silu" and not c.mlp_bias and amx.uses_gated_kernel(x, lp["w_gate"], lp["w_up"]):
        hidden = amx.gated_silu(x, lp["w_gate"], lp["w_up"])      # one fused kernel (bf16 on AMX)
    else:
        gate, up = amx.dense(x, lp["w_gate"]), amx.dense(x, lp["w_up"])
        if c.mlp_bias:
            gate, up = gate + lp["b_gate"], up + lp["b_up"]
        hidden = _activation(c, gate) * up
    m = amx.dense(hidden, lp["w_down"])
    if c.mlp_bias:
        m = m + lp["b_down"]
    if c.sandwich_norms:
        m = rms_norm(m, lp["post_mlp_norm"], c.norm_eps, c.norm_offset)
    return m


def is_concrete(x) -> bool:
    """True when x holds values (not a jit/vmap tracer): host-side checks run only then."""
    return not isinstance(x, jax.core.Tracer)


def check_token_ids(config: ModelConfig, tokens, what: str = "tokens") -> None:
    """Raise if integer token ids (concrete, any shape) fall outside [0, vocab_size); tracers are not checked."""
    if not is_concrete(tokens) or np.size(tokens) == 0:
        return
    # An array spread over several processes is checked shard by shard: each process sees only its own part.
    if isinstance(tokens, jax.Array) and not tokens.is_fully_addressable:
        parts = [np.asarray(s.data) for s in tokens.addressable_shards]
    else:
        parts = [np.asarray(tokens)]
    lo, hi = min(int(p.min()) for p in parts), max(int(p.max()) for p in parts)
    if lo < 0 or hi >= config.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what} contain id {bad}; expected ids in [0, {config.vocab_size}) (vocab_size)")


def check_tokens(config: ModelConfig, tokens) -> None:
    """tokens are a non-empty integer [batch, seq] array; their ids are checked where concrete."""
    if tokens.ndim != 2 or 0 in tokens.shape:
        raise ValueError(f"tokens have shape {tokens.shape}; expected [batch, seq] with batch, seq >= 1")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens have dtype {tokens.dtype}; expected an integer dtype (token ids)")
    check_token_ids(config, tokens)


def _check_inputs(config: ModelConfig, tokens, attention_mask, edits, cache):
    """Shapes and dtypes always; token ids, cache room and positions where the values are concrete."""
    check_tokens(config, tokens)
    if attention_mask is not None and attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask has shape {attention_mask.shape}; expected {tokens.shape}")
    b, t = tokens.shape
    if cache is None:
        if t > config.max_position:
            raise ValueError(f"sequence length {t} exceeds the model's max_position={config.max_position}; "
                             "expected at most max_position tokens")
    else:
        if cache.k.shape[1] != b:
            raise ValueError(f"tokens have batch {b} but the KV cache has batch {cache.k.shape[1]}; expected equal")
        if is_concrete(cache.length) and int(cache.length) + t > cache.size:
            raise ValueError(f"writing {t} tokens at slot {int(cache.length)} overflows the KV cache of "
                             f"{cache.size} slots; expected cache.length + T <= cache.size")
        if is_concrete(cache.next_position) and int(jnp.max(cache.next_position)) + t > config.max_position:
            raise ValueError(f"{t} tokens starting at position {int(jnp.max(cache.next_position))} exceed the model's "
                             f"max_position={config.max_position}; expected positions < max_position")
    check_edits(config, edits, b, t if cache is None else cache.size)


def _check_empty_cache(cache: KVCache | None, empty_cache: bool) -> None:
    if not empty_cache:
        return
    if cache is None:
        raise ValueError("empty_cache=True without a cache; expected a KVCache of length 0")
    if is_concrete(cache.length) and int(cache.length) != 0:
        raise ValueError(f"empty_cache=True but the cache holds {int(cache.length)} tokens; expected length 0")


def check_layer_range(config: ModelConfig, start_layer, stop_layer, residual, tokens, edits, capture) -> tuple:
    """(start, stop) of a forward over layers [start, stop): a residual [B, T, D] is the input exactly when
    start > 0, and edits (concrete masks) and captures lie inside the range, since those outside it would never
    run."""
    n = config.n_layers
    start, stop = start_layer, n if stop_layer is None else stop_layer
    for name, v in (("start_layer", start), ("stop_layer", stop)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name}={v!r}; expected an int")
    if not 0 <= start < stop <= n:
        raise ValueError(f"layer range [{start}, {stop}); expected 0 <= start_layer < stop_layer <= n_layers={n}")
    if (residual is None) != (start == 0):
        raise ValueError(f"start_layer={start} with residual={'None' if residual is None else 'an array'}; a forward "
                         "from layer 0 embeds the tokens, one from a later layer takes the residual stream entering it")
    if residual is not None and tuple(residual.shape) != tuple(tokens.shape) + (config.d_model,):
        want = tuple(tokens.shape) + (config.d_model,)
        raise ValueError(f"residual has shape {tuple(residual.shape)}; expected {want} (tokens' [B, T] and d_model)")
    whole = (start, stop) == (0, n)  # the default: nothing can lie outside, and nothing is read back to the host
    for e in () if whole else edits:
        if is_concrete(e.layers) and np.asarray(e.layers)[np.r_[0:start, stop:n]].any():
            bad = [int(i) for i in np.flatnonzero(np.asarray(e.layers)) if not start <= i < stop]
            raise ValueError(f"an edit acts at layers {bad}, outside the forward's layers [{start}, {stop})")
    if capture.sites and not whole:
        outside = [i for i in capture.layer_list(config) if not start <= i < stop]
        if outside:
            raise ValueError(f"capture layers {outside} lie outside the forward's layers [{start}, {stop})")
    return int(start), int(stop)


def check_edits(config: ModelConfig, edits, batch: int, width: int) -> None:
    """Each edit is an edits.* object whose layer mask is [n_layers] and position mask [batch, width]."""
    for e in edits:
        if not hasattr(e, "transform") or not hasattr(e, "layers"):
            raise TypeError(f"edit {e!r} is not an edit; expected psm_jax.edits objects (edits.add, edits.clamp, ...)")
        if e.layers.shape != (config.n_layers,):
            raise ValueError(f"edit layer mask has shape {e.layers.shape}; expected ({config.n_layers},)")
        if e.positions is not None and tuple(e.positions.shape) != (batch, width):
            raise ValueError(
                f"edit positions mask has shape {tuple(e.positions.shape)}; expected ({batch}, {width})"
                " (batch, sequence length or cache size)")


def unembed(params: dict, config: ModelConfig, h):
    """Final norm + output projection (+ Gemma's final soft-cap); float32 logits."""
    x = rms_norm(h, params["final_norm"], config.norm_eps, config.norm_offset)
    return vocab_logits(x, unembedding(params, config), config)


def unembedding(params: dict, config: ModelConfig):
    """The output projection's weight: the embedding [V, D] when tied, else the unembedding [D, V]."""
    return params["embed"] if config.tie_embeddings else params["unembed"]


def vocab_logits(x, weight, config: ModelConfig):
    """float32 logits of final-normed hidden states x [..., D] through `unembedding`'s weight, soft-capped where the
    family caps them (Gemma)."""
    logits = amx.dense(x, weight.astype(x.dtype), transpose_b=config.tie_embeddings).astype(jnp.float32)
    if config.final_logit_softcap is not None:
        logits = jnp.tanh(logits / config.final_logit_softcap) * config.final_logit_softcap
    return logits


def embed(params: dict, config: ModelConfig, tokens):
    h = jnp.take(params["embed"], tokens, axis=0)
    if config.embed_scale != 1.0:
        h = h * jnp.asarray(config.embed_scale, h.dtype)
    return h


def _attention_biases(config: ModelConfig, slots: "_Slots", t: int, empty_cache: bool, dtype):
    """(global, sliding-window or None) additive attention biases [B, 1, 1, T, keys], shared by every layer. With
    `empty_cache` the keys are the new tokens' slots [0, T) only, where an empty cache writes them."""
    keys = slice(0, t) if empty_cache else slice(None)
    k_pos, k_valid = slots.k_pos[:, keys], slots.k_valid[:, keys]
    global_bias = attention_bias(slots.positions, k_pos, k_valid, None, False, dtype)
    local_bias = None
    if config.sliding_window is not None and any(config.layer_is_sliding):
        local_bias = attention_bias(slots.positions, k_pos, k_valid, config.sliding_window, True, dtype)
    return global_bias, local_bias


def forward(params: dict, config: ModelConfig, tokens, *, attention_mask=None, edits: Sequence = (),
            capture: Capture = Capture(), cache: KVCache | None = None, return_logits: bool = True,
            logits_positions=None, start_layer: int = 0, stop_layer: int | None = None,
            residual=None, empty_cache: bool = False) -> ForwardOutput:
    """Run the model on tokens [B, T].

    Without a cache, keys are the tokens themselves; with one, the tokens are written at slots
    [cache.length, cache.length + T) and attend to every valid slot. Positions follow the
    attention mask (left padding gets no positions), as HF's `generate` computes them.
    `logits_positions`: None for all positions, "last" for the last slot only (saves the
    vocab projection during prefill), or int positions [B, A] per row (logits [B, A, V]: a scorer that
    reads a few target positions skips the vocab projection everywhere else; not through `jit_forward`,
    whose static arguments must be hashable).

    `start_layer` / `stop_layer` (static) run only layers [start, stop): from a later layer the input is
    `residual` [B, T, D], the stream entering `start_layer` (tokens still give the shape and, with the mask, the
    positions); stopping early returns that stream in `ForwardOutput.residual` and no logits, as does
    `return_logits=False` (the stream after the last layer, before the final norm: a fused loss head's input).
    A cache is indexed by absolute layer, so two forwards over complementary ranges fill one cache: a band of
    edits that all act at or above some layer can share one run of the layers below it.

    `empty_cache=True` (static) is the caller's promise that `cache` holds nothing yet (length 0, as `prefill`
    makes it): the tokens attend among themselves only, skipping the empty slots that the mask would discard. The
    promise is checked where the length is concrete.

    Inputs are checked where their values are concrete (outside jit): token ids in [0, vocab_size),
    T <= config.max_position (padded width), and with a cache cache.length + T <= cache.size and
    positions below max_position. Under jit (traced tokens or cache) these are the caller's contract:
    an out-of-range id gathers a clamped embedding row, and a write past the cache end is clamped by
    `dynamic_update_slice` onto the last slots.
    """
    edits = tuple(edits)
    tokens = jnp.asarray(tokens) if isinstance(tokens, (list, tuple)) else tokens
    _check_inputs(config, tokens, attention_mask, edits, cache)
    _check_empty_cache(cache, empty_cache)
    start, stop = check_layer_range(config, start_layer, stop_layer, residual, tokens, edits, capture)
    b, t = tokens.shape
    mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    slots = _Slots.of(mask, cache)
    h = embed(params, config, tokens) if start == 0 else residual
    # Masks and RoPE angles are the same at every layer: built once here, selected per layer in the scan.
    global_bias, local_bias = _attention_biases(config, slots, t, empty_cache, h.dtype)
    slot_index = slots.write_at + jnp.arange(t, dtype=jnp.int32)
    body = functools.partial(_block, config, edits, tuple(capture.sites), slot_index,
                             _rope_tables(config, slots.positions),
                             (global_bias, local_bias, slots.write_at, empty_cache))
    layer_params = params["layers"]
    if stop - start < config.n_layers:
        layer_params = jax.tree.map(lambda a: a[start:stop], layer_params)
    xs = (layer_params, jnp.arange(start, stop, dtype=jnp.int32),
          jnp.asarray(np.array(config.layer_is_sliding[start:stop], bool)))
    carry = (h, None if cache is None else cache.k, None if cache is None else cache.v)
    (h, new_k, new_v), captured = _scan_layers(body, carry, xs, capture, config, start, stop - start)
    new_cache = None
    if cache is not None:
        new_cache = KVCache(k=new_k, v=new_v, positions=slots.k_pos, valid=slots.k_valid,
                            length=cache.length + t, next_position=jnp.max(slots.positions, axis=1) + 1)
    if stop < config.n_layers or not return_logits:
        return ForwardOutput(logits=None, captured=captured, cache=new_cache, residual=h)
    return ForwardOutput(logits=_logits(params, config, h, logits_positions), captured=captured, cache=new_cache)


class _Slots(NamedTuple):
    """Where the tokens sit: their RoPE positions [B, T] (following the mask, so left padding gets none, as HF's
    `generate` computes them), the first cache slot they are written at, and the keys' positions and validity
    (the tokens themselves without a cache; with one, every cache slot with these tokens written in: the new
    cache's positions and validity)."""

    positions: jax.Array
    write_at: jax.Array
    k_pos: jax.Array
    k_valid: jax.Array

    @classmethod
    def of(cls, mask, cache: KVCache | None) -> "_Slots":
        b = mask.shape[0]
        start_pos = jnp.zeros((b,), jnp.int32) if cache is None else cache.next_position
        positions = jnp.maximum(start_pos[:, None] + jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
        if cache is None:
            return cls(positions, jnp.zeros((), jnp.int32), positions, mask)
        new_positions = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, cache.length, axis=1)
        new_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, mask, cache.length, axis=1)
        return cls(positions, cache.length, new_positions, new_valid)


def _scan_layers(body, carry, xs, capture: Capture, config: ModelConfig, start: int, n_run: int):
    """`lax.scan` of the block over the layers run; returns the final carry and the captured sites, each stacked
    over the captured layers [L_captured, ...] in `capture.layer_list` order."""
    capture_sites = tuple(capture.sites)
    idx = np.asarray(capture.layer_list(config)) - start if capture_sites else np.zeros((0,), int)
    kept = sorted(set(idx.tolist()))
    if not (capture_sites and len(kept) < n_run):
        carry, ys = jax.lax.scan(body, carry, xs)
        return carry, {s: ys[s] if (idx == np.arange(n_run)).all() else ys[s][idx] for s in capture_sites}
    # A few layers: captures go into carried buffers (one slot per captured layer, plus a scratch slot that the
    # other layers overwrite) instead of a stacked scan output for every layer that is then mostly dropped.
    shapes = jax.eval_shape(lambda c_, x_: body(c_, x_)[1], carry, jax.tree.map(lambda a: a[0], xs))
    bufs = {s: jnp.zeros((len(kept) + 1,) + shapes[s].shape, shapes[s].dtype) for s in capture_sites}
    slot_of = np.full(n_run, len(kept), np.int32)
    slot_of[kept] = np.arange(len(kept), dtype=np.int32)

    def body_into_buffers(state, xs_):
        carry_, bufs_ = state
        carry_, out = body(carry_, xs_[:-1])
        bufs_ = {s: jax.lax.dynamic_update_index_in_dim(bufs_[s], out.pop(s), xs_[-1], 0) for s in capture_sites}
        return (carry_, bufs_), out

    (carry, bufs), _ = jax.lax.scan(body_into_buffers, (carry, bufs), xs + (jnp.asarray(slot_of),))
    pos = np.searchsorted(kept, idx)
    return carry, {s: bufs[s][pos] for s in capture_sites}


def _logits(params, config: ModelConfig, h, logits_positions):
    """Logits at every position (None), the last slot only ("last") or the given positions [B, A]."""
    if logits_positions is None:
        return unembed(params, config, h)
    if isinstance(logits_positions, str):
        if logits_positions != "last":
            raise ValueError(f"logits_positions={logits_positions!r}; expected None, 'last' or positions [B, A]")
        return unembed(params, config, h[:, -1:])
    return unembed(params, config, jnp.take_along_axis(h, logits_positions[..., None], axis=1))


_jit_forward = jax.jit(forward, static_argnames=("config", "capture", "return_logits", "logits_positions",
                                                 "start_layer", "stop_layer"))


def jit_forward(params: dict, config: ModelConfig, tokens, **kwargs) -> ForwardOutput:
    """`forward` compiled (config, capture, return_logits, logits_positions and the layer range static), with the
    value checks (token ids, cache room, edits inside the layer range) run on the concrete inputs first."""
    tokens = jnp.asarray(tokens)
    edits = tuple(kwargs.get("edits", ()))
    _check_inputs(config, tokens, kwargs.get("attention_mask"), edits, kwargs.get("cache"))
    check_layer_range(config, kwargs.get("start_layer", 0), kwargs.get("stop_layer"), kwargs.get("residual"), tokens,
                      edits, kwargs.get("capture", Capture()))
    return _jit_forward(params, config, tokens, **kwargs)
