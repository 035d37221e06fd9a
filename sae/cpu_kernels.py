"""Optional CPU kernels (XLA FFI) for the sparse parts of the TopK SAE step: top-k with bias, gather-sum,
gather-dot and a two-output scatter-add (sae/_cpu_kernels.cc).

The C++ source is compiled on first use with the system C++ compiler (`g++ -O3 -march=native`) against the
headers jaxlib ships (`jax.ffi.include_dir()`), into an on-disk cache:
    $PSM_SAE_KERNEL_CACHE, else $XDG_CACHE_HOME/psm-jax/sae-kernels, else ~/.cache/psm-jax/sae-kernels
named by a hash of the source, the compiler command, the jaxlib version and the CPU's flags, written to a temporary
name and renamed (atomic; concurrent processes are safe). Nothing else is cached.

`available()` is False (and the pure-XLA implementations in sae/model.py are used) when the backend is not CPU,
when no compiler is found, when the build fails (a warning says why), or when PSM_SAE_CPU_KERNELS=0.
Threads: the affinity mask's CPU count, or PSM_SAE_KERNEL_THREADS. Every kernel is deterministic.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).with_name("_cpu_kernels.cc")
TARGETS = {"psm_sae_topk_bias": "PsmSaeTopkBias", "psm_sae_gather_sum": "PsmSaeGatherSum",
           "psm_sae_gather_dot": "PsmSaeGatherDot", "psm_sae_scatter2": "PsmSaeScatter2"}

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    if os.environ.get("PSM_SAE_KERNEL_CACHE"):
        return Path(os.environ["PSM_SAE_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "psm-jax" / "sae-kernels"


def _cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    for c in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def build(force: bool = False) -> Path:
    """Compile the kernels (or find them in the cache); returns the shared library's path."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ / c++ / clang++) on PATH")
    include = jax.ffi.include_dir()
    flags = ["-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-pthread"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-mprefer-vector-width=512")  # the gathers run ~15% faster with full-width AVX-512 loads
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cxx, *flags, jax.__version__, _cpu_flags()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"sae_cpu_kernels_{key}.so"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *flags, f"-I{include}", str(SOURCE), "-o", tmp]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{' '.join(cmd)}\n{res.stderr[-3000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


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


__all__ = ["available", "build", "cache_dir", "topk_bias", "gather_sum", "gather_dot", "scatter2"]
