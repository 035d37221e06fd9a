"""SAE parameters as a plain dict and the architecture-independent encode / decode / loss functions.

Params (fp32), SAELens layout and semantics:
    W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in],
    threshold [d_sae]            (architectures with a threshold: trained (jumprelu) or running (batchtopk))

    f     = act((x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc)
    x_hat = f @ W_dec + b_dec

Each architecture (`SaeConfig.architecture`) is one module of sae/archs/ (see sae.archs.registry): its training
forward, its inference activation (a psm_jax.edits activation: the port holds the one definition of each encode)
and its export mapping. This module dispatches through the registry.

`mse` is sum over d_in, mean over tokens (E|x - x_hat|^2). Per-SAE hyper-parameters that may differ in a stacked
run are passed as `hp` (a dict of traced scalars from `hyperparams(cfg)`); for TopK, `cfg.k` is then the largest k
of the stack and ranks >= hp["k"] are masked.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from psm_jax.edits import SAE_PARAM_KEYS, sae_activate
from sae.archs import registry
from sae.config import SaeConfig

Params = dict[str, jax.Array]

PARAM_KEYS = SAE_PARAM_KEYS


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
    (geometric median, mean or zeros per `cfg.b_dec_init`), threshold = jumprelu_init_threshold (a trained threshold) or 0
    (a running estimate, e.g. batchtopk's)."""
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
    kind = registry.get(cfg.architecture).threshold
    if kind == "trained":
        t = cfg.jumprelu_init_threshold if init_threshold is None else init_threshold
        params["threshold"] = jnp.full((cfg.d_sae,), t, jnp.float32)
    elif kind == "running":
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
    """Inference activation of the architecture (the psm_jax.edits one it names; batchtopk is JumpReLU with its
    running threshold, as exported)."""
    return sae_activate(params, pre, registry.get(cfg.architecture).edit_activation, k or cfg.k)


def encode(params: Params, cfg: SaeConfig, x: jax.Array) -> jax.Array:
    """Dense latents [..., d_sae]."""
    return activate(params, cfg, pre_activations(params, cfg, x))


def decode(params: Params, latents: jax.Array) -> jax.Array:
    return latents @ params["W_dec"] + params["b_dec"]


def forward(params: Params, cfg: SaeConfig, x: jax.Array) -> SaeOutput:
    pre = pre_activations(params, cfg, x)
    f = activate(params, cfg, pre)
    return SaeOutput(decode(params, f), f, pre)


# ---------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------

def training_loss(params: Params, cfg: SaeConfig, x: jax.Array, hp: dict[str, jax.Array],
                  since_fired: jax.Array | None = None, step: jax.Array | int = 0, *, with_aux: bool = True,
                  chunks: int | None = None, impl: str | None = None):
    """Scalar loss and an info dict for one SAE on a batch x [B, d_in]: mse + the architecture's penalty
    (+ aux_coef * its dead-latent loss when with_aux and since_fired are given).

    info: mse, sparsity (the l1 / l0 term before its coefficient), aux (dead-latent term; 0 unless with_aux), l0
    (mean latents > 0 per token), explained_variance (this batch, SAELens 'new'), fired [d_sae] bool, recon
    [B, d_in], plus the architecture's extra values (batchtopk: min_kept). TopK family with sparse_decode:
    chunks = encoder token chunks (None: `sae.archs.topk.encode_chunks`), impl = "ffi" | "xla" kernels (None:
    `sae.archs.topk.kernel_impl()`); a device mesh wants chunks=1, impl="xla"."""
    arch = registry.get(cfg.architecture)
    B = x.shape[0]
    out = arch.train_forward(params, cfg, hp, x, step, chunks=chunks, impl=impl)
    mse = jnp.sum((out.recon - x) ** 2) / B
    aux = jnp.zeros((), jnp.float32)
    if cfg.uses_aux and with_aux and since_fired is not None:
        aux = arch.dead_latent_loss(params, cfg, hp, x, out.recon, since_fired)
    loss = mse + out.penalty + hp["aux_coef"] * aux
    var = jnp.sum((x - x.mean(0)) ** 2) / B
    info: dict[str, Any] = dict(out.extra)
    info.update(mse=mse, sparsity=out.sparsity, aux=aux, l0=out.l0, fired=out.fired, recon=out.recon,
                explained_variance=1.0 - mse / jnp.maximum(var, 1e-30))
    return loss, info


def after_update(new: Params, old: Params, cfg: SaeConfig, hp: dict[str, jax.Array], extra: dict) -> Params:
    """The architecture's parameter maintenance after an optimiser step (threshold clamps, running estimates)."""
    fn = registry.get(cfg.architecture).after_update
    return new if fn is None else fn(new, old, hp, extra)


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

# ---------------------------------------------------------------------------------------------------
# for psm_jax edits
# ---------------------------------------------------------------------------------------------------

def edit_activation(cfg: SaeConfig) -> str:
    """The psm_jax.edits / SAELens activation an SAE of this architecture runs with at inference."""
    return registry.get(cfg.architecture).edit_activation


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
