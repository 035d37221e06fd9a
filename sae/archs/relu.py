"""ReLU SAE with an L1 penalty weighted by decoder row norms (the SAELens "standard" SAE):
f = relu(pre); loss = mse + l1_coef * sum_i f_i * ||W_dec_i|| (coefficient warmed up over sparsity_warmup_steps).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sae.archs.base import Architecture, TrainForward, sparsity_warmup, train_pre


def _train_forward(params, cfg, hp, x, step, chunks=None, impl=None) -> TrainForward:
    B = x.shape[0]
    f = jax.nn.relu(train_pre(params, cfg, x))
    recon = f @ params["W_dec"] + params["b_dec"]
    W_dec = params["W_dec"]
    if cfg.normalize_decoder:   # the norms' own gradient is parallel to the rows, which the step projects out
        W_dec = lax.stop_gradient(W_dec)
    sparsity = (f * jnp.linalg.norm(W_dec, axis=-1)).sum() / B
    return TrainForward(recon=recon, fired=(f > 0).any(0), l0=(f > 0).sum() / B, sparsity=sparsity,
                        penalty=sparsity_warmup(hp, step) * hp["l1_coef"] * sparsity, extra={})


ARCH = Architecture(
    name="relu", summary="relu with an L1 penalty weighted by decoder norms",
    train_forward=_train_forward, edit_activation="relu", saelens_name="standard")
