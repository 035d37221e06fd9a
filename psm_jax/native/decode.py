"""f32 grouped-query attention for a few query tokens over an f32 or bf16 KV cache
(psm_jax/native/_decode_attention.cc): the CPU decoding path.

While decoding, XLA's CPU code copies every layer's cached K and V into new layouts for its batched dots at each
step and runs those dots slowly, so a step's cost grows with the cache's size. The kernel reads the cache where it
lies, once per (batch, KV head, query token), and skips masked slots; it needs no special instructions (plain C++,
vectorised by the compiler), so AMD and Intel CPUs both take it. `attention` equals the XLA function it is given
(to float32 rounding: sums run in another order) and differentiates through it. A bf16 cache is widened to f32
element by element as it is read: the kernel reads half the bytes, and equals the XLA function on the widened
cache.

PSM_CPU_DECODE_KERNEL=0 turns the kernel off. `available()` says whether it is in use here.
"""
from __future__ import annotations

import ctypes
import functools
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from psm_jax.native import build as native_build
from psm_jax.native.wrappers import kernel_bias, with_reference_gradient

SOURCE = Path(__file__).with_name("_decode_attention.cc")
TARGET = "psm_decode_attention"
MAX_QUERY_TOKENS = 4   # decoding and short appends; longer blocks keep XLA's batched dots, which do well there


@functools.lru_cache(maxsize=1)
def _load() -> bool:
    if os.environ.get("PSM_CPU_DECODE_KERNEL", "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(native_build.build(SOURCE, "decode_attention")))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.PsmDecodeAttention), platform="cpu")
        return True
    except Exception as e:  # no compiler, build error: XLA's attention serves
        warnings.warn(f"decode-attention kernel unavailable, using XLA's attention ({type(e).__name__}: {e})")
        return False


def available() -> bool:
    """True when f32 decoding attention runs on the kernel in this process (CPU backend, one device)."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1 and _load()


CACHE_DTYPES = (jnp.float32, jnp.bfloat16)


def uses_kernel(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """q [B,T,H,d] float32 with 1 <= T <= MAX_QUERY_TOKENS, k/v [B,S,KV,d] or a stack of them [L,B,S,KV,d], both
    float32 or both bfloat16 (decided at trace time)."""
    if q.ndim != 4 or k.ndim not in (4, 5) or q.dtype != jnp.float32:
        return False
    if k.dtype != v.dtype or k.dtype not in CACHE_DTYPES:
        return False
    return 1 <= q.shape[1] <= MAX_QUERY_TOKENS and v.shape == k.shape and available()


def attention(q, k, v, bias, *, scale: float, softcap: float | None, reference, layer=None):
    """Grouped-query attention on the kernel: q [B,T,H,d] f32, k/v [B,S,KV,d] f32 or bf16 (or, with `layer`, the
    stacked [L,B,S,KV,d] of a KV cache, read at that layer without copying it out), additive bias broadcastable to
    [B,T,S]; f32 out. `reference(q, k, v, bias)` is the XLA function it equals on one layer's K/V widened to f32,
    used for gradients."""
    if layer is None:
        k, v, layer = k[None], v[None], 0
    layer = jnp.asarray(layer, jnp.int32)
    b, t = q.shape[:2]
    s = k.shape[2]
    bias3 = kernel_bias(bias, b, t, s)

    def sliced(q, k, v, bias3, layer):
        at = lambda x: jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False).astype(q.dtype)  # noqa: E731
        return reference(q, at(k), at(v), bias3[:, None, None])

    def kernel(q, k, v, bias3, layer):
        return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")(
            q, k, v, bias3, layer, scale=np.float32(scale), softcap=np.float32(softcap or 0.0))

    return with_reference_gradient(kernel, sliced)(q, k, v, bias3, layer)


__all__ = ["attention", "available", "uses_kernel", "CACHE_DTYPES", "MAX_QUERY_TOKENS"]
