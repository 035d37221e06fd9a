"""psm_jax.native.decode (the decoding-attention kernel over an f32 or bf16 cache) against XLA's grouped attention,
and the model's decoding through it against decoding through XLA."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psm_jax import attention as A
from psm_jax.generate import generate
from psm_jax.loading.hf import load_hf_dir
from psm_jax.native import build as native_build
from psm_jax.native import decode

needs_kernel = pytest.mark.skipif(not decode.available(), reason="decode kernel unavailable (no compiler?)")
# Where a C++ compiler exists the kernel must build: a skip there fails CI.
pytestmark = [pytest.mark.ci_required] if native_build.compiler() else []


def _case(seed, b=3, t=1, h=6, kv=2, d=32, s=24, window=None):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, s, kv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, s, kv, d)), jnp.float32)
    lengths = np.array([s, s - 7, 5])[:b]
    q_pos = jnp.asarray(lengths[:, None] - t + np.arange(t)[None, :])
    k_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    valid = np.arange(s)[None, :] < lengths[:, None]
    valid[1, :4] = False                                   # left padding
    bias = A.attention_bias(q_pos, k_pos, jnp.asarray(valid), window, jnp.asarray(window is not None), jnp.float32)
    return q, k, v, bias


def _both(q, k, v, bias, softcap):
    ref = A._xla_grouped_attention(q, k, v, bias, scale=0.2, softcap=softcap)
    got = jax.jit(functools.partial(A.grouped_attention, scale=0.2, softcap=softcap))(q, k, v, bias)
    return np.asarray(ref), np.asarray(got)


@needs_kernel
@pytest.mark.parametrize("t,window,softcap", [(1, None, None), (3, None, None), (1, 6, None), (2, None, 5.0)])
def test_kernel_matches_xla_attention(t, window, softcap):
    q, k, v, bias = _case(t, t=t, window=window)
    assert decode.uses_kernel(q, k, v)
    ref, got = _both(q, k, v, bias, softcap)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_row_with_no_visible_slot_gets_the_mean_of_v_as_in_xla():
    q, k, v, bias = _case(0)
    bias = bias.at[2].set(jnp.finfo(jnp.float32).min)
    ref, got = _both(q, k, v, bias, None)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[2, 0, 0], np.asarray(v[2, :, 0].mean(0)), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_gradients_go_through_xla():
    q, k, v, bias = _case(1)
    w = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)

    def loss(fn, q, k, v):
        return (fn(q, k, v, bias, scale=0.2, softcap=None) * w).sum()

    got = jax.grad(functools.partial(loss, A.grouped_attention), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(functools.partial(loss, A._xla_grouped_attention), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_a_layer_of_a_stacked_cache_is_read_where_it_lies():
    """cached_attention at a traced layer of [L,B,S,KV,d] equals XLA's attention on that layer's slice, and its
    gradient reaches that layer of the cache only."""
    q, k, v, bias = _case(3)
    rng = np.random.default_rng(4)
    stack_k = jnp.stack([jnp.asarray(rng.standard_normal(k.shape), jnp.float32), k, 2 * k])
    stack_v = jnp.stack([v, jnp.asarray(rng.standard_normal(v.shape), jnp.float32), -v])
    assert decode.uses_kernel(q, stack_k, stack_v)
    for layer in range(3):
        got = jax.jit(functools.partial(A.cached_attention, scale=0.2, softcap=None))(
            q, stack_k, stack_v, jnp.int32(layer), bias)
        ref = A._xla_grouped_attention(q, stack_k[layer], stack_v[layer], bias, scale=0.2, softcap=None)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda ck: A.cached_attention(q, ck, stack_v, jnp.int32(1), bias, scale=0.2,
                                                  softcap=None).sum())(stack_k)
    ref = jax.grad(lambda kk: A._xla_grouped_attention(q, kk, stack_v[1], bias, scale=0.2, softcap=None).sum())(k)
    np.testing.assert_allclose(grad[1], ref, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(grad[0])) and not np.any(np.asarray(grad[2]))


@needs_kernel
def test_a_bf16_cache_is_read_as_xla_reads_it_widened():
    """On a bf16 stack the kernel equals XLA's attention on that layer widened to f32 (the rounding is the
    cache's, none is added), and the gradient with respect to q is XLA's."""
    q, k, v, bias = _case(5)
    rng = np.random.default_rng(6)
    stack_k = jnp.stack([k, jnp.asarray(rng.standard_normal(k.shape), jnp.float32)]).astype(jnp.bfloat16)
    stack_v = jnp.stack([jnp.asarray(rng.standard_normal(v.shape), jnp.float32), v]).astype(jnp.bfloat16)
    assert decode.uses_kernel(q, stack_k, stack_v)
    for layer in range(2):
        widened_k, widened_v = stack_k[layer].astype(jnp.float32), stack_v[layer].astype(jnp.float32)
        got = jax.jit(functools.partial(A.cached_attention, scale=0.2, softcap=None))(
            q, stack_k, stack_v, jnp.int32(layer), bias)
        ref = A._xla_grouped_attention(q, widened_k, widened_v, bias, scale=0.2, softcap=None)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    grad = jax.grad(lambda q: A.cached_attention(q, stack_k, stack_v, jnp.int32(1), bias, scale=0.2,
                                                 softcap=None).sum())(q)
    ref = jax.grad(lambda q: A._xla_grouped_attention(q, stack_k[1].astype(jnp.float32), stack_v[1].astype(
        jnp.float32), bias, scale=0.2, softcap=None).sum())(q)
    np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-5)


def test_longer_blocks_and_other_dtypes_keep_xla():
    q, k, v, _ = _case(0, t=decode.MAX_QUERY_TOKENS + 1)
    assert not decode.uses_kernel(q, k, v)
    q1, k1, v1, _ = _case(0)
    assert not decode.uses_kernel(q1.astype(jnp.bfloat16), k1.astype(jnp.bfloat16), v1.astype(jnp.bfloat16))
    assert not decode.uses_kernel(q1, k1.astype(jnp.bfloat16), v1)                # K and V in different dtypes
    assert not decode.uses_kernel(q1, k1.astype(jnp.float16), v1.astype(jnp.float16))


@needs_kernel
@pytest.mark.parametrize("family,cache_dtype", [("llama", jnp.float32), ("gemma3", jnp.float32),
                                               ("llama", jnp.bfloat16)])
def test_generation_through_the_kernel_equals_generation_through_xla(family, cache_dtype, tiny_hf, monkeypatch):
    """Greedy tokens and their log-probabilities from the decoding loop (which takes the kernel: asserted on the
    compiled program) equal those of the same loop on XLA's attention, with an f32 or a bf16 cache; gemma3 adds
    sliding windows and soft-capping is off in both."""
    directory, _ = tiny_hf(family)
    params, config = load_hf_dir(directory)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (3, 9)), jnp.int32)
    mask = jnp.asarray(np.arange(9)[None, :] >= np.array([[0], [2], [5]]))

    def run():
        jax.clear_caches()
        out = generate(params, config, tokens, mask, max_new_tokens=12, eos_ids=(), pad_id=0, cache_dtype=cache_dtype)
        return np.asarray(out.tokens), np.asarray(out.logprobs)

    lowered = jax.jit(lambda p, t, m: generate(p, config, t, m, max_new_tokens=12, eos_ids=(), pad_id=0,
                                               cache_dtype=cache_dtype).tokens)
    assert decode.TARGET in lowered.lower(params, tokens, mask).as_text()
    with_kernel = run()
    monkeypatch.setattr(decode, "uses_kernel", lambda *a: False)
    with_xla = run()
    np.testing.assert_array_equal(with_kernel[0], with_xla[0])
    np.testing.assert_allclose(with_kernel[1], with_xla[1], atol=1e-5)
