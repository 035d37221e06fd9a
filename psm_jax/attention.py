"""Rotary embeddings, attention masks and grouped-query attention over a slot axis.

Keys live on a *slot* axis (cache slots, or the current tokens when no cache is used). Every key
carries its absolute position and a validity bit, so left padding, decoding and sliding windows are
all one rule: query at position p sees valid keys at positions k with k <= p (and p - k < window on
sliding layers).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from psm_jax.config import RopeConfig
from psm_jax.native import amx, decode


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] in float32, matching HF's default/linear/llama3 RoPE."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (1.0 / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    if rope.kind == "linear":
        inv = inv / np.float32(rope.factor)
    elif rope.kind == "llama3":
        old = rope.original_max_position
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_angles(inv_freq: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, T, head_dim] for integer positions [B, T] (HF's concatenated halves)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, heads, head_dim] by the angles (rotate-half convention, as in HF)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def attention_bias(q_pos, k_pos, k_valid, window, is_sliding, dtype):
    """Additive mask [B, 1, 1, T, S]: 0 where allowed, the dtype's minimum elsewhere.

    `window` is a static int or None; `is_sliding` a traced bool (per layer under scan).
    """
    delta = q_pos[:, :, None] - k_pos[:, None, :]  # [B, T, S]
    allowed = (delta >= 0) & k_valid[:, None, :]
    if window is not None:
        allowed = allowed & ((delta < window) | ~is_sliding)
    neg = jnp.finfo(dtype).min
    return jnp.where(allowed, 0.0, neg).astype(dtype)[:, None, None, :, :]


def grouped_attention(q, k, v, bias, *, scale: float, softcap: float | None, causal: bool = False):
    """q [B,T,H,hd]; k, v [B,S,KV,hd]; bias [B,1,1,T,S] -> [B,T,H,hd].

    Heads are grouped as [KV, H // KV] so K/V are never repeated in memory. bf16 on an AMX CPU runs the fused
    kernel of psm_jax.native.amx; f32 decoding (a few query tokens) on a CPU runs psm_jax.native.decode's kernel,
    which reads the cache in place. Both compute this function and take their gradients through its XLA version.

    `causal=True` is the caller's promise that keys and queries are the same tokens (S == T) and that the mask
    never lets the query at index i see a key at index j > i (true without a cache: positions increase along the
    valid tokens). The XLA path then skips the keys after each block of queries (`causal_query_blocks`): 3/8 of
    the score and probability work in 4 blocks. A query row whose mask allows no key at or before it (a
    left-padding row) is left unspecified: such rows are not outputs of the model.
    """
    reference = functools.partial(_xla_grouped_attention, scale=scale, softcap=softcap)
    if amx.uses_attention_kernel(q, k, v, softcap):
        return amx.attention(q, k, v, bias, scale, reference)
    if decode.uses_kernel(q, k, v):
        return decode.attention(q, k, v, bias, scale=scale, softcap=softcap, reference=reference)
    if not causal:
        return reference(q, k, v, bias)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"causal attention over {k.shape[1]} keys for {q.shape[1]} queries; expected the queries' "
                         "own tokens as keys")
    blocks = [reference(q[:, lo:hi], k[:, :hi], v[:, :hi], bias[..., lo:hi, :hi])
              for lo, hi in causal_query_blocks(q.shape[1])]
    return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1)


MIN_QUERY_BLOCK = 32
MAX_QUERY_BLOCKS = 4


def causal_query_blocks(t: int) -> tuple[tuple[int, int], ...]:
    """Static [lo, hi) query blocks for causal attention over T tokens: block [lo, hi) attends keys [0, hi).

    At most MAX_QUERY_BLOCKS blocks of at least MIN_QUERY_BLOCK rows: each block adds dots to the compiled layer
    (compile time), and below 32 rows the saving no longer pays for them. `benchmarks/attention_blocks.py` measures
    the blocks against unblocked attention (`attention_causal_blocks_time_ratio`) and on the LoRA step."""
    n = max(1, min(MAX_QUERY_BLOCKS, t // MIN_QUERY_BLOCK))
    size = -(-t // n)
    return tuple((lo, min(lo + size, t)) for lo in range(0, t, size))


def cached_attention(q, cache_k, cache_v, layer, bias, *, scale: float, softcap: float | None):
    """grouped_attention over layer `layer` (traced) of a stacked KV cache [L,B,S,KV,hd], read in q's dtype. f32
    decoding on a CPU reads an f32 or bf16 stack in place on psm_jax.native.decode's kernel; otherwise the layer's
    K/V are sliced out."""
    if decode.uses_kernel(q, cache_k, cache_v):
        reference = functools.partial(_xla_grouped_attention, scale=scale, softcap=softcap)
        return decode.attention(q, cache_k, cache_v, bias, scale=scale, softcap=softcap, reference=reference,
                                layer=layer)
    keys = jax.lax.dynamic_index_in_dim(cache_k, layer, 0, keepdims=False).astype(q.dtype)
    values = jax.lax.dynamic_index_in_dim(cache_v, layer, 0, keepdims=False).astype(q.dtype)
    return grouped_attention(q, keys, values, bias, scale=scale, softcap=softcap)


def _xla_grouped_attention(q, k, v, bias, *, scale: float, softcap: float | None):
    b, t, h, hd = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k) * jnp.asarray(scale, q.dtype)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    # the mask is added in f32: in float16, a negative score plus the dtype's minimum overflows to -inf, and a
    # row with every key masked would give NaN
    scores = scores.astype(jnp.float32) + bias.astype(jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, hd)
