"""psm_jax.native.wrappers: a kernel's values with the reference function's gradients."""
import jax
import jax.numpy as jnp
import numpy as np

from psm_jax.native.wrappers import kernel_bias, with_reference_gradient


def _reference(x, w, row):
    return jnp.tanh(x @ w) * (1.0 + jax.lax.dynamic_index_in_dim(x, row, 0, keepdims=False).sum())


def _kernel(x, w, row):
    # Same values, but a function whose own derivative would differ from the reference's (stop_gradient).
    return jax.lax.stop_gradient(_reference(x, w, row))


def test_values_come_from_the_kernel_and_gradients_from_the_reference():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    row = jnp.asarray(2, jnp.int32)
    fn = with_reference_gradient(_kernel, _reference)
    np.testing.assert_allclose(fn(x, w, row), _reference(x, w, row), rtol=1e-6)
    loss = lambda f: lambda x, w: jnp.sum(f(x, w, row) ** 2)  # noqa: E731
    got = jax.jit(jax.grad(loss(fn), argnums=(0, 1)))(x, w)
    want = jax.grad(loss(_reference), argnums=(0, 1))(x, w)
    assert np.abs(np.asarray(want[0])).max() > 0.1
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    # The integer argument is a constant: its cotangent is float0.
    _, vjp = jax.vjp(fn, x, w, row)
    assert vjp(jnp.ones((4, 5)))[2].dtype == jax.dtypes.float0


def test_kernel_bias_reads_a_head_broadcast_bias_as_batch_queries_slots():
    bias = jnp.arange(2 * 3 * 5, dtype=jnp.float32).reshape(2, 1, 3, 5)
    np.testing.assert_array_equal(kernel_bias(bias, 2, 3, 5), np.asarray(bias)[:, 0])
    one_row = jnp.arange(2 * 5, dtype=jnp.bfloat16).reshape(2, 1, 1, 5)
    got = kernel_bias(one_row, 2, 3, 5)
    assert got.dtype == jnp.float32 and got.shape == (2, 3, 5)
    np.testing.assert_array_equal(got, np.broadcast_to(np.asarray(one_row, np.float32)[:, 0], (2, 3, 5)))
