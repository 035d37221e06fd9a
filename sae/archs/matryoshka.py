"""Matryoshka TopK SAE (Bussmann et al. 2025; Nabeshima 2024): a TopK SAE whose nested prefixes of latents
(the first d_sae/8, d_sae/4, d_sae/2 and all of them) must each reconstruct the input on their own, which pushes
general features into the early latents and keeps specific ones from absorbing them.

Training: TopK codes f over all latents (the sparse kernels of sae.archs.topk); loss = sum over the nested prefixes
m of E|x - (f[:, :m] W_dec[:m] + b_dec)|^2, plus aux_coef * AuxK. Inference is plain TopK, so the SAE exports to
SAELens as "topk" (and runs in psm_jax edits as "topk"); the psm-jax config in the export's metadata keeps the
architecture name for a round trip.
"""
from __future__ import annotations

import jax.numpy as jnp

from sae.archs.base import Architecture, TrainForward, scatter_last, zero
from sae.archs.topk import aux_loss, fired_latents, saelens_topk_fields, sparse_topk

PREFIX_FRACTIONS = (1 / 8, 1 / 4, 1 / 2)   # the strict prefixes; the full width is the last one


def prefix_sizes(d_sae: int) -> tuple[int, ...]:
    """Widths of the nested prefixes, ascending and ending with d_sae (empty or repeated widths dropped)."""
    sizes = sorted({int(d_sae * f) for f in PREFIX_FRACTIONS} - {0, d_sae})
    return (*sizes, d_sae)


def _train_forward(params, cfg, hp, x, step, chunks=None, impl=None) -> TrainForward:
    B = x.shape[0]
    recon, vals, idx = sparse_topk(params, cfg, hp, x, chunks, impl)
    f = scatter_last(jnp.zeros((B, cfg.d_sae), x.dtype), idx, vals)
    penalty = zero()
    for m in prefix_sizes(cfg.d_sae)[:-1]:      # the full prefix is the generic reconstruction loss
        part = f[:, :m] @ params["W_dec"][:m] + params["b_dec"]
        penalty = penalty + jnp.sum((part - x) ** 2) / B
    return TrainForward(recon=recon, fired=fired_latents(cfg, vals, idx), l0=(vals > 0).sum() / B,
                        sparsity=zero(), penalty=penalty, extra={})


ARCH = Architecture(
    name="matryoshka_topk", summary="TopK whose nested latent prefixes each reconstruct the input",
    train_forward=_train_forward, edit_activation="topk", saelens_name="topk", uses_k=True,
    dead_latent_loss=aux_loss, saelens_fields=saelens_topk_fields, saelens_import=False)
