"""SAE parameters as a plain dict and pure encode / decode / loss functions.

Params (fp32), SAELens layout and semantics:
    W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in],
    threshold [d_sae]            (jumprelu: trained; batchtopk: running estimate, exported as JumpReLU)

    f     = act((x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc)
    x_hat = f @ W_dec + b_dec

Architectures (`SaeConfig.architecture`):
  relu      f = relu(pre); loss = mse + l1_coef * sum_i f_i * ||W_dec_i||
  topk      f keeps the k largest pre-activations of each token (then relu); loss = mse + aux_coef * AuxK
  batchtopk training keeps the k * batch largest relu'd pre-activations of the whole batch; the threshold
            is an EMA of the smallest kept activation and inference is JumpReLU with it; loss as topk
  jumprelu  f = pre * (pre > threshold); loss = mse + l0_coef * E[#(pre > threshold)], with rectangle-kernel
            pseudo-gradients for the threshold (Rajamanoharan et al. 2024) through `jax.custom_vjp`

`mse` is sum over d_in, mean over tokens (E|x - x_hat|^2). AuxK (topk/batchtopk): the top `aux_k` pre-activations
among dead latents reconstruct the residual x - stop_grad(x_hat); the loss is normalised by the residual's variance
and scaled by min(#dead / aux_k, 1). To keep its cost bounded the dead latents are drawn from a pool of the
`aux_pool` latents that have gone longest without firing (exact whenever #dead <= aux_pool).

Per-SAE hyper-parameters that may differ in a stacked run are passed as `hp` (a dict of traced scalars from
`hyperparams(cfg)`); for TopK, `cfg.k` is then the largest k of the stack and ranks >= hp["k"] are masked.

TopK training (`sparse_decode=True`, the default) runs through `_topk_core`: only the encoder matmul is dense; the
top-k, the decode and the whole backward touch just the B*k active (token, latent) pairs, in the compiled CPU
kernels of sae/cpu_kernels.py when they are available (else in XLA ops computing the same function), with the
encoder in cache-sized token chunks on CPU. `sparse_decode=False` is the plain dense formulation (the reference the
tests compare against).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sae.config import SaeConfig

Params = dict[str, jax.Array]

PARAM_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")


class SaeShapeError(ValueError):
    """Params or inputs whose shapes do not match the config (the message names the array and both shapes)."""


class SaeOutput(NamedTuple):
    recon: jax.Array      # [..., d_in]
    latents: jax.Array    # [..., d_sae] (dense)
    pre_acts: jax.Array   # [..., d_sae]


# ---------------------------------------------------------------------------------------------------
# initialisation
# ---------------------------------------------------------------------------------------------------

def geometric_median(points: jax.Array, iters: int = 50, eps: float = 1e-6) -> jax.Array:
    """Weiszfeld iterations for argmin_y sum_i |p_i - y|, starting from the mean. points [N, D] -> [D]."""
    points = jnp.asarray(points, jnp.float32)

    def body(_, y):
        d = jnp.linalg.norm(points - y, axis=-1)
        w = 1.0 / jnp.maximum(d, eps)
        return (w[:, None] * points).sum(0) / w.sum()

    return lax.fori_loop(0, iters, body, points.mean(0))


def init_params(key: jax.Array, cfg: SaeConfig, sample: jax.Array | None = None,
                init_threshold: float | jax.Array | None = None) -> Params:
    """Fresh params: unit-norm random decoder rows, W_enc = W_dec^T, b_enc = 0, b_dec from `sample` [N, d_in]
    (geometric median, mean or zeros per `cfg.b_dec_init`), threshold = jumprelu_init_threshold (jumprelu) or 0
    (batchtopk, a running estimate)."""
    W_dec = jax.random.normal(key, (cfg.d_sae, cfg.d_in), jnp.float32)
    W_dec = W_dec / jnp.linalg.norm(W_dec, axis=-1, keepdims=True)
    if not cfg.normalize_decoder:
        W_dec = 0.1 * W_dec
    if cfg.b_dec_init == "zeros" or sample is None:
        b_dec = jnp.zeros((cfg.d_in,), jnp.float32)
    else:
        sample = jnp.asarray(sample, jnp.float32).reshape(-1, cfg.d_in)[:16384]
        b_dec = sample.mean(0) if cfg.b_dec_init == "mean" else geometric_median(sample, cfg.geometric_median_iters)
    params = {"W_enc": W_dec.T.copy(), "b_enc": jnp.zeros((cfg.d_sae,), jnp.float32), "W_dec": W_dec,
              "b_dec": b_dec}
    if cfg.architecture == "jumprelu":
        t = cfg.jumprelu_init_threshold if init_threshold is None else init_threshold
        params["threshold"] = jnp.full((cfg.d_sae,), t, jnp.float32)
    elif cfg.architecture == "batchtopk":
        params["threshold"] = jnp.zeros((cfg.d_sae,), jnp.float32)
    return params


def check_params(params: Params, cfg: SaeConfig, *, lead: tuple[int, ...] = ()) -> None:
    """Raise SaeShapeError naming the first array whose shape differs from what `cfg` implies."""
    want = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in),
            "b_dec": (cfg.d_in,)}
    if cfg.has_threshold:
        want["threshold"] = (cfg.d_sae,)
    for name, shape in want.items():
        if name not in params:
            raise SaeShapeError(f"SAE params lack {name!r} (have {sorted(params)}) for a {cfg.architecture} SAE")
        got = tuple(np.shape(params[name]))
        if got != lead + shape:
            raise SaeShapeError(f"SAE param {name} has shape {got}, expected {lead + shape} "
                                f"(d_in={cfg.d_in}, d_sae={cfg.d_sae})")


def check_input(x, cfg: SaeConfig) -> None:
    if np.shape(x)[-1:] != (cfg.d_in,):
        raise SaeShapeError(f"activations have shape {tuple(np.shape(x))}; the SAE expects [..., d_in={cfg.d_in}] "
                            "(was the SAE trained on another site or model?)")


# ---------------------------------------------------------------------------------------------------
# per-SAE dynamic hyper-parameters
# ---------------------------------------------------------------------------------------------------

def hyperparams(cfg: SaeConfig) -> dict[str, jax.Array]:
    """The sweepable and schedule values of one config as fp32/int32 scalars (stacked for stacked training)."""
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return {"k": jnp.asarray(cfg.k, jnp.int32), "l1_coef": f32(cfg.l1_coef), "l0_coef": f32(cfg.l0_coef),
            "aux_coef": f32(cfg.aux_coef), "lr": f32(cfg.effective_lr), "bandwidth": f32(cfg.jumprelu_bandwidth),
            # schedule values: equal across a stack, traced so that changing them does not recompile
            "warmup_steps": f32(cfg.warmup_steps), "total_steps": f32(cfg.total_steps or 0),
            "decay_start": f32(cfg.decay_start), "sparsity_warmup_steps": f32(cfg.sparsity_warmup_steps),
            "dead_tokens_threshold": jnp.asarray(min(cfg.dead_tokens_threshold, 2 ** 31 - 1), jnp.int32),
            "threshold_ema_rate": f32(cfg.threshold_ema_rate)}


# ---------------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------------

def _x_in(params, cfg, x):
    return x - params["b_dec"] if cfg.apply_b_dec_to_input else x


def pre_activations(params: Params, cfg: SaeConfig, x: jax.Array) -> jax.Array:
    return _x_in(params, cfg, x) @ params["W_enc"] + params["b_enc"]


def activate(params: Params, cfg: SaeConfig, pre: jax.Array, k: int | None = None) -> jax.Array:
    """Inference activation (batchtopk uses its JumpReLU threshold, as exported)."""
    arch = cfg.architecture
    if arch == "relu":
        return jax.nn.relu(pre)
    if arch == "topk":
        vals, idx = _top_k(pre, k or cfg.k)
        return _scatter_last(jnp.zeros_like(pre), idx, jax.nn.relu(vals))
    return jnp.where(pre > params["threshold"], pre, 0.0)   # thresholds are kept >= 0


def encode(params: Params, cfg: SaeConfig, x: jax.Array) -> jax.Array:
    """Dense latents [..., d_sae]."""
    return activate(params, cfg, pre_activations(params, cfg, x))


def decode(params: Params, latents: jax.Array) -> jax.Array:
    return latents @ params["W_dec"] + params["b_dec"]


def forward(params: Params, cfg: SaeConfig, x: jax.Array) -> SaeOutput:
    pre = pre_activations(params, cfg, x)
    f = activate(params, cfg, pre)
    return SaeOutput(decode(params, f), f, pre)


def _scatter_last(base, idx, vals):
    """base[..., idx[..., j]] = vals[..., j] along the last axis."""
    return jnp.put_along_axis(base, idx, vals, axis=-1, inplace=False)


# ---------------------------------------------------------------------------------------------------
# training pieces
# ---------------------------------------------------------------------------------------------------

@jax.custom_vjp
def _encoder(x, b_dec, W_enc, b_enc):
    """(x - b_dec) @ W_enc + b_enc, with the b_dec gradient computed as -(sum_b g) @ W_enc^T (a vector-matrix
    product) instead of a full [B, d_in] input gradient; x is data and gets no gradient."""
    return (x - b_dec) @ W_enc + b_enc


def _encoder_fwd(x, b_dec, W_enc, b_enc):
    x_in = x - b_dec
    return x_in @ W_enc + b_enc, (x_in, W_enc)


def _encoder_bwd(res, g):
    x_in, W_enc = res
    gs = g.sum(0)
    return jnp.zeros_like(x_in), -(W_enc @ gs), x_in.T @ g, gs


_encoder.defvjp(_encoder_fwd, _encoder_bwd)


def _train_pre(params, cfg, x):
    if cfg.apply_b_dec_to_input:
        return _encoder(x, params["b_dec"], params["W_enc"], params["b_enc"])
    return x @ params["W_enc"] + params["b_enc"]


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


# ---- sparse TopK kernels (loops over the k slots: XLA fuses each into one pass; much faster on CPU than
# ---- materialising [B, k, d_in] gathers or dense [B, d_sae] matmuls) -----------------------------------------

_UNROLL_K = 64


def _top_k(x, k):
    """lax.top_k behind an optimization barrier: without it XLA folds later column slices of the result into the
    sort and no longer recognises the top-k pattern, which turns it into a full sort of every row (30x slower)."""
    vals, idx = lax.top_k(x, k)
    return lax.optimization_barrier(vals), lax.optimization_barrier(idx)


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
def _topk_core(x, b_dec, W_enc, b_enc, W_dec, k_dyn, k, apply_b_dec, chunks, impl):
    """The sparse TopK SAE: (recon, vals, idx) with vals = relu(top_k(pre))[:, :k_dyn] (ranks >= k_dyn zeroed),
    recon = sum_j vals[:, j] W_dec[idx[:, j]] + b_dec, pre = (x - b_dec) @ W_enc + b_enc.

    Only the encoder matmul is dense. The top-k (in cache-sized token chunks on CPU), the decode, and the whole
    backward (d_vals by gathered dot products; dW_dec, dW_enc and db_enc by scatter-adding the k active rows of each
    token) touch just the B*k active (token, latent) pairs. impl "ffi" runs those in the compiled CPU kernels,
    "xla" in XLA ops; both compute the same function. x gets no gradient (it is data)."""
    return _topk_forward(x, b_dec, W_enc, b_enc, W_dec, k_dyn, k, apply_b_dec, chunks, impl)[0]


def _topk_core_fwd(x, b_dec, W_enc, b_enc, W_dec, k_dyn, k, apply_b_dec, chunks, impl):
    out, x_in = _topk_forward(x, b_dec, W_enc, b_enc, W_dec, k_dyn, k, apply_b_dec, chunks, impl)
    return out, (x_in, W_enc, W_dec, out[1], out[2], k_dyn)


def _topk_core_bwd(k, apply_b_dec, chunks, impl, res, cts):
    x_in, W_enc, W_dec, vals, idx, k_dyn = res
    g, g_vals, _ = cts
    _, _, gather_dot, scatter2 = _kernels(impl)
    d_vals = gather_dot(idx, g, W_dec) + g_vals
    d_raw = jnp.where(vals > 0, d_vals, 0.0)          # relu and the k_dyn mask
    S = W_dec.shape[0]
    dW_dec, dW_enc_t, db_enc = scatter2(idx, vals, g, d_raw, x_in, S)
    db_dec = g.sum(0) - (W_enc @ db_enc if apply_b_dec else 0.0)
    return (jnp.zeros_like(x_in), db_dec, dW_enc_t.T, db_enc, dW_dec, np.zeros(np.shape(k_dyn), jax.dtypes.float0))


_topk_core.defvjp(_topk_core_fwd, _topk_core_bwd)


def _batch_threshold(acts: jax.Array, k_max: int, k_dyn: jax.Array) -> jax.Array:
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


def aux_pool_size(cfg: SaeConfig) -> int:
    return min(cfg.d_sae, max(4 * cfg.effective_aux_k, 1024))


def training_loss(params: Params, cfg: SaeConfig, x: jax.Array, hp: dict[str, jax.Array],
                  since_fired: jax.Array | None = None, step: jax.Array | int = 0, *, with_aux: bool = True,
                  chunks: int | None = None, impl: str | None = None):
    """Scalar loss and an info dict for one SAE on a batch x [B, d_in].

    info: mse, sparsity (the l1 / l0 term before its coefficient), aux (AuxK term; 0 unless with_aux), l0 (mean
    latents > 0 per token), explained_variance (this batch, SAELens 'new'), fired [d_sae] bool, recon [B, d_in],
    min_kept (batchtopk). TopK with sparse_decode: chunks = encoder token chunks (None: `encode_chunks`), impl =
    "ffi" | "xla" kernels (None: `kernel_impl()`); a device mesh wants chunks=1, impl="xla"."""
    arch = cfg.architecture
    B = x.shape[0]
    info: dict[str, Any] = {}
    sparsity = jnp.zeros((), jnp.float32)
    sw = hp["sparsity_warmup_steps"]
    warm = jnp.where(sw > 0, jnp.minimum((jnp.asarray(step, jnp.float32) + 1) / jnp.maximum(sw, 1.0), 1.0), 1.0)

    if arch == "topk" or arch == "batchtopk":
        if arch == "topk":
            if cfg.sparse_decode:
                n_chunks = encode_chunks(B, cfg.d_sae) if chunks is None else chunks
                recon, vals, idx = _topk_core(x, params["b_dec"], params["W_enc"], params["b_enc"], params["W_dec"],
                                              hp["k"], cfg.k, cfg.apply_b_dec_to_input, n_chunks,
                                              kernel_impl() if impl is None else impl)
            else:
                vals, idx = _top_k(_train_pre(params, cfg, x), cfg.k)
                vals = jnp.where(jnp.arange(cfg.k) < hp["k"], jax.nn.relu(vals), 0.0)
                recon = (_scatter_last(jnp.zeros((B, cfg.d_sae), x.dtype), idx, vals) @ params["W_dec"]
                         + params["b_dec"])
            fired = jnp.zeros((cfg.d_sae,), bool).at[idx.reshape(-1)].max(vals.reshape(-1) > 0)
            l0 = (vals > 0).sum() / B
        else:
            acts = jax.nn.relu(_train_pre(params, cfg, x))
            thr = _batch_threshold(lax.stop_gradient(acts), cfg.k, hp["k"])
            keep = (acts >= thr) & (acts > 0)
            f = jnp.where(keep, acts, 0.0)
            recon = f @ params["W_dec"] + params["b_dec"]
            fired = keep.any(0)
            l0 = keep.sum() / B
            info["min_kept"] = jnp.where(keep.any(), thr, 0.0)
        mse = jnp.sum((recon - x) ** 2) / B
        aux = jnp.zeros((), jnp.float32)
        if cfg.uses_aux and with_aux and since_fired is not None:
            aux = aux_loss(params, cfg, hp, x, recon, since_fired)
        loss = mse + hp["aux_coef"] * aux
    elif arch == "relu":
        f = jax.nn.relu(_train_pre(params, cfg, x))
        recon = f @ params["W_dec"] + params["b_dec"]
        mse = jnp.sum((recon - x) ** 2) / B
        W_dec = params["W_dec"]
        if cfg.normalize_decoder:   # the norms' own gradient is parallel to the rows, which the step projects out
            W_dec = lax.stop_gradient(W_dec)
        sparsity = (f * jnp.linalg.norm(W_dec, axis=-1)).sum() / B
        loss = mse + warm * hp["l1_coef"] * sparsity
        fired = (f > 0).any(0)
        l0 = (f > 0).sum() / B
        aux = jnp.zeros((), jnp.float32)
    elif arch == "jumprelu":
        thr = params["threshold"]
        pre = _train_pre(params, cfg, x)
        f = _jumprelu(pre, thr, hp["bandwidth"])
        recon = f @ params["W_dec"] + params["b_dec"]
        mse = jnp.sum((recon - x) ** 2) / B
        sparsity = _step(pre, thr, hp["bandwidth"]).sum() / B
        loss = mse + warm * hp["l0_coef"] * sparsity
        fired = (f > 0).any(0)
        l0 = (f > 0).sum() / B
        aux = jnp.zeros((), jnp.float32)
    else:  # pragma: no cover - config validates
        raise ValueError(arch)

    var = jnp.sum((x - x.mean(0)) ** 2) / B
    info.update(mse=mse, sparsity=sparsity, aux=aux, l0=l0, fired=fired, recon=recon,
                explained_variance=1.0 - mse / jnp.maximum(var, 1e-30))
    return loss, info


def project_decoder_grad(grad_W_dec: jax.Array, W_dec: jax.Array, *, unit: bool = False) -> jax.Array:
    """Remove from each decoder row's gradient its component parallel to the row (`unit=True`: the rows are
    known to have unit norm, as in training with normalize_decoder, which saves a pass)."""
    w = W_dec if unit else W_dec / jnp.maximum(jnp.linalg.norm(W_dec, axis=-1, keepdims=True), 1e-12)
    return grad_W_dec - (grad_W_dec * w).sum(-1, keepdims=True) * w


def normalize_decoder(W_dec: jax.Array) -> jax.Array:
    return W_dec / jnp.maximum(jnp.linalg.norm(W_dec, axis=-1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------------
# for psm_jax edits
# ---------------------------------------------------------------------------------------------------

def edit_activation(cfg: SaeConfig) -> str:
    """The psm_jax.edits / SAELens activation an SAE of this architecture runs with at inference."""
    return {"relu": "relu", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}[cfg.architecture]


def to_edit_sae(params: Params, cfg: SaeConfig) -> dict[str, Any]:
    """Keyword arguments for `psm_jax.edits.sae_splice(config, **to_edit_sae(p, c), layers=...)` / `sae_latent`:
    {"sae": {W_enc, b_enc, W_dec, b_dec[, threshold]}, "activation": relu|topk|jumprelu, "k": int,
     "apply_b_dec_to_input": bool} (SAELens semantics; batchtopk becomes JumpReLU with its running threshold)."""
    check_params(params, cfg)
    sae = {k: jnp.asarray(params[k], jnp.float32) for k in PARAM_KEYS}
    if cfg.has_threshold:
        sae["threshold"] = jnp.asarray(params["threshold"], jnp.float32)
    act = edit_activation(cfg)
    return {"sae": sae, "activation": act, "k": int(cfg.k) if act == "topk" else 0,
            "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input)}


def fold_activation_scale(params: Params, cfg: SaeConfig, scale: float) -> Params:
    """Fold an input scaling x -> scale * x (used in training) into the weights so the SAE runs on raw x:
    W_enc * scale, W_dec / scale, b_dec / scale (pre-activations, hence thresholds, are unchanged)."""
    if scale == 1.0:
        return dict(params)
    out = dict(params)
    out["W_enc"] = params["W_enc"] * scale
    out["W_dec"] = params["W_dec"] / scale
    out["b_dec"] = params["b_dec"] / scale
    return out
