"""A factored low-rank weight (psm_jax.lowrank.LowRank) in the port's projections gives the logits and the
A/B gradients of the same weights merged into W (the merged forward is the reference), and its backward
never forms a gradient of W's size."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psm_jax.lowrank import LowRank
from psm_jax.model import forward
from tests.fixtures_assets import random_smollm2_chat_model

LEAVES = ("wq", "wv", "wo", "w_gate", "w_down")


@pytest.fixture(scope="module")
def tiny():
    return random_smollm2_chat_model(2)


def _factors(params, rank=3, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 2 * len(LEAVES))
    out = {}
    for i, leaf in enumerate(LEAVES):
        n, d_in, d_out = params["layers"][leaf].shape
        out[leaf] = {"a": 0.3 * jax.random.normal(keys[2 * i], (n, d_in, rank)),
                     "b": 0.3 * jax.random.normal(keys[2 * i + 1], (n, rank, d_out))}
    return out


def _scales(n_layers):
    return jnp.asarray([0.5, 0.0, 2.0][:n_layers] + [1.0] * max(0, n_layers - 3), jnp.float32)


def _merged(params, factors, scales):
    layers = dict(params["layers"])
    for leaf, ab in factors.items():
        layers[leaf] = layers[leaf] + scales[:, None, None] * (ab["a"] @ ab["b"])
    return {**params, "layers": layers}


def _factored(params, factors, scales):
    layers = dict(params["layers"])
    for leaf, ab in factors.items():
        layers[leaf] = LowRank(layers[leaf], ab["a"], ab["b"], scales)
    return {**params, "layers": layers}


def _loss(build, params, config, tokens):
    def loss(factors):
        logits = forward(build(params, factors, _scales(config.n_layers)), config, tokens).logits
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] ** 2)
    return loss


def test_factored_forward_equals_merged_weights(tiny):
    params, config = tiny.params, tiny.config
    factors = _factors(params)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 9)))
    scales = _scales(config.n_layers)
    ref = forward(_merged(params, factors, scales), config, tokens).logits
    got = jax.jit(forward, static_argnames="config")(_factored(params, factors, scales), config, tokens).logits
    assert float(jnp.max(jnp.abs(ref - forward(params, config, tokens).logits))) > 1e-2  # the update matters
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=2e-5)


def test_factored_gradients_equal_merged_and_skip_the_weight_gradient(tiny):
    params, config = tiny.params, tiny.config
    factors = _factors(params, seed=1)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (2, 7)))
    g_ref = jax.grad(_loss(_merged, params, config, tokens))(factors)
    factored_grad = jax.jit(jax.grad(_loss(_factored, params, config, tokens)))
    g = factored_grad(factors)
    for leaf in LEAVES:
        for k in ("a", "b"):
            np.testing.assert_allclose(np.asarray(g[leaf][k]), np.asarray(g_ref[leaf][k]), atol=1e-5, rtol=1e-4)
    # the merged program forms a product of W's shape (the merge, and its gradient); the factored one none
    d_in, d_out = params["layers"]["w_down"].shape[1:]
    full = re.compile(rf"= f32\[{d_in},{d_out}\]\{{[^}}]*\}} dot\(")
    merged_hlo = jax.jit(jax.grad(_loss(_merged, params, config, tokens))).lower(factors).compile().as_text()
    assert full.search(merged_hlo)
    assert not full.search(factored_grad.lower(factors).compile().as_text())


def test_low_rank_backward_equals_autodiff():
    """The low-rank term's own backward gives autodiff's cotangents for x, A, B and the scale (numbers), and
    `LowRank.apply` equals `apply_autodiff` in value and in every gradient, on a batched [B, T, d_in] input."""
    keys = jax.random.split(jax.random.PRNGKey(4), 5)
    x = jax.random.normal(keys[0], (2, 5, 6))
    w = jax.random.normal(keys[1], (6, 7))
    a, b = jax.random.normal(keys[2], (6, 3)), jax.random.normal(keys[3], (3, 7))
    g = jax.random.normal(keys[4], (2, 5, 7))
    scale = jnp.float32(1.5)

    def project(method):
        return lambda x, w, a, b, s: method(LowRank(w, a, b, s), x, jnp.matmul)

    ref, ref_vjp = jax.vjp(project(LowRank.apply_autodiff), x, w, a, b, scale)
    got, got_vjp = jax.vjp(jax.jit(project(LowRank.apply)), x, w, a, b, scale)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    for name, r, c in zip(("x", "w", "a", "b", "scale"), ref_vjp(g), got_vjp(g)):
        assert float(jnp.max(jnp.abs(r))) > 1e-2, name  # every cotangent is non-trivial
        np.testing.assert_allclose(np.asarray(c), np.asarray(r), rtol=1e-5, atol=1e-4, err_msg=name)
