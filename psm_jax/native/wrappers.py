"""What the JAX wrappers of the native kernels share: the additive attention bias in the kernels' [B, T, S] layout,
and gradients taken from the XLA function a kernel equals (the kernel computes the forward values, the reference
supplies the backward pass), so every kernel is differentiable without a hand-written gradient kernel."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def kernel_bias(bias: jax.Array, batch: int, queries: int, slots: int) -> jax.Array:
    """An additive attention bias broadcastable to [B, 1 or H, T, S] as the kernels read it: f32 [B, T, S]."""
    squeezed = bias.reshape(bias.shape[0], *bias.shape[-2:])
    return jnp.broadcast_to(squeezed, (batch, queries, slots)).astype(jnp.float32)


def _differentiable(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def with_reference_gradient(kernel: Callable, reference: Callable) -> Callable:
    """A function of positional array arguments that returns `kernel(*args)` and whose VJP is that of
    `reference(*args)`, the XLA computation with the same values. Arguments of integer dtype (a layer index, a
    weight stored as raw bf16 bits) are constants of the reference and get float0 cotangents."""

    @jax.custom_vjp
    def run(*args):
        return kernel(*args)

    def fwd(*args):
        return kernel(*args), args

    def bwd(args, g):
        diff = [_differentiable(a) for a in args]

        def on_floats(*floats):
            it = iter(floats)
            return reference(*(next(it) if d else a for a, d in zip(args, diff)))

        _, vjp = jax.vjp(on_floats, *(a for a, d in zip(args, diff) if d))
        grads = iter(vjp(g))
        return tuple(next(grads) if d else np.zeros(np.shape(a), jax.dtypes.float0) for a, d in zip(args, diff))

    run.defvjp(fwd, bwd)
    return run


__all__ = ["kernel_bias", "with_reference_gradient"]
