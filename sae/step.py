"""The jitted training step of a stack of SAEs: one XLA program, the state donated.

Over the stack axis (`stack="map"`: lax.map, the default, keeps the sparse TopK kernels unbatched; `"vmap"`
vectorises; one SAE skips both): phase 1 per SAE (`_sae_grads`): loss + gradient (AuxK under `lax.cond`, only when
that SAE has a dead latent), decoder-parallel gradient component removed, gradient norm; phase 2 (`_sae_apply`)
under one `lax.cond` on "every loss and gradient finite": optional global-norm clipping, Adam,
lr = base * warm-up * decay, decoder rows renormalised, JumpReLU thresholds kept >= 0, BatchTopK threshold EMA,
dead counters. A non-finite step (and every later one) changes nothing and is recorded in the state's bad_step.
Values that travel traced (sweepable fields, schedule lengths, dead threshold) do not trigger recompiles.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from sae.archs import registry
from sae.config import SaeConfig
from sae.model import after_update, normalize_decoder, project_decoder_grad, training_loss
from sae.optim import learning_rate, make_optimizer

SINCE_CAP = 2 ** 30
STACK_MODES = ("map", "vmap")


def build_step(scfg: SaeConfig, n: int = 1, *, stack: str = "map", mesh=None, shardings=None) -> Callable:
    """jit(step)(state, hp, x) -> (state, metrics) for a stack of n SAEs; `state` is donated. Cached per
    (config, n, stack, mesh, shardings) so one process compiles each step once."""
    if stack not in STACK_MODES:
        raise ValueError(f"stack={stack!r}; expected one of {STACK_MODES}")
    if shardings is None:
        return _build_step_cached(scfg, n, stack, None, None, None)
    return _build_step_cached(scfg, n, stack, mesh, jax.tree_util.tree_structure(shardings),
                              tuple(jax.tree_util.tree_leaves(shardings)))


@functools.lru_cache(maxsize=16)
def _build_step_cached(scfg: SaeConfig, n, stack, mesh, treedef, shard_leaves):
    shardings = None if treedef is None else jax.tree_util.tree_unflatten(treedef, shard_leaves)
    return _make_step(scfg, n, stack, mesh, shardings)


def _make_step(scfg: SaeConfig, n: int, stack: str, mesh, shardings):
    # under a device mesh the TopK kernels stay XLA ops in one chunk (GSPMD partitions them); the compiled CPU
    # kernels are fp32, so a bf16 step uses the XLA ones; else auto
    kernel_opts = {} if mesh is None else {"chunks": 1, "impl": "xla"}
    if scfg.compute_dtype != "float32":
        kernel_opts = dict(kernel_opts, impl="xla")
    grads_fn = functools.partial(_sae_grads, scfg, kernel_opts)
    apply_fn = functools.partial(_sae_apply, scfg)

    def step_fn(state, hp, x):
        x = x.astype(jnp.float32)
        if scfg.normalize_activations != "none":
            x = x * state["act_scale"]
        params, opt, since, step = state["params"], state["opt"], state["since_fired"], state["step"]
        if x.ndim == 3:                            # [n, B, d_in]: one stream per SAE (e.g. one per layer)
            grads, m, extra = _map_stack(grads_fn, n, stack, (params, since, hp, x), (step,))
        else:
            grads, m, extra = _map_stack(grads_fn, n, stack, (params, since, hp), (x, step))
        ok = jnp.all(m["ok"]) & (state["bad_step"] < 0)

        def apply(_):
            return _map_stack(apply_fn, n, stack, (params, opt, since, hp, grads, extra), (step, x.shape[-2]))

        def keep(_):                               # a non-finite step changes nothing (and neither do later ones)
            return params, opt, since, {"lr": jnp.zeros((n,), jnp.float32),
                                        "dead_fraction": jnp.zeros((n,), jnp.float32)}

        params, opt, since, m2 = lax.cond(ok, apply, keep, None)
        new = dict(state, params=params, opt=opt, since_fired=since, step=step + ok.astype(jnp.int32),
                   bad_step=jnp.where((state["bad_step"] < 0) & ~ok, step, state["bad_step"]))
        return new, {**m, **m2}

    if shardings is None:
        return jax.jit(step_fn, donate_argnums=0)
    rep = NamedSharding(mesh, P())
    return jax.jit(step_fn, donate_argnums=0, out_shardings=(shardings, rep))


def _map_stack(fn, n: int, stack: str, stacked: tuple, shared: tuple):
    """fn(stacked_i, shared) for each SAE i of the leading stack axis of `stacked`: n == 1 squeezes the axis (no
    batching transform at all), "map" loops with lax.map (keeps the sparse TopK kernels unbatched; best on CPU),
    "vmap" vectorises. Outputs get the stack axis back."""
    if n == 1:
        out = fn(jax.tree_util.tree_map(lambda a: a[0], stacked), shared)
        return jax.tree_util.tree_map(lambda a: a[None], out)
    if stack == "vmap":
        return jax.vmap(fn, in_axes=(0, None))(stacked, shared)
    return lax.map(lambda st: fn(st, shared), stacked)


def _in_compute_dtype(scfg: SaeConfig, tree):
    """The step's view of fp32 parameters / inputs: cast to cfg.compute_dtype (a no-op for float32). The cast sits
    inside the differentiated function, so gradients arrive in fp32 for the fp32 master weights."""
    dtype = jnp.dtype(scfg.compute_dtype)
    return tree if dtype == jnp.float32 else jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)


def _as_f32(tree):
    return jax.tree_util.tree_map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                  tree)


def _sae_grads(scfg: SaeConfig, kernel_opts, stacked, shared):
    """Phase 1 for one SAE: loss, gradient (AuxK added only when this SAE has a dead latent; decoder-parallel
    component removed) and the metrics that do not depend on the update. Under a bf16 compute dtype the forward and
    backward run on bf16 casts; the loss (jnp.sum accumulates bf16 in fp32), metrics and gradients come back fp32."""
    params, since, hp, x = stacked if len(stacked) == 4 else (*stacked, shared[0])
    step = shared[-1]
    xc = _in_compute_dtype(scfg, x)

    def lossf(p):
        loss, info = training_loss(_in_compute_dtype(scfg, p), scfg, xc, hp, since, step, with_aux=False,
                                   **kernel_opts)
        return loss.astype(jnp.float32), _as_f32(info)

    (loss, info), grads = jax.value_and_grad(lossf, has_aux=True)(params)
    aux = jnp.zeros((), jnp.float32)
    if scfg.uses_aux:
        recon = _in_compute_dtype(scfg, info["recon"])
        dead_latent_loss = registry.get(scfg.architecture).dead_latent_loss

        def aux_loss(p):
            return dead_latent_loss(_in_compute_dtype(scfg, p), scfg, hp, xc, recon, since).astype(jnp.float32)

        def add_aux(g):
            a, ga = jax.value_and_grad(aux_loss)(params)
            return a, jax.tree_util.tree_map(lambda u, v: u + hp["aux_coef"] * v, g, ga)

        aux, grads = lax.cond(jnp.any(since >= hp["dead_tokens_threshold"]), add_aux, lambda g: (aux, g), grads)
        loss = loss + hp["aux_coef"] * aux
    if scfg.normalize_decoder:
        grads = dict(grads, W_dec=project_decoder_grad(grads["W_dec"], params["W_dec"], unit=True))
    gnorm = optax.tree.norm(grads)
    metrics = {"loss": loss, "mse": info["mse"], "sparsity_loss": info["sparsity"], "aux_loss": aux,
               "l0": info["l0"], "explained_variance": info["explained_variance"], "grad_norm": gnorm,
               "ok": jnp.isfinite(loss) & jnp.isfinite(gnorm)}
    extra = {"fired": info["fired"], "min_kept": info.get("min_kept", jnp.zeros((), jnp.float32)), "gnorm": gnorm}
    return grads, metrics, extra


def _sae_apply(scfg: SaeConfig, stacked, shared):
    """Phase 2 for one SAE: Adam, learning rate, decoder renormalisation, thresholds, dead counters."""
    params, opt, since, hp, grads, extra = stacked
    step, batch = shared
    tx = make_optimizer(scfg)
    if scfg.grad_clip_norm is not None:        # same as optax.clip_by_global_norm, reusing the norm
        c = scfg.grad_clip_norm
        scale = jnp.where(extra["gnorm"] < c, 1.0, c / jnp.maximum(extra["gnorm"], 1e-30))
        grads = jax.tree_util.tree_map(lambda g: g * scale, grads)
    updates, opt = tx.update(grads, opt, params)
    lr = learning_rate(scfg, step, hp)
    new = {k: params[k] - lr * updates[k] for k in params}
    if scfg.normalize_decoder:
        new["W_dec"] = normalize_decoder(new["W_dec"])
    new = after_update(new, params, scfg, hp, extra)
    since = jnp.where(extra["fired"], 0, jnp.minimum(since + batch, SINCE_CAP))
    return new, opt, since, {"lr": lr, "dead_fraction": (since >= hp["dead_tokens_threshold"]).mean()}
