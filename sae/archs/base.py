"""What an SAE architecture is, and the training pieces several architectures share.

An `Architecture` is one record: how it trains (`train_forward`, an optional dead-latent loss, the parameter
update after each optimiser step), how it runs at inference (`edit_activation`, a psm_jax.edits activation, so the
port's SAE edits, the metrics and the feature analysis all encode with the same function) and how it is exported
(`saelens_name` and the extra cfg.json fields of SAELens v6). `sae.archs.registry` maps names to records; every
other module asks the registry instead of switching on the name.

Parameters follow the SAELens layout: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in],
plus threshold [d_sae] for architectures with `threshold` set ("trained": a learned JumpReLU threshold,
"running": an estimate kept by the update, e.g. BatchTopK's).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

THRESHOLD_KINDS = (None, "trained", "running")


class TrainForward(NamedTuple):
    """What an architecture's training forward returns for a batch x [B, d_in]."""
    recon: jax.Array        # [B, d_in]
    fired: jax.Array        # bool [d_sae]: latents active on some token
    l0: jax.Array           # mean active latents per token
    sparsity: jax.Array     # the sparsity term before its coefficient (0 when there is none)
    penalty: jax.Array      # everything added to the reconstruction loss except the dead-latent loss
    extra: dict             # architecture-specific values the update needs (e.g. "min_kept")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One SAE architecture.

    train_forward(params, cfg, hp, x, step, chunks, impl) -> TrainForward
        hp: per-SAE traced hyper-parameters (sae.model.hyperparams); chunks / impl: kernel options of the
        sparse TopK path (ignored elsewhere).
    dead_latent_loss(params, cfg, hp, x, recon, since_fired) -> scalar, or None (AuxK for the TopK family).
    after_update(new, old, hp, extra) -> new params (threshold clamps and running estimates), or None.
    saelens_fields(cfg) -> extra cfg.json fields of the SAELens export (e.g. k).
    """
    name: str
    summary: str
    train_forward: Callable[..., TrainForward]
    edit_activation: str                 # the psm_jax.edits activation inference uses
    saelens_name: str                    # SAELens v6 cfg.json "architecture"
    uses_k: bool = False                 # cfg.k must be in (0, d_sae]
    threshold: str | None = None         # None | "trained" | "running"
    dead_latent_loss: Callable[..., jax.Array] | None = None
    after_update: Callable[..., dict] | None = None
    saelens_fields: Callable[[Any], dict] = lambda cfg: {}
    saelens_import: bool = True          # loading a SAELens folder of saelens_name gives this architecture

    def __post_init__(self):
        if self.threshold not in THRESHOLD_KINDS:
            raise ValueError(f"Architecture {self.name!r}: threshold={self.threshold!r}; expected one of "
                             f"{THRESHOLD_KINDS}")


# ---------------------------------------------------------------------------------------------------
# shared training pieces
# ---------------------------------------------------------------------------------------------------

def top_k(x, k):
    """lax.top_k behind an optimization barrier: without it XLA folds later column slices of the result into the
    sort and no longer recognises the top-k pattern, which turns it into a full sort of every row (30x slower)."""
    vals, idx = lax.top_k(x, k)
    return lax.optimization_barrier(vals), lax.optimization_barrier(idx)


def scatter_last(base, idx, vals):
    """base[..., idx[..., j]] = vals[..., j] along the last axis."""
    return jnp.put_along_axis(base, idx, vals, axis=-1, inplace=False)


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


def train_pre(params, cfg, x):
    """Training pre-activations [B, d_sae] (the b_dec input gradient as a vector-matrix product)."""
    if cfg.apply_b_dec_to_input:
        return _encoder(x, params["b_dec"], params["W_enc"], params["b_enc"])
    return x @ params["W_enc"] + params["b_enc"]


def sparsity_warmup(hp, step) -> jax.Array:
    """Linear warm-up factor of the sparsity coefficient (1 once `sparsity_warmup_steps` have passed)."""
    sw = hp["sparsity_warmup_steps"]
    return jnp.where(sw > 0, jnp.minimum((jnp.asarray(step, jnp.float32) + 1) / jnp.maximum(sw, 1.0), 1.0), 1.0)


def zero() -> jax.Array:
    return jnp.zeros((), jnp.float32)
