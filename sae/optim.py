"""The optimiser, the learning-rate schedule and the hyperparameters a stack of SAEs trains with.

A stack shares one compiled step, so every value that may differ between its SAEs (the sweepable fields) or that
a later run may change (the schedule lengths, the dead threshold) travels traced in `stacked_hyperparams`, and
`static_config` gives the step a config where all of them are canonical: changing them reuses the compiled step.
The learning rate is applied by the step (it may differ per SAE), on top of the Adam direction of `make_optimizer`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from sae.config import SWEEPABLE, SaeConfig, check_stackable
from sae.model import hyperparams

TRACED_SCHEDULE_FIELDS = ("warmup_steps", "total_steps", "decay_start", "sparsity_warmup_steps",
                          "dead_tokens_threshold", "threshold_ema_rate")


def make_optimizer(cfg: SaeConfig) -> optax.GradientTransformation:
    """Adam direction (the learning rate, which may differ per stacked SAE, is applied by the step; global-norm
    clipping, when configured, is applied by the step with the gradient norm it already computes)."""
    return optax.scale_by_adam(b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_eps)


def learning_rate(cfg: SaeConfig, step, hp: Mapping[str, jax.Array]):
    """hp["lr"] * linear warm-up over warmup_steps * decay (cfg.decay: linear or cosine to 0 from
    decay_start * total_steps; none when total_steps is None). Schedule values come traced from `hp`."""
    s = jnp.asarray(step, jnp.float32)
    lr = jnp.asarray(hp["lr"], jnp.float32)
    w = hp["warmup_steps"]
    lr = lr * jnp.where(w > 0, jnp.minimum((s + 1.0) / jnp.maximum(w, 1.0), 1.0), 1.0)
    if cfg.decay != "none":
        total = hp["total_steps"]
        start = hp["decay_start"] * total
        frac = jnp.clip((s - start) / jnp.maximum(total - start, 1.0), 0.0, 1.0)
        dec = (1.0 - frac) if cfg.decay == "linear" else 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        lr = lr * jnp.where(total > 0, dec, 1.0)
    return lr


def static_config(cfgs: Sequence[SaeConfig]) -> SaeConfig:
    """The config the traced step sees: shared fields, k = the largest k, and every value that travels traced in
    `hyperparams` (sweepable and schedule fields) canonical, so changing them reuses the compiled step."""
    check_stackable(cfgs)
    base = SaeConfig()
    canon = {f: getattr(base, f) for f in SWEEPABLE + TRACED_SCHEDULE_FIELDS}
    canon["k"] = max(c.k for c in cfgs)
    return cfgs[0].replace(**canon)


def stacked_hyperparams(cfgs: Sequence[SaeConfig]) -> dict[str, jax.Array]:
    """Each SAE's traced hyperparameters (`sae.model.hyperparams`), stacked on a leading axis of len(cfgs)."""
    hps = [hyperparams(c) for c in cfgs]
    return {k: jnp.stack([h[k] for h in hps]) for k in hps[0]}
