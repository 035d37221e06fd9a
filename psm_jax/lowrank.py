"""A projection weight with a low-rank update kept factored: `W + scale * A @ B`, applied as
`x @ W + scale * (x @ A) @ B`.

LoRA training differentiates only A and B. Merging them into W first makes the backward pass form the
gradient of the whole merged [d_in, d_out] matrix (one more GEMM of the weight's size per projection
and step) only to contract it down to A's and B's; the factored product never forms it. The port's
projections go through `psm_jax.native.amx.dense`, which applies a `LowRank` in place of a plain
array, so the forward, edits, caching and scanning over stacked layers need no other change: a
`LowRank` is a pytree whose leaves are stacked along the layer axis like the weight it wraps.

The low-rank term has its own backward (`low_rank_product`): the same products autodiff forms, written
on [tokens, features] matrices with the rank-sized factor transposed. Left to autodiff, XLA's CPU
backend lays out each [tokens, d_out] cotangent transposed for the A/B gradient dots and writes it
through a strided elementwise fusion, which took about a third of a LoRA training step's backward
(`benchmarks/finetune_vs_peft.py` has the profile).

The fine-tuning engine builds these (`psm_jax.finetune`); the port only knows how to apply them.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.custom_vjp
def low_rank_product(x2, a, b, scale):
    """scale * (x2 @ a) @ b for x2 [T, d_in], a [d_in, r], b [r, d_out], scalar scale."""
    return scale * ((x2 @ a) @ b)


def _low_rank_fwd(x2, a, b, scale):
    xa = x2 @ a
    return scale * (xa @ b), (x2, a, b, scale, xa)


def _low_rank_bwd(res, g):
    """Cotangents of x2, a, b, scale; the [T, d_out] and [T, d_in] operands are read in place, only the
    [T, r] ones are transposed."""
    x2, a, b, scale, xa = res
    gb = g @ b.T                                   # [T, r]
    gb_scaled = scale * gb
    dx = gb_scaled @ a.T                           # [T, d_in]
    da = (gb_scaled.T @ x2).T                      # [d_in, r]
    db = scale * (xa.T @ g)                        # [r, d_out]
    dscale = jnp.sum(gb * xa).astype(scale.dtype)  # <g, xa @ b> = <g @ b.T, xa>
    return dx, da, db, dscale


low_rank_product.defvjp(_low_rank_fwd, _low_rank_bwd)


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
        """x @ (w + scale * a @ b), with `dense(x, w)` computing the full-rank product (one layer: w 2-D)."""
        x2 = x.reshape(-1, x.shape[-1])
        low = low_rank_product(x2, self.a.astype(x.dtype), self.b.astype(x.dtype), jnp.asarray(self.scale, x.dtype))
        return dense(x, self.w) + low.reshape(*x.shape[:-1], low.shape[-1])

    def apply_autodiff(self, x, dense):
        """`apply` with the low-rank term left to autodiff: the reference its backward is tested against."""
        low = (x @ self.a.astype(x.dtype)) @ self.b.astype(x.dtype)
        return dense(x, self.w) + jnp.asarray(self.scale, x.dtype) * low


def is_lowrank(w) -> bool:
    return isinstance(w, LowRank)
