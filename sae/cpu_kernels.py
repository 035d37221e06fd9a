"""Optional CPU kernels (XLA FFI) for the sparse parts of the TopK SAE step: top-k with bias, gather-sum,
gather-dot and a two-output scatter-add (sae/_cpu_kernels.cc).

The C++ source is compiled on first use with the system C++ compiler (`g++ -O3 -march=native`) against the
headers jaxlib ships (`jax.ffi.include_dir()`), into the on-disk cache of `psm_jax.native.build` (atomic, safe
under concurrent processes; $PSM_KERNEL_CACHE overrides its place).

`available()` is False (and the pure-XLA implementations in sae/archs/topk.py are used) when the backend is not CPU,
when no compiler is found, when the build fails (a warning says why), or when PSM_SAE_CPU_KERNELS=0.
Threads: the affinity mask's CPU count, or $PSM_KERNEL_THREADS (psm_jax/native/cpu_threads.h). Every kernel is
deterministic.
"""
from __future__ import annotations

import ctypes
import functools
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from psm_jax.native import build as native_build

SOURCE = Path(__file__).with_name("_cpu_kernels.cc")
TARGETS = {"psm_sae_topk_bias": "PsmSaeTopkBias", "psm_sae_gather_sum": "PsmSaeGatherSum",
           "psm_sae_gather_dot": "PsmSaeGatherDot", "psm_sae_scatter2": "PsmSaeScatter2"}

def build(force: bool = False) -> Path:
    """Compile the kernels (or find them in the cache); returns the shared library's path."""
    return native_build.build(SOURCE, "sae_cpu_kernels", force=force)


@functools.lru_cache(maxsize=1)
def _load() -> bool:
    if os.environ.get("PSM_SAE_CPU_KERNELS", "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
        for name, sym in TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, sym)), platform="cpu")
        return True
    except Exception as e:  # no compiler, build error, old jaxlib: fall back to XLA ops
        warnings.warn(f"SAE CPU kernels unavailable, using the XLA implementation ({type(e).__name__}: {e})")
        return False


def available() -> bool:
    """True when the kernels are built and registered and the default backend is CPU."""
    return jax.default_backend() == "cpu" and _load()


def _call(name, shapes, *args):
    return jax.ffi.ffi_call(name, shapes, vmap_method="sequential")(*args)


def topk_bias(pre: jax.Array, bias: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(vals, idx) = top_k(pre + bias, k) per row, sorted descending (pre [B, S], bias [S])."""
    B = pre.shape[0]
    return _call("psm_sae_topk_bias", (jax.ShapeDtypeStruct((B, k), jnp.float32),
                                       jax.ShapeDtypeStruct((B, k), jnp.int32)),
                 pre.astype(jnp.float32), bias.astype(jnp.float32))


def gather_sum(idx: jax.Array, vals: jax.Array, W: jax.Array) -> jax.Array:
    """out[b] = sum_j vals[b, j] * W[idx[b, j]]."""
    return _call("psm_sae_gather_sum", jax.ShapeDtypeStruct((idx.shape[0], W.shape[1]), jnp.float32),
                 vals, idx.astype(jnp.int32), W)


def gather_dot(idx: jax.Array, g: jax.Array, W: jax.Array) -> jax.Array:
    """out[b, j] = <g[b], W[idx[b, j]]>."""
    return _call("psm_sae_gather_dot", jax.ShapeDtypeStruct(idx.shape, jnp.float32), g, idx.astype(jnp.int32), W)


def scatter2(idx, c1, r1, c2, r2, n_rows: int):
    """(a1, a2, s2): a1[s] = sum_{idx[b,j]=s} c1[b,j] r1[b] and a2 likewise ([n_rows, D]), s2[s] = sum c2[b,j]."""
    D = r1.shape[1]
    return _call("psm_sae_scatter2", (jax.ShapeDtypeStruct((n_rows, D), jnp.float32),
                                      jax.ShapeDtypeStruct((n_rows, D), jnp.float32),
                                      jax.ShapeDtypeStruct((n_rows,), jnp.float32)),
                 idx.astype(jnp.int32), c1, r1, c2, r2)


__all__ = ["available", "build", "topk_bias", "gather_sum", "gather_dot", "scatter2"]
