"""bf16 dense layers, gated MLP and attention on Intel AMX tiles (psm_jax/native/_amx_kernels.cc): the CPU bf16
fast path.

`dense(x, w)` is what the model's projections call: `x @ w`, except that on a single-device CPU backend whose CPU has
AMX, with bf16 x and w and every dimension a multiple of 32 (the rows are padded up to one), it runs the compiled
kernel, about 2.5x XLA's f32 GEMM (`gemm_bf16_amx_vs_xla_fp32`). `gated_silu` fuses the gated MLP's two products
with silu(g) * u in f32; `attention(...)` runs grouped-query attention (scores, f32 softmax, value product) in one
pass per (batch, KV head).
Gradients go through XLA (custom VJPs). Anything else, and every f32 computation, is the plain XLA path, so the f32
reference never changes. The kernels' f32 accumulation makes them at least as close to an f32 computation as XLA's
bf16 path (tests/test_amx_kernels.py).

PSM_CPU_AMX=0 turns the kernels off. `available()` says whether they are in use here.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from psm_jax.lowrank import is_lowrank
from psm_jax.native import build as native_build
from psm_jax.native.wrappers import kernel_bias, with_reference_gradient

SOURCE = Path(__file__).with_name("_amx_kernels.cc")
TARGET = "psm_amx_matmul"
ATTENTION_TARGET = "psm_amx_attention"
GATED_TARGET = "psm_amx_gated"
MIN_ROWS = 64   # below this (decoding), the tile setup and weight repacking cost more than they save


@functools.lru_cache(maxsize=1)
def _load() -> bool:
    if os.environ.get("PSM_CPU_AMX", "1") == "0":
        return False
    if "amx_bf16" not in native_build.cpu_flags():
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(native_build.build(SOURCE, "amx_kernels")))
        if not lib.PsmAmxAvailable():
            return False
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.PsmAmxMatmul), platform="cpu")
        jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(lib.PsmAmxAttention), platform="cpu")
        jax.ffi.register_ffi_target(GATED_TARGET, jax.ffi.pycapsule(lib.PsmAmxGated), platform="cpu")
        return True
    except Exception as e:  # no compiler, build error: the XLA dot serves
        warnings.warn(f"AMX kernels unavailable, using XLA's ops ({type(e).__name__}: {e})")
        return False


def available() -> bool:
    """True when bf16 dense layers run on the AMX kernel in this process (CPU backend, one device, AMX CPU)."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1 and _load()


def _bits(a: jax.Array) -> jax.Array:
    return a if a.dtype == jnp.uint16 else jax.lax.bitcast_convert_type(a, jnp.uint16)


def _bf16(a: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(a, jnp.bfloat16) if a.dtype == jnp.uint16 else a


def matmul(a: jax.Array, b: jax.Array, transpose_b: bool = False) -> jax.Array:
    """a [M,K] @ b [K,N] (b [N,K] and a @ b.T with transpose_b) in bf16 on the AMX kernel; M, K, N multiples of 32
    (not checked here: see `dense`). Operands are bf16 or their raw bits (uint16, see `kernel_layout`); bf16 out."""
    n = b.shape[0] if transpose_b else b.shape[1]
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((a.shape[0], n), jnp.uint16),
                           vmap_method="sequential")(_bits(a), _bits(b), transpose_b=transpose_b)
    return jax.lax.bitcast_convert_type(out, jnp.bfloat16)


def _on_padded_rows(fn, x2: jax.Array) -> jax.Array:
    """fn applied to x2 [M, K] with M padded up to a multiple of 32 (the kernels' row block); the M rows back."""
    m = x2.shape[0]
    pad = (-m) % 32
    if not pad:
        return fn(x2)
    return fn(jnp.pad(x2, ((0, pad), (0, 0))))[:m]


def _weight_cotangent(w: jax.Array, grad: jax.Array):
    """The cotangent for a weight operand: `grad` in its dtype, or float0 for raw bits (integers take none)."""
    return np.zeros(w.shape, jax.dtypes.float0) if w.dtype == jnp.uint16 else grad.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_amx(x2, w, transpose_b):
    return _on_padded_rows(lambda x: matmul(x, w, transpose_b), x2)


def _dense_amx_fwd(x2, w, transpose_b):
    return _dense_amx(x2, w, transpose_b), (x2, w)


def _dense_amx_bwd(transpose_b, res, g):
    x2, w = res
    wf = _bf16(w)
    dw = _weight_cotangent(w, g.T @ x2 if transpose_b else x2.T @ g)
    return (g @ (wf if transpose_b else wf.T)).astype(x2.dtype), dw


_dense_amx.defvjp(_dense_amx_fwd, _dense_amx_bwd)


PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def kernel_layout(layers: dict) -> dict:
    """The stacked layer weights that `dense` will multiply on the kernel, as raw bf16 bits (uint16 of the same
    shape); other leaves unchanged; identity where the kernel is not in use. For inference (harvesting applies it
    once to its private copy of the weights): bf16 weights carried through XLA's CPU layer loop are upcast to f32 as
    a whole and converted back per layer on every call. Integer leaves take no gradient, so do not
    differentiate with respect to the result (jax.grad refuses integer inputs)."""
    if not available() or not any(getattr(v, "dtype", None) == jnp.bfloat16 for v in layers.values()):
        return layers
    def on_kernel(name, w):
        return (name in PROJECTIONS and not is_lowrank(w) and w.dtype == jnp.bfloat16 and w.ndim == 3
                and w.shape[1] % 32 == 0 and w.shape[2] % 32 == 0)

    return {k: jax.lax.bitcast_convert_type(v, jnp.uint16) if on_kernel(k, v) else v for k, v in layers.items()}


