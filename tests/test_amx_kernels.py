"""psm_jax.native.amx (bf16 matmul and attention on AMX tiles) against f32 references and XLA's bf16 path; the
dispatch rules and fallbacks everywhere (the kernel tests skip on CPUs without AMX)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psm_jax import attention as A
from psm_jax.native import amx
from psm_jax.native import build as native_build

needs_amx = pytest.mark.skipif(not amx.available(), reason="no AMX on this CPU (or the kernel cannot build)")
# On an AMX CPU with a C++ compiler the kernels must build: a skip there fails CI.
pytestmark = [pytest.mark.ci_required] if native_build.compiler() and "amx_bf16" in native_build.cpu_flags() else []


def _bf16(rng, shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape).astype(np.float32)).astype(jnp.bfloat16)


def _f32(x):
    return np.asarray(x, np.float32)


@needs_amx
@pytest.mark.parametrize("M,K,N", [(64, 64, 32), (96, 576, 192), (32, 1536, 64)])
def test_matmul_is_the_f32_product_rounded_to_bf16(M, K, N):
    rng = np.random.default_rng(M + K + N)
    a, b = _bf16(rng, (M, K)), _bf16(rng, (K, N))
    got = _f32(jax.jit(amx.matmul)(a, b))
    exact = _f32(a).astype(np.float64) @ _f32(b).astype(np.float64)
    rounded = _f32(jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16))
    # f32 accumulation in another order than float64 may flip the last bf16 bit of a few elements, never more
    assert np.mean(got == rounded) > 0.99
    np.testing.assert_allclose(got, exact, rtol=2 ** -7, atol=1e-3 * np.abs(exact).max())


@needs_amx
def test_dense_pads_rows_reshapes_and_differentiates():
    rng = np.random.default_rng(1)
    x, w = _bf16(rng, (3, 37, 64)), _bf16(rng, (64, 96))      # 111 rows: padded to 128 inside
    assert amx.uses_kernel(x, w)
    got = _f32(jax.jit(amx.dense)(x, w))
    np.testing.assert_allclose(got, _f32(x) @ _f32(w), rtol=2 ** -7, atol=0.05)
    bits = jax.lax.bitcast_convert_type(w, jnp.uint16)       # kernel_layout's form gives the same numbers
    np.testing.assert_array_equal(_f32(jax.jit(amx.dense)(x, bits)), got)

    # x @ w.T from w [N, K] (a tied unembedding) without a transposed copy; its gradient reaches w [N, K]
    wt = jnp.asarray(w.T)
    np.testing.assert_array_equal(_f32(jax.jit(lambda x, w: amx.dense(x, w, transpose_b=True))(x, wt)), got)
    gt = jax.grad(lambda w: (amx.dense(x, w, transpose_b=True).astype(jnp.float32) ** 2).sum())(wt)
    assert gt.shape == wt.shape

    def loss(x, w):
        return (amx.dense(x, w).astype(jnp.float32) ** 2).sum()

    gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)
    rx, rw = jax.grad(lambda x, w: ((x @ w).astype(jnp.float32) ** 2).sum(), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(_f32(gx), _f32(rx), rtol=0.05, atol=0.05 * np.abs(_f32(rx)).max())
    np.testing.assert_allclose(_f32(gw), _f32(rw), rtol=0.05, atol=0.05 * np.abs(_f32(rw)).max())
    np.testing.assert_allclose(_f32(gt), _f32(rw).T, rtol=0.05, atol=0.05 * np.abs(_f32(rw)).max())


def test_dense_is_xla_dot_outside_the_kernel_rules():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((128, 64), np.float32))
    w = jnp.asarray(rng.standard_normal((64, 32), np.float32))
    assert not amx.uses_kernel(x, w)                          # f32: the reference path never changes
    np.testing.assert_array_equal(np.asarray(amx.dense(x, w)), np.asarray(x @ w))
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    assert not amx.uses_kernel(xb[:8], wb)                    # too few rows (decoding)
    assert not amx.uses_kernel(xb, wb[:, :24])                # N not a multiple of 32
    assert not amx.uses_attention_kernel(xb.reshape(2, 64, 1, 64), xb.reshape(2, 64, 1, 64),
                                         xb.reshape(2, 64, 1, 64), softcap=5.0)  # soft-capped scores
    bits = jax.lax.bitcast_convert_type(wb[:, :24], jnp.uint16)
    np.testing.assert_array_equal(_f32(amx.dense(xb, bits)), _f32(xb @ wb[:, :24]))


@needs_amx
def test_gated_silu_kernel_matches_f32_and_differentiates():
    rng = np.random.default_rng(5)
    x, wg, wu = _bf16(rng, (2, 40, 64)), _bf16(rng, (64, 96), 0.2), _bf16(rng, (64, 96), 0.2)
    assert amx.uses_gated_kernel(x, wg, wu)
    got = _f32(jax.jit(amx.gated_silu)(x, wg, wu))
    ref32 = _f32(jax.nn.silu(_f32(x) @ _f32(wg)) * (_f32(x) @ _f32(wu)))
    xla16 = _f32(amx._gated_reference(x, wg, wu))
    assert np.abs(got - ref32).mean() <= np.abs(xla16 - ref32).mean()   # f32 epilogue: closer than XLA's bf16
    np.testing.assert_allclose(got, ref32, rtol=2 ** -6, atol=0.02 * np.abs(ref32).max())
    g = jax.grad(lambda w: (amx.gated_silu(x, w, wu).astype(jnp.float32) ** 2).sum())(wg)
    g_ref = jax.grad(lambda w: (amx._gated_reference(x, w, wu).astype(jnp.float32) ** 2).sum())(wg)
    np.testing.assert_allclose(_f32(g), _f32(g_ref), rtol=0.1, atol=0.05 * np.abs(_f32(g_ref)).max())


@needs_amx
def test_attention_matches_the_f32_reference_and_its_gradient_is_xlas():
    rng = np.random.default_rng(3)
    B, T, H, KV, d = 2, 48, 4, 2, 32
    q, k, v = _bf16(rng, (B, T, H, d)), _bf16(rng, (B, T + 16, KV, d)), _bf16(rng, (B, T + 16, KV, d))
    q_pos = jnp.broadcast_to(jnp.arange(16, T + 16), (B, T))
    k_pos = jnp.broadcast_to(jnp.arange(T + 16), (B, T + 16))
    valid = jnp.ones((B, T + 16), bool).at[1, :7].set(False)  # left padding in the second row
    bias = A.attention_bias(q_pos, k_pos, valid, None, False, jnp.bfloat16)
    scale = d ** -0.5
    assert amx.uses_attention_kernel(q, k, v, None)
    got = _f32(jax.jit(lambda *a: A.grouped_attention(*a, scale=scale, softcap=None))(q, k, v, bias))
    ref32 = _f32(A._xla_grouped_attention(*(x.astype(jnp.float32) for x in (q, k, v, bias)), scale=scale,
                                          softcap=None))
    xla16 = _f32(A._xla_grouped_attention(q, k, v, bias, scale=scale, softcap=None))
    err, xla_err = np.abs(got - ref32), np.abs(xla16 - ref32)
    assert err.max() < 0.02 and err.mean() <= 1.2 * xla_err.mean()   # no worse than XLA's own bf16 path

    def loss(fn, q):
        return (fn(q, k, v, bias, scale=scale, softcap=None).astype(jnp.float32) ** 2).sum()

    g = jax.grad(lambda q: loss(A.grouped_attention, q))(q)
    g_ref = jax.grad(lambda q: loss(A._xla_grouped_attention, q))(q)
    np.testing.assert_allclose(_f32(g), _f32(g_ref), rtol=0.1, atol=0.05 * np.abs(_f32(g_ref)).max())


@needs_amx
def test_bf16_model_forward_on_the_kernels_is_as_close_to_f32_as_xlas_bf16(tiny_hf, monkeypatch):
    """A tiny Qwen3 (head_dim 32: both kernels apply) in bf16: logits against the f32 model, kernels vs XLA."""
    import psm_jax
    from psm_jax.model import forward

    path, _ = tiny_hf("qwen3")
    m32 = psm_jax.load(path)
    m16 = psm_jax.load(path, dtype=jnp.bfloat16)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 64)), jnp.int32)

    def logits(m):
        fn = jax.jit(lambda p, t: forward(p, m.config, t).logits)   # a fresh trace: dispatch decided now
        return np.asarray(fn(m.params, tokens), np.float32)

    ref = logits(m32)
    on_kernels = logits(m16)
    monkeypatch.setattr(amx, "available", lambda: False)
    on_xla = logits(m16)
    assert not np.array_equal(on_kernels, on_xla)              # the kernels did run
    err, xla_err = np.abs(on_kernels - ref), np.abs(on_xla - ref)
    assert err.mean() <= 1.25 * xla_err.mean() + 1e-3, (err.mean(), xla_err.mean())
    assert err.max() <= 2.0 * xla_err.max() + 1e-2
