"""TopK SAE (Gao et al. 2024): each token keeps its k largest pre-activations (then relu); loss = mse + aux_coef *
AuxK. Exported to SAELens as "topk" with k.

Training (`sparse_decode=True`, the default) runs through `topk_core`: only the encoder matmul is dense; the top-k,
the decode and the whole backward touch just the B*k active (token, latent) pairs, in the compiled CPU kernels of
sae/cpu_kernels.py when they are available (else in XLA ops computing the same function), with the encoder in
cache-sized token chunks on CPU. `sparse_decode=False` is the plain dense formulation (the reference the tests
compare against). For a stack whose SAEs have different k, `cfg.k` is the largest and ranks >= hp["k"] are masked.

AuxK (shared by the TopK family): the top `aux_k` pre-activations among dead latents reconstruct the residual
x - stop_grad(x_hat); the loss is normalised by the residual's variance and scaled by min(#dead / aux_k, 1). To keep
its cost bounded the dead latents are drawn from a pool of the `aux_pool` latents that have gone longest without
firing (exact whenever #dead <= aux_pool).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sae.archs.base import Architecture, TrainForward, top_k as _top_k, scatter_last, train_pre, zero

# ---- sparse TopK kernels (loops over the k slots: XLA fuses each into one pass; much faster on CPU than
# ---- materialising [B, k, d_in] gathers or dense [B, d_sae] matmuls) -----------------------------------------

_UNROLL_K = 64


def _gather_sum(idx, vals, W):
    """out[b] = sum_j vals[b, j] * W[idx[b, j]]   ([B, k], [B, k], [S, D] -> [B, D])."""
    k = idx.shape[-1]

    def term(j):
        return vals[:, j, None] * W.at[idx[:, j]].get(mode="promise_in_bounds")

    if k <= _UNROLL_K:
        out = term(0)
        for j in range(1, k):
            out = out + term(j)
        return out
    return lax.fori_loop(1, k, lambda j, acc: acc + term(j), term(0))


def _gather_dot(idx, g, W):
    """out[b, j] = <g[b], W[idx[b, j]]>   ([B, k], [B, D], [S, D] -> [B, k])."""
    B, k = idx.shape

    def body(j, out):
        r = (g * W.at[idx[:, j]].get(mode="promise_in_bounds")).sum(-1)
        return lax.dynamic_update_slice(out, r[None, :], (j, 0))

    return lax.fori_loop(0, k, body, jnp.zeros((k, B), g.dtype)).T


def _scatter_rows(idx, coef, rows, n_rows):
    """out[s] = sum_{b, j: idx[b, j] = s} coef[b, j] * rows[b]   ([B, k], [B, k], [B, D] -> [n_rows, D])."""
    k = idx.shape[-1]

    def body(j, acc):
        return acc.at[idx[:, j]].add(coef[:, j, None] * rows, mode="promise_in_bounds")

    return lax.fori_loop(0, k, body, jnp.zeros((n_rows, rows.shape[-1]), rows.dtype))


def encode_chunks(batch: int, d_sae: int) -> int:
    """How many token chunks the TopK encoder runs in: on CPU, chunks of ~2M pre-activations (8 MB) so that each
    chunk's matmul output is selected by top_k while it is still in cache; one chunk elsewhere (accelerators want
    the whole batch in one matmul)."""
    if jax.default_backend() != "cpu":
        return 1
    n = max(1, batch // max(256, (1 << 21) // max(d_sae, 1)))
    while batch % n:
        n -= 1
    return n


KERNEL_IMPLS = ("xla", "ffi")


def kernel_impl() -> str:
    """"ffi" when the compiled CPU kernels (sae/cpu_kernels.py) are usable here, else "xla"."""
    from sae import cpu_kernels
    return "ffi" if cpu_kernels.available() else "xla"


def _kernels(impl: str):
    """(topk_bias, gather_sum, gather_dot, scatter2) of one implementation."""
    if impl == "ffi":
        from sae import cpu_kernels as K
        return K.topk_bias, K.gather_sum, K.gather_dot, K.scatter2

    def topk_bias(pre, bias, k):
        return _top_k(pre + bias, k)

    def scatter2(idx, c1, r1, c2, r2, n_rows):
        s2 = jnp.zeros((n_rows,), c2.dtype).at[idx.reshape(-1)].add(c2.reshape(-1), mode="promise_in_bounds")
        return _scatter_rows(idx, c1, r1, n_rows), _scatter_rows(idx, c2, r2, n_rows), s2

    return topk_bias, _gather_sum, _gather_dot, scatter2


def _topk_forward(x, b_dec, W_enc, b_enc, W_dec, k_dyn, k, apply_b_dec, chunks, impl):
    topk_bias, gather_sum, _, _ = _kernels(impl)
    x_in = x - b_dec if apply_b_dec else x
    if chunks <= 1:
        raw, idx = topk_bias(x_in @ W_enc, b_enc, k)
    else:
        B, D = x_in.shape
        raw, idx = lax.map(lambda xc: topk_bias(xc @ W_enc, b_enc, k), x_in.reshape(chunks, B // chunks, D))
        raw, idx = raw.reshape(B, k), idx.reshape(B, k)
    vals = jnp.where(jnp.arange(k) < k_dyn, jax.nn.relu(raw), 0.0)
    recon = gather_sum(idx, vals, W_dec) + b_dec
    return (recon, vals, idx), x_in


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def topk_core(x, b_dec, W_enc, b_enc, W_dec, k_dyn, k, apply_b_dec, chunks, impl):
    """The sparse TopK SAE: (recon, vals, idx) with vals = relu(top_k(pre))[:, :k_dyn] (ranks >= k_dyn zeroed),
    recon = sum_j vals[:, j] W_dec[idx[:, j]] + b_dec, pre = (x - b_dec) @ W_enc + b_enc.

    Only the encoder matmul is dense. The top-k (in cache-sized token chunks on CPU), the decode, and the whole
    backward (d_vals by gathered dot products; dW_dec, dW_enc and db_enc by scatter-adding the k active rows of each
    token) touch just the B*k active (token, latent) pairs. impl "ffi" runs those in the compiled CPU kernels,
    "xla" in XLA ops; both compute the same function. x gets no gradient (it is data)."""
    return _topk_forward(x, b_dec, W_enc, b_enc, W_dec, k_dyn, k, apply_b_dec, chunks, impl)[0]


def topk_core_fwd(x, b_dec, W_enc, b_enc, W_dec, k_dyn, k, apply_b_dec, chunks, impl):
    out, x_in = _topk_forward(x, b_dec, W_enc, b_enc, W_dec, k_dyn, k, apply_b_dec, chunks, impl)
    return out, (x_in, W_enc, W_dec, out[1], out[2], k_dyn)


def topk_core_bwd(k, apply_b_dec, chunks, impl, res, cts):
    x_in, W_enc, W_dec, vals, idx, k_dyn = res
    g, g_vals, _ = cts
    _, _, gather_dot, scatter2 = _kernels(impl)
    d_vals = gather_dot(idx, g, W_dec) + g_vals
    d_raw = jnp.where(vals > 0, d_vals, 0.0)          # relu and the k_dyn mask
    S = W_dec.shape[0]
    dW_dec, dW_enc_t, db_enc = scatter2(idx, vals, g, d_raw, x_in, S)
    db_dec = g.sum(0) - (W_enc @ db_enc if apply_b_dec else 0.0)
    return (jnp.zeros_like(x_in), db_dec, dW_enc_t.T, db_enc, dW_dec, np.zeros(np.shape(k_dyn), jax.dtypes.float0))


topk_core.defvjp(topk_core_fwd, topk_core_bwd)



def aux_loss(params, cfg, hp, x, recon, since_fired):
    """AuxK: the top aux_k pre-activations among dead latents (relu'd) reconstruct the residual x - stop_grad(x_hat);
    loss = |e_hat - e|^2 / |e - mean(e)|^2 * min(#dead / aux_k, 1). Pre-activations are computed only for a pool of
    the latents that have gone longest without firing: when #dead <= aux_k the pool is aux_k wide and holds every
    dead latent (no selection needed); otherwise `aux_pool_size` wide with an exact top-aux_k inside it (exact
    whenever #dead <= pool)."""
    aux_k = cfg.effective_aux_k
    dead = since_fired >= hp["dead_tokens_threshold"]
    n_dead = dead.sum()
    x_in = x - params["b_dec"] if cfg.apply_b_dec_to_input else x
    resid = x - lax.stop_gradient(recon)
    den = jnp.maximum(jnp.sum((resid - resid.mean(0)) ** 2), 1e-12)

    def pool_loss(pool, select, p_):
        _, pool_idx = _top_k(since_fired, pool)          # longest silent first
        pool_dead = dead[pool_idx]
        pre = x_in @ p_["W_enc"][:, pool_idx] + p_["b_enc"][pool_idx]
        acts = jnp.where(pool_dead, jax.nn.relu(pre), 0.0)
        if select:
            kth = _top_k(jnp.where(pool_dead, pre, -jnp.inf), aux_k)[0][:, -1:]
            acts = jnp.where(pre >= kth, acts, 0.0)
        e_hat = acts @ p_["W_dec"][pool_idx]
        return jnp.sum((e_hat - resid) ** 2) / den

    big = aux_pool_size(cfg)
    if big <= aux_k:
        loss = pool_loss(aux_k, False, params)
    else:
        loss = lax.cond(n_dead <= aux_k, functools.partial(pool_loss, aux_k, False),
                        functools.partial(pool_loss, big, True), params)
    scale = jnp.minimum(n_dead / aux_k, 1.0)
    return jnp.where(n_dead > 0, scale * loss, 0.0)


def aux_pool_size(cfg) -> int:
    return min(cfg.d_sae, max(4 * cfg.effective_aux_k, 1024))


def sparse_topk(params, cfg, hp, x, chunks=None, impl=None):
    """(recon, vals [B, k], idx [B, k]) of a TopK SAE on x [B, d_in] (ranks >= hp["k"] zeroed), through the sparse
    kernels (`cfg.sparse_decode`) or the dense reference formulation."""
    B = x.shape[0]
    if cfg.sparse_decode:
        n_chunks = encode_chunks(B, cfg.d_sae) if chunks is None else chunks
        return topk_core(x, params["b_dec"], params["W_enc"], params["b_enc"], params["W_dec"], hp["k"], cfg.k,
                         cfg.apply_b_dec_to_input, n_chunks, kernel_impl() if impl is None else impl)
    vals, idx = _top_k(train_pre(params, cfg, x), cfg.k)
    vals = jnp.where(jnp.arange(cfg.k) < hp["k"], jax.nn.relu(vals), 0.0)
    recon = scatter_last(jnp.zeros((B, cfg.d_sae), x.dtype), idx, vals) @ params["W_dec"] + params["b_dec"]
    return recon, vals, idx


def fired_latents(cfg, vals, idx) -> jax.Array:
    """bool [d_sae]: latents holding a positive kept value on some token."""
    return jnp.zeros((cfg.d_sae,), bool).at[idx.reshape(-1)].max(vals.reshape(-1) > 0)


def _train_forward(params, cfg, hp, x, step, chunks=None, impl=None) -> TrainForward:
    recon, vals, idx = sparse_topk(params, cfg, hp, x, chunks, impl)
    return TrainForward(recon=recon, fired=fired_latents(cfg, vals, idx), l0=(vals > 0).sum() / x.shape[0],
                        sparsity=zero(), penalty=zero(), extra={})


def saelens_topk_fields(cfg) -> dict:
    return {"k": int(cfg.k), "rescale_acts_by_decoder_norm": False}


ARCH = Architecture(
    name="topk", summary="k largest pre-activations per token; AuxK for dead latents",
    train_forward=_train_forward, edit_activation="topk", saelens_name="topk", uses_k=True,
    dead_latent_loss=aux_loss, saelens_fields=saelens_topk_fields)
