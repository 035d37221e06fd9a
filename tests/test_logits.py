import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psm_jax import logits as L


def test_logit_utilities_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, (2, 5))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.stack([[logp[b, t, tokens[b, t + 1]] for t in range(4)] for b in range(2)])
    np.testing.assert_allclose(L.token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)), want, atol=1e-5)
    target = np.zeros((2, 5), bool)
    target[:, 3:] = True
    np.testing.assert_allclose(L.continuation_logprob(logits, jnp.asarray(tokens), jnp.asarray(target)),
                               want[:, 2:].sum(-1), atol=1e-5)
    np.testing.assert_allclose(L.cross_entropy(logits, jnp.asarray(tokens)), -want.mean(), atol=1e-5)
    p_set = np.exp(logp[:, -1, [1, 3]]).sum(-1)
    np.testing.assert_allclose(L.token_set_log_odds(logits[:, -1], [1, 3]), np.log(p_set / (1 - p_set)), atol=1e-4)
    assert float(L.kl_divergence(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    q = logits[::-1]
    p_ = np.exp(logp)
    lq = q - np.log(np.exp(q).sum(-1, keepdims=True))
    np.testing.assert_allclose(L.kl_divergence(logits, q), (p_ * (logp - lq)).sum(-1).mean(), atol=1e-5)
