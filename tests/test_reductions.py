import jax.numpy as jnp
import numpy as np
import pytest

from psm_jax import reductions as R


def test_masked_and_per_turn_means():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 3)).astype(np.float32)
    mask = np.array([[0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 0, 0]], bool)
    got = np.asarray(R.masked_mean(jnp.asarray(x), jnp.asarray(mask)))
    np.testing.assert_allclose(got[0], x[0][mask[0]].mean(0), rtol=1e-6)
    np.testing.assert_allclose(got[1], x[1][mask[1]].mean(0), rtol=1e-6)
    turns = np.array([[0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1]])
    means, counts = R.per_turn_mean(jnp.asarray(x), jnp.asarray(turns), jnp.asarray(mask), 3)
    np.testing.assert_allclose(means[0, 2], x[0, 4:6].mean(0), rtol=1e-6)
    np.testing.assert_allclose(means[0, 1], x[0, 2], rtol=1e-6)
    assert counts.tolist() == [[1, 1, 2], [1, 1, 0]]


def test_projection_cosine_pca_percentile():
    v = np.array([3.0, 4.0])
    assert float(R.projection(jnp.array([1.0, 0.0]), v)) == pytest.approx(0.6, abs=1e-6)
    assert float(R.cosine(jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0]))) == pytest.approx(0.0, abs=1e-7)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 3)) * np.array([5.0, 1.0, 0.1])
    p = R.pca(x)
    assert abs(p["components"][0][0]) > 0.99
    assert p["explained_ratio"][0] > 0.9
    assert R.components_for_variance(p["explained_ratio"], 0.7) == 1
    assert R.components_for_variance(p["explained_ratio"], 0.9999) == 3
    np.testing.assert_allclose(R.percentile(np.arange(101.0), 25), 25.0)
    with pytest.raises(ValueError, match="outside"):
        R.percentile(np.arange(3.0), 100)
    np.testing.assert_allclose(R.cosine_matrix(jnp.eye(2) * 3), np.eye(2), atol=1e-6)
