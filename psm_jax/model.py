"""The forward pass: embed -> lax.scan(block) -> final norm -> unembed, with sites, edits, capture
and an optional KV cache.

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
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from psm_jax.attention import apply_rope, attention_bias, grouped_attention, rope_angles, rope_inv_freq
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


def _block(config: ModelConfig, edits, capture_sites, slot_index, rope, kv_context, h, layer_in):
    """One decoder block. Returns (h, per-layer outputs: captures and new K/V)."""
    lp, layer, is_sliding, cache_k, cache_v = layer_in
    c = config
    out = {}

    def site(name, value):
        if name in ("q", "k", "v", "q_prerope", "k_prerope"):
            if name in capture_sites:
                out[name] = value
            return value
        value = apply_edits(edits, name, layer, value, slot_index)
        if name in capture_sites:
            out[name] = value
        return value

    (gcos, gsin), (lcos, lsin) = rope
    cos = jnp.where(is_sliding, lcos, gcos)
    sin = jnp.where(is_sliding, lsin, gsin)

    h = site("resid_pre", h)
    x = site("attn_in", rms_norm(h, lp["attn_norm"], c.norm_eps, c.norm_offset))
    b, t, _ = x.shape
    q = amx.dense(x, lp["wq"])
    if c.qkv_bias:
        q = q + lp["bq"]
    q = q.reshape(b, t, c.n_heads, c.head_dim)
    if c.qk_norm:
        q = rms_norm(q, lp["q_norm"], c.norm_eps, c.norm_offset)
    site("q_prerope", q)
    q = site("q", apply_rope(q, cos, sin))
    k_pre, k, v = project_kv(c, lp, x, cos, sin)
    site("k_prerope", k_pre)
    site("k", k)
    site("v", v)

    q_pos, k_pos, k_valid, write_at = kv_context
    if cache_k is None:
        keys, values = k, v
    else:
        keys = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), write_at, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), write_at, axis=1)
        out["cache_k"], out["cache_v"] = keys, values
    bias = attention_bias(q_pos, k_pos, k_valid, c.sliding_window, is_sliding, x.dtype)
    scale = c.query_scale if c.query_scale is not None else c.head_dim ** -0.5
    attn = grouped_attention(q, keys.astype(q.dtype), values.astype(q.dtype), bias, scale=scale,
                             softcap=c.attn_logit_softcap)
    o = amx.dense(attn.reshape(b, t, c.n_heads * c.head_dim), lp["wo"])
    if c.o_bias:
        o = o + lp["bo"]
    if c.sandwich_norms:
        o = rms_norm(o, lp["post_attn_norm"], c.norm_eps, c.norm_offset)
    o = site("attn_out", o)
    h = site("resid_mid", h + o)

    x = site("mlp_in", rms_norm(h, lp["mlp_norm"], c.norm_eps, c.norm_offset))
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
    m = site("mlp_out", m)
    h = site("resid_post", h + m)
    return h, out


def _check_inputs(config: ModelConfig, tokens, attention_mask, edits, cache):
    if tokens.ndim != 2:
        raise ValueError(f"tokens have shape {tokens.shape}; expected [batch, seq]")
    if attention_mask is not None and attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask has shape {attention_mask.shape}; expected {tokens.shape}")
    width = tokens.shape[1] if cache is None else cache.size
    for e in edits:
        if e.layers.shape != (config.n_layers,):
            raise ValueError(f"edit layer mask has shape {e.layers.shape}; expected ({config.n_layers},)")
        if e.positions is not None and (e.positions.shape[0] != tokens.shape[0] or e.positions.shape[1] != width):
            raise ValueError(
                f"edit positions mask has shape {tuple(e.positions.shape)}; expected ({tokens.shape[0]}, {width})"
                " (batch, sequence length or cache size)")


def unembed(params: dict, config: ModelConfig, h):
    """Final norm + output projection (+ Gemma's final soft-cap); float32 logits."""
    x = rms_norm(h, params["final_norm"], config.norm_eps, config.norm_offset)
    if config.tie_embeddings:
        logits = amx.dense(x, params["embed"].astype(x.dtype), transpose_b=True).astype(jnp.float32)
    else:
        logits = amx.dense(x, params["unembed"].astype(x.dtype)).astype(jnp.float32)
    if config.final_logit_softcap is not None:
        logits = jnp.tanh(logits / config.final_logit_softcap) * config.final_logit_softcap
    return logits


def embed(params: dict, config: ModelConfig, tokens):
    h = jnp.take(params["embed"], tokens, axis=0)
    if config.embed_scale != 1.0:
        h = h * jnp.asarray(config.embed_scale, h.dtype)
    return h


def forward(params: dict, config: ModelConfig, tokens, *, attention_mask=None, edits: Sequence = (),
            capture: Capture = Capture(), cache: KVCache | None = None, return_logits: bool = True,
            logits_positions=None) -> ForwardOutput:
    """Run the model on tokens [B, T].

    Without a cache, keys are the tokens themselves; with one, the tokens are written at slots
    [cache.length, cache.length + T) and attend to every valid slot. Positions follow the
    attention mask (left padding gets no positions), as HF's `generate` computes them.
    `logits_positions`: None for all positions, or "last" for the last slot only (saves the
    vocab projection during prefill).
    """
    edits = tuple(edits)
    _check_inputs(config, tokens, attention_mask, edits, cache)
    b, t = tokens.shape
    mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    start_pos = jnp.zeros((b,), jnp.int32) if cache is None else cache.next_position
    positions = start_pos[:, None] + jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1
    positions = jnp.maximum(positions, 0)
    write_at = jnp.zeros((), jnp.int32) if cache is None else cache.length
    slot_index = write_at + jnp.arange(t, dtype=jnp.int32)

    if cache is None:
        kv_context = (positions, positions, mask, write_at)
        new_positions = new_valid = None
    else:
        new_positions = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions, write_at, axis=1)
        new_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, mask, write_at, axis=1)
        kv_context = (positions, new_positions, new_valid, write_at)

    rope = _rope_tables(config, positions)
    capture_sites = tuple(capture.sites)
    sliding = jnp.asarray(np.array(config.layer_is_sliding, bool))
    layer_ids = jnp.arange(config.n_layers, dtype=jnp.int32)
    body = functools.partial(_block, config, edits, capture_sites, slot_index, rope, kv_context)
    cache_k = None if cache is None else cache.k
    cache_v = None if cache is None else cache.v

    h = embed(params, config, tokens)
    xs = (params["layers"], layer_ids, sliding, cache_k, cache_v)
    idx = np.asarray(capture.layer_list(config)) if capture_sites else np.zeros((0,), int)
    kept = sorted(set(idx.tolist()))
    captured = {}
    if capture_sites and len(kept) < config.n_layers:
        # A few layers: captures go into carried buffers (one slot per captured layer, plus a scratch slot that the
        # other layers overwrite) instead of a stacked scan output for every layer that is then mostly dropped.
        shapes = jax.eval_shape(lambda h_, x_: body(h_, x_)[1], h, jax.tree.map(lambda a: a[0], xs))
        bufs = {s: jnp.zeros((len(kept) + 1,) + shapes[s].shape, shapes[s].dtype) for s in capture_sites}
        slot_of = np.full(config.n_layers, len(kept), np.int32)
        slot_of[kept] = np.arange(len(kept), dtype=np.int32)

        def body_into_buffers(carry, xs_):
            h_, bufs_ = carry
            h_, out = body(h_, xs_[:-1])
            bufs_ = {s: jax.lax.dynamic_update_index_in_dim(bufs_[s], out.pop(s), xs_[-1], 0) for s in capture_sites}
            return (h_, bufs_), out

        (h, bufs), ys = jax.lax.scan(body_into_buffers, (h, bufs), xs + (jnp.asarray(slot_of),))
        pos = np.searchsorted(kept, idx)
        for s in capture_sites:
            captured[s] = bufs[s][pos]
    else:
        h, ys = jax.lax.scan(body, h, xs)
        for s in capture_sites:
            captured[s] = ys[s] if (idx == np.arange(config.n_layers)).all() else ys[s][idx]
    new_cache = None
    if cache is not None:
        new_cache = KVCache(k=ys["cache_k"], v=ys["cache_v"], positions=new_positions, valid=new_valid,
                            length=cache.length + t, next_position=jnp.max(positions, axis=1) + 1)
    logits = None
    if return_logits:
        logits = unembed(params, config, h[:, -1:] if logits_positions == "last" else h)
    return ForwardOutput(logits=logits, captured=captured, cache=new_cache)


jit_forward = jax.jit(forward, static_argnames=("config", "capture", "return_logits", "logits_positions"))
