"""The training state of a stack of SAEs: initialisation, the zero template a checkpoint restores into, and the
per-SAE params a finished run hands out.

State (a pytree; every SAE array has a leading stack axis n):
    params       dict W_enc [n, d_in, d_sae], b_enc, W_dec, b_dec[, threshold]
    opt          optax Adam state (scale_by_adam: count, mu, nu), same layout
    since_fired  [n, d_sae] int32 tokens since each latent last fired (capped at 2^30)
    step         int32 completed steps
    key          [n, 2] uint32 PRNG key data (from each SAE's seed; kept for stochastic extensions)
    act_scale    f32 input scale (normalize_activations; 1.0 for "none"), folded into weights on export
    bad_step     int32, -1 until a step produced a non-finite loss or gradient
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psm_jax.sharding import host_array
from sae.config import SaeConfig
from sae.model import Params, fold_activation_scale, init_params
from sae.optim import make_optimizer, static_config


def activation_scale(cfg: SaeConfig, sample) -> float:
    """The input scale of cfg.normalize_activations, from a sample batch (1.0 for "none")."""
    if cfg.normalize_activations == "none":
        return 1.0
    norms = np.linalg.norm(np.asarray(sample, np.float64).reshape(-1, cfg.d_in), axis=-1)
    return float(math.sqrt(cfg.d_in) / max(norms.mean(), 1e-12))


def init_state(cfgs: Sequence[SaeConfig], sample: jax.Array, act_scale: float | jax.Array = 1.0) -> dict:
    """Fresh stacked state; b_dec from `sample` (scaled by act_scale). Traceable (for jax.eval_shape)."""
    return _init_state(static_config(cfgs), sample, act_scale, *_per_sae_init(cfgs))


def compiled_init_state(cfgs: Sequence[SaeConfig], sample, act_scale: float) -> dict:
    """`init_state` as one XLA program, compiled once per static config."""
    return _init_fn(static_config(cfgs))(sample, jnp.float32(act_scale), *_per_sae_init(cfgs))


def _per_sae_init(cfgs: Sequence[SaeConfig]) -> tuple[jax.Array, jax.Array]:
    """(seeds, JumpReLU initial thresholds) of the stack: the init values that may differ per SAE."""
    return (jnp.asarray([c.seed for c in cfgs], jnp.uint32),
            jnp.asarray([c.jumprelu_init_threshold for c in cfgs], jnp.float32))


def _init_state(scfg: SaeConfig, sample, act_scale, seeds, init_thresholds) -> dict:
    tx = make_optimizer(scfg)
    sample = jnp.asarray(sample, jnp.float32) * act_scale
    keys = jax.vmap(jax.random.PRNGKey)(seeds)

    def one(key, thr, smp):
        return init_params(jax.random.split(key)[0], scfg, smp, init_threshold=thr)

    per_sae = sample.ndim == 3               # [n, N, d_in]: each SAE's b_dec from its own stream
    params = jax.vmap(one, in_axes=(0, 0, 0 if per_sae else None))(keys, init_thresholds, sample)
    return {
        "params": params,
        "opt": jax.vmap(tx.init)(params),
        "since_fired": jnp.zeros((len(seeds), scfg.d_sae), jnp.int32),
        "step": jnp.zeros((), jnp.int32),
        "key": keys.astype(jnp.uint32),
        "act_scale": jnp.asarray(act_scale, jnp.float32),
        "bad_step": jnp.full((), -1, jnp.int32),
    }


@functools.lru_cache(maxsize=16)
def _init_fn(scfg: SaeConfig):
    return jax.jit(functools.partial(_init_state, scfg))


def zero_state(cfgs: Sequence[SaeConfig], rows: int):
    """A zero-filled state of the stack's shapes: the template a checkpoint is restored into."""
    d_in = static_config(cfgs).d_in
    template = jax.eval_shape(lambda s: init_state(cfgs, s), jax.ShapeDtypeStruct((rows, d_in), jnp.float32))
    return jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), template)


def unstack_params(params: Params, n: int) -> list[dict[str, np.ndarray]]:
    """The stacked params as n per-SAE dicts of host arrays."""
    host = {k: host_array(v) for k, v in params.items()}
    return [{k: np.asarray(v[i]) for k, v in host.items()} for i in range(n)]


def folded_params(state, cfgs: Sequence[SaeConfig]) -> list[dict[str, np.ndarray]]:
    """Each SAE's params as host arrays, with the activation scale folded in so they run on raw activations."""
    scale = float(host_array(state["act_scale"]))
    params = unstack_params(state["params"], len(cfgs))
    return [{k: np.asarray(v) for k, v in fold_activation_scale(p, c, scale).items()} for p, c in zip(params, cfgs)]
