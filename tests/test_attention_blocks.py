"""Causal query blocking: the blocked attention equals the full one on every row that is a model output."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psm_jax import attention as A


@pytest.mark.parametrize("t", [40, 128, 200, 256, 300])
def test_causal_query_blocks_cover_the_rows(t):
    blocks = A.causal_query_blocks(t)
    rows = [i for lo, hi in blocks for i in range(lo, hi)]
    assert rows == list(range(t))
    assert len(blocks) <= A.MAX_QUERY_BLOCKS
    assert len(blocks) == 1 or min(hi - lo for lo, hi in blocks) >= A.MIN_QUERY_BLOCK // 2


def _inputs(t, window=None, dtype=jnp.float32):
    b, h, kv, hd = 3, 6, 2, 16
    keys = jax.random.split(jax.random.PRNGKey(t), 4)
    q = jax.random.normal(keys[0], (b, t, h, hd), dtype)
    k = jax.random.normal(keys[1], (b, t, kv, hd), dtype)
    v = jax.random.normal(keys[2], (b, t, kv, hd), dtype)
    mask = np.ones((b, t), bool)
    mask[1, t - 37:] = False        # right padding
    mask[2, :90] = False            # left padding longer than a block: its first rows see no key in their block
    mask = jnp.asarray(mask)
    pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    bias = A.attention_bias(pos, pos, mask, window, jnp.asarray(window is not None), dtype)  # as the forward builds it
    return q, k, v, bias, mask, keys[3]


@pytest.mark.parametrize("t,window", [(200, None), pytest.param(256, 50, marks=pytest.mark.slow)])  # blocks of 50 rows; of 64 with a sliding window
def test_blocked_equals_full_on_valid_rows(t, window):
    q, k, v, bias, mask, gkey = _inputs(t, window)
    full = A._xla_grouped_attention(q, k, v, bias, scale=0.25, softcap=None)
    blocked = A.grouped_attention(q, k, v, bias, scale=0.25, softcap=None, causal=True)
    valid = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(blocked)[valid], np.asarray(full)[valid], rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(blocked)).all()  # padding rows are unspecified but never NaN or inf

    g = jax.random.normal(gkey, q.shape) * mask[:, :, None, None]  # cotangents on output rows only

    def grads(fn):
        return jax.vjp(fn, q, k, v)[1](g)

    ref = grads(lambda *a: A._xla_grouped_attention(*a, bias, scale=0.25, softcap=None))
    got = grads(lambda *a: A.grouped_attention(*a, bias, scale=0.25, softcap=None, causal=True))
    for r, x in zip(ref, got):
        np.testing.assert_allclose(np.asarray(x)[valid], np.asarray(r)[valid], rtol=1e-4, atol=1e-5)


def test_causal_needs_the_queries_own_keys():
    q = jnp.zeros((1, 100, 2, 8))
    kv = jnp.zeros((1, 120, 1, 8))
    with pytest.raises(ValueError, match="120 keys for 100 queries"):
        A.grouped_attention(q, kv, kv, jnp.zeros((1, 1, 1, 100, 120)), scale=1.0, softcap=None, causal=True)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_blocked_half_precision_padding_rows_stay_finite(dtype):
    """In float16 a score below about -16 plus the dtype's minimum overflows to -inf unless the mask is added in
    f32; keys opposed to the queries make every score -36."""
    q, k, v, bias, mask, _ = _inputs(256, dtype=dtype)
    q, k = jnp.full_like(q, 3.0), jnp.full_like(k, -3.0)
    out = np.asarray(A.grouped_attention(q, k, v, bias, scale=0.25, softcap=None, causal=True).astype(jnp.float32))
    assert np.isfinite(out).all()  # a NaN on a padding row would reach every row through the next layer's keys
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = A._xla_grouped_attention(*f32, A.attention_bias(*_positions(mask), mask, None, jnp.asarray(False),
                                                          jnp.float32), scale=0.25, softcap=None)
    valid = np.asarray(mask)
    np.testing.assert_allclose(out[valid], np.asarray(ref)[valid], atol=0.05)


def _positions(mask):
    pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    return pos, pos
