"""BatchTopK SAE (Bussmann et al. 2024): training keeps the k * batch largest relu'd pre-activations of the whole
batch; the threshold is an EMA of the smallest kept activation, and inference is JumpReLU with it, which is also
how it exports to SAELens ("jumprelu" with threshold). Loss: mse + aux_coef * AuxK.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from sae.archs.base import Architecture, TrainForward, top_k as _top_k, train_pre, zero
from sae.archs.topk import aux_loss


def batch_threshold(acts: jax.Array, k_max: int, k_dyn: jax.Array) -> jax.Array:
    """Value of the (k_dyn * B)-th largest entry of acts [B, S] (exact). Candidates: each row's top min(S, 2 k_max)
    entries; when some row's smallest candidate still reaches the candidate threshold (that row may hold more of
    the batch's top set than it offered) fall back to one top_k over the whole flattened batch."""
    B, S = acts.shape
    n = min(B * k_max, B * S)
    c = min(S, 2 * k_max)
    cand, _ = _top_k(acts, c)                           # [B, c] sorted desc
    flat, _ = _top_k(cand.reshape(-1), n)
    pos = jnp.clip(k_dyn * B - 1, 0, n - 1)
    t = flat[pos]
    if c == S:
        return t
    unsafe = jnp.any(cand[:, -1] >= t)

    def exact(_):
        return _top_k(acts.reshape(-1), n)[0][pos]

    return lax.cond(unsafe, exact, lambda _: t, None)




def _train_forward(params, cfg, hp, x, step, chunks=None, impl=None) -> TrainForward:
    acts = jax.nn.relu(train_pre(params, cfg, x))
    thr = batch_threshold(lax.stop_gradient(acts), cfg.k, hp["k"])
    keep = (acts >= thr) & (acts > 0)
    recon = jnp.where(keep, acts, 0.0) @ params["W_dec"] + params["b_dec"]
    return TrainForward(recon=recon, fired=keep.any(0), l0=keep.sum() / x.shape[0], sparsity=zero(),
                        penalty=zero(), extra={"min_kept": jnp.where(keep.any(), thr, 0.0)})


def _after_update(new, old, hp, extra):
    """threshold <- (1 - r) threshold + r * min kept activation (unchanged on a batch that kept nothing)."""
    r, t, m = hp["threshold_ema_rate"], old["threshold"], extra["min_kept"]
    return dict(new, threshold=jnp.where(m > 0, (1.0 - r) * t + r * m, t))


ARCH = Architecture(
    name="batchtopk", summary="k * batch largest activations per batch; JumpReLU with a running threshold at inference",
    train_forward=_train_forward, edit_activation="jumprelu", saelens_name="jumprelu", uses_k=True,
    threshold="running", dead_latent_loss=aux_loss, after_update=_after_update, saelens_import=False)
