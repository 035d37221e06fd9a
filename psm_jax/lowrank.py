"""A projection weight with a low-rank update kept factored: `W + scale * A @ B`, applied as
`x @ W + scale * (x @ A) @ B`.

LoRA training differentiates only A and B. Merging them into W first makes the backward pass form the
gradient of the whole merged [d_in, d_out] matrix (one more GEMM of the weight's size per projection
and step) only to contract it down to A's and B's; the factored product never forms it. The port's
projections go through `psm_jax.native.amx.dense`, which applies a `LowRank` in place of a plain
array, so the forward, edits, caching and scanning over stacked layers need no other change: a
`LowRank` is a pytree whose leaves are stacked along the layer axis like the weight it wraps.

The fine-tuning engine builds these (`psm_jax.finetune`); the port only knows how to apply them.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRank:
    """w [..., d_in, d_out], a [..., d_in, r], b [..., r, d_out], scale [...] (one per stacked layer)."""
    w: jax.Array
    a: jax.Array
    b: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        return self.w.shape

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def ndim(self) -> int:
        return self.w.ndim

    def apply(self, x, dense):
        """x @ (w + scale * a @ b), with `dense(x, w)` computing the full-rank product."""
        low = (x @ self.a.astype(x.dtype)) @ self.b.astype(x.dtype)
        return dense(x, self.w) + jnp.asarray(self.scale, x.dtype) * low


def is_lowrank(w) -> bool:
    return isinstance(w, LowRank)