def uses_kernel(x: jax.Array, w: jax.Array, transpose_b: bool = False) -> bool:
    """Whether `dense(x, w)` takes the AMX kernel (decided at trace time from dtypes and static shapes)."""
    k_axis = 1 if transpose_b else 0
    if x.dtype != jnp.bfloat16 or w.dtype not in (jnp.bfloat16, jnp.uint16) or w.ndim != 2 \
            or x.shape[-1] != w.shape[k_axis]:
        return False
    return math.prod(x.shape[:-1]) >= MIN_ROWS and w.shape[0] % 32 == 0 and w.shape[1] % 32 == 0 and available()


def dense(x: jax.Array, w: jax.Array, transpose_b: bool = False) -> jax.Array:
    """x [..., K] @ w [K, N] (w [N, K] and x @ w.T with transpose_b: a tied unembedding, with no transposed copy):
    the AMX kernel where `uses_kernel`, else XLA's dot (identical semantics, bf16 out). A `psm_jax.lowrank.LowRank`
    weight adds its factored update to the full-rank product."""
    if is_lowrank(w):
        return w.apply(x, dense)
    if not uses_kernel(x, w, transpose_b):
        return x @ (_bf16(w).T if transpose_b else _bf16(w))
    lead = x.shape[:-1]
    n = w.shape[0] if transpose_b else w.shape[1]
    return _dense_amx(x.reshape(-1, x.shape[-1]), w, transpose_b).reshape(*lead, n)


def uses_attention_kernel(q: jax.Array, k: jax.Array, v: jax.Array, softcap) -> bool:
    """q [B,T,H,d], k/v [B,S,KV,d] in bf16, no soft-cap, T % 16 == 0, S % 32 == 0, d % 32 == 0, on an AMX CPU."""
    if softcap is not None or not (q.dtype == k.dtype == v.dtype == jnp.bfloat16) or q.ndim != 4 or k.ndim != 4:
        return False
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    return (t % 16 == 0 and t >= 16 and s % 32 == 0 and d % 32 == 0 and kv >= 1 and h % kv == 0
            and v.shape == k.shape and available())


def attention(q, k, v, bias, scale: float, reference):
    """Grouped-query attention on the AMX kernel: q [B,T,H,d], k/v [B,S,KV,d] bf16, bias broadcastable to
    [B,T,S] (additive); bf16 out. `reference(q, k, v, bias)` is the XLA function it equals, used for gradients."""
    b, t = q.shape[:2]
    s = k.shape[1]
    bias3 = kernel_bias(bias, b, t, s)

    def kernel(q, k, v, bias3):
        out = jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.uint16),
                               vmap_method="sequential")(_bits(q), _bits(k), _bits(v), bias3,
                                                         scale=np.float32(scale))
        return jax.lax.bitcast_convert_type(out, jnp.bfloat16)

    def on_xla(q, k, v, bias3):
        return reference(q, k, v, bias3[:, None, None])

    return with_reference_gradient(kernel, on_xla)(q, k, v, bias3)


def uses_gated_kernel(x: jax.Array, w_gate: jax.Array, w_up: jax.Array) -> bool:
    """Whether `gated_silu(x, w_gate, w_up)` runs as one kernel (both products would run on the AMX kernel)."""
    if is_lowrank(w_gate) or is_lowrank(w_up):
        return False
    return w_gate.shape == w_up.shape and uses_kernel(x, w_gate) and uses_kernel(x, w_up)


def _gated_reference(x, w_gate, w_up):
    return jax.nn.silu(x @ _bf16(w_gate)) * (x @ _bf16(w_up))


def _gated_kernel(x2, w_gate, w_up):
    def run(x):
        out = jax.ffi.ffi_call(GATED_TARGET, jax.ShapeDtypeStruct((x.shape[0], w_gate.shape[1]), jnp.uint16),
                               vmap_method="sequential")(_bits(x), _bits(w_gate), _bits(w_up))
        return jax.lax.bitcast_convert_type(out, jnp.bfloat16)

    return _on_padded_rows(run, x2)


_gated_amx = with_reference_gradient(_gated_kernel, _gated_reference)


def gated_silu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array) -> jax.Array:
    """silu(x @ w_gate) * (x @ w_up), the gated MLP's hidden activation: one AMX kernel with an f32 epilogue where
    `uses_gated_kernel`, else the XLA ops (gradients through XLA either way)."""
    if not uses_gated_kernel(x, w_gate, w_up):
        return _gated_reference(x, w_gate, w_up)
    lead = x.shape[:-1]
    return _gated_amx(x.reshape(-1, x.shape[-1]), w_gate, w_up).reshape(*lead, w_gate.shape[1])


__all__ = ["attention", "available", "dense", "gated_silu", "kernel_layout", "matmul", "uses_attention_kernel",
           "uses_gated_kernel", "uses_kernel", "MIN_ROWS", "PROJECTIONS"]
