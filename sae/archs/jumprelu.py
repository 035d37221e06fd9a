"""JumpReLU SAE (Rajamanoharan et al. 2024): f = pre * (pre > threshold) with a trained per-latent threshold;
loss = mse + l0_coef * E[#(pre > threshold)], with rectangle-kernel pseudo-gradients (bandwidth
`jumprelu_bandwidth`) for the threshold through `jax.custom_vjp`. Thresholds are kept >= 0 after each step.
Exported to SAELens as "jumprelu" with threshold.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sae.archs.base import Architecture, TrainForward, sparsity_warmup, train_pre


@jax.custom_vjp
def _jumprelu(pre, thr, bw):
    return jnp.where(pre > thr, pre, 0.0)


def _jumprelu_fwd(pre, thr, bw):
    return jnp.where(pre > thr, pre, 0.0), (pre, thr, bw)


def _jumprelu_bwd(res, g):
    pre, thr, bw = res
    kernel = (jnp.abs(pre - thr) < 0.5 * bw).astype(pre.dtype) / bw
    d_thr = -(thr * kernel * g).sum(0)
    return jnp.where(pre > thr, g, 0.0), d_thr, jnp.zeros_like(bw)


_jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@jax.custom_vjp
def _step(pre, thr, bw):
    return (pre > thr).astype(pre.dtype)


def _step_fwd(pre, thr, bw):
    return (pre > thr).astype(pre.dtype), (pre, thr, bw)


def _step_bwd(res, g):
    pre, thr, bw = res
    kernel = (jnp.abs(pre - thr) < 0.5 * bw).astype(pre.dtype) / bw
    return jnp.zeros_like(pre), -(kernel * g).sum(0), jnp.zeros_like(bw)


_step.defvjp(_step_fwd, _step_bwd)


def _train_forward(params, cfg, hp, x, step, chunks=None, impl=None) -> TrainForward:
    B = x.shape[0]
    thr = params["threshold"]
    pre = train_pre(params, cfg, x)
    f = _jumprelu(pre, thr, hp["bandwidth"])
    recon = f @ params["W_dec"] + params["b_dec"]
    sparsity = _step(pre, thr, hp["bandwidth"]).sum() / B
    return TrainForward(recon=recon, fired=(f > 0).any(0), l0=(f > 0).sum() / B, sparsity=sparsity,
                        penalty=sparsity_warmup(hp, step) * hp["l0_coef"] * sparsity, extra={})


def _after_update(new, old, hp, extra):
    return dict(new, threshold=jnp.maximum(new["threshold"], 0.0))


ARCH = Architecture(
    name="jumprelu", summary="per-latent trained threshold with an L0 penalty (pseudo-gradients)",
    train_forward=_train_forward, edit_activation="jumprelu", saelens_name="jumprelu", threshold="trained",
    after_update=_after_update)
