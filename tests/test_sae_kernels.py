"""sae.cpu_kernels (compiled XLA FFI kernels) against the XLA reference ops; fallback when they cannot build."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psm_jax.native import build as native_build
from sae import cpu_kernels as K
from sae.archs import topk as T

ROOT = Path(__file__).resolve().parent.parent
needs_kernels = pytest.mark.skipif(not K.available(), reason="CPU kernels unavailable (no compiler?)")
# Where a C++ compiler exists the kernels must build: a skip there fails CI.
pytestmark = [pytest.mark.ci_required] if native_build.compiler() else []


@needs_kernels
@pytest.mark.parametrize("B,S,k", [(64, 300, 7), (33, 17, 17), (50, 1000, 1), (8, 64, 64)])
def test_topk_bias_matches_lax_top_k_with_ties_and_nan(B, S, k):
    rng = np.random.default_rng(B)
    pre = rng.standard_normal((B, S)).astype(np.float32)
    bias = rng.standard_normal(S).astype(np.float32)
    pre[3 % B] = 1.0                                   # ties: the lower index comes first
    pre[4 % B] = -bias                                 # a row of exact zeros
    pre[5 % B, S // 2] = np.nan                        # NaN ranks first, so it propagates
    v, i = K.topk_bias(jnp.asarray(pre), jnp.asarray(bias), k)
    v2, i2 = jax.lax.top_k(jnp.asarray(pre + bias), k)
    np.testing.assert_array_equal(np.asarray(v), np.asarray(v2))
    np.testing.assert_array_equal(np.asarray(i), np.asarray(i2))


@needs_kernels
def test_gather_and_scatter_kernels_match_xla():
    rng = np.random.default_rng(0)
    B, S, D, k = 40, 90, 24, 6
    idx = jnp.asarray(np.argsort(rng.random((B, S)), 1)[:, :k].astype(np.int32))
    vals = jnp.asarray(rng.standard_normal((B, k)).astype(np.float32))
    W = jnp.asarray(rng.standard_normal((S, D)).astype(np.float32))
    g = jnp.asarray(rng.standard_normal((B, D)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((B, D)).astype(np.float32))
    np.testing.assert_allclose(K.gather_sum(idx, vals, W), T._gather_sum(idx, vals, W), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(K.gather_dot(idx, g, W), T._gather_dot(idx, g, W), rtol=1e-5, atol=1e-5)
    a1, a2, s2 = K.scatter2(idx, vals, g, 2 * vals, x, S)
    np.testing.assert_allclose(a1, T._scatter_rows(idx, vals, g, S), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a2, T._scatter_rows(idx, 2 * vals, x, S), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s2, np.bincount(np.asarray(idx).ravel(), np.asarray(2 * vals).ravel(), S),
                               rtol=1e-5, atol=1e-5)
    # deterministic: the same bits on every call
    b1 = K.scatter2(idx, vals, g, 2 * vals, x, S)[0]
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(b1))
    with pytest.raises(Exception, match="out of range"):
        jax.block_until_ready(K.gather_sum(idx.at[0, 0].set(S + 3), vals, W))


def test_falls_back_when_the_kernels_cannot_build(tmp_path):
    code = ("import warnings, jax\nfrom sae import cpu_kernels\nfrom sae.archs import topk\n"
            "with warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n"
            "    ok = cpu_kernels.available()\n"
            "print(ok, topk.kernel_impl(), any('unavailable' in str(x.message) for x in w))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", CXX="/nonexistent/c++", PATH="/nonexistent",
               PSM_SAE_KERNEL_CACHE=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["False", "xla", "True"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", PSM_SAE_CPU_KERNELS="0")
    res = subprocess.run([sys.executable, "-c", "from sae.archs import topk; print(topk.kernel_impl())"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.stdout.strip() == "xla"
