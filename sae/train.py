"""Training: one jitted step for a stack of SAEs on one activation stream (or one stream per SAE), checkpoints,
exact resume.

    from sae.config import SaeConfig, sweep
    from sae.train import train, ArraySource
    cfgs = sweep(SaeConfig(d_in=576, d_sae=4608, k=32, total_steps=2000), k=[16, 32, 64])
    result = train(cfgs, ArraySource("acts.npy", batch_size=4096), "runs/l15", checkpoint_every=500)

State (a pytree; every SAE array has a leading stack axis n):
    params       dict W_enc [n, d_in, d_sae], b_enc, W_dec, b_dec[, threshold]
    opt          optax Adam state (scale_by_adam: count, mu, nu), same layout
    since_fired  [n, d_sae] int32 tokens since each latent last fired (capped at 2^30)
    step         int32 completed steps
    key          [n, 2] uint32 PRNG key data (from each SAE's seed; kept for stochastic extensions)
    act_scale    f32 input scale (normalize_activations; 1.0 for "none"), folded into weights on export
    bad_step     int32, -1 until a step produced a non-finite loss or gradient

The step (one XLA program, state donated), over the stack axis (`stack="map"`: lax.map, the default, keeps the
sparse TopK kernels unbatched; `"vmap"` vectorises; one SAE skips both): phase 1 per SAE: loss + gradient (AuxK
under `lax.cond`, only when that SAE has a dead latent), decoder-parallel gradient component removed, gradient
norm; phase 2 under one `lax.cond` on "every loss and gradient finite": optional global-norm clipping, Adam,
lr = base * warm-up * decay, decoder rows renormalised, JumpReLU thresholds kept >= 0, BatchTopK threshold EMA,
dead counters. A non-finite step (and every later one) changes nothing and is recorded; the host raises
NanLossError naming the step, the batch and the SAE, and no checkpoint is written after it. Values that travel
traced (sweepable fields, schedule lengths, dead threshold) do not trigger recompiles.

Data sources: any iterator of float arrays [batch, d_in], or [n_saes, batch, d_in] for one stream per SAE (e.g.
`StoreStackSource`: one SAE per layer). For exact resume it should expose a JSON-able `cursor`
(attribute, property or method) and `seek(cursor)` (or `state_dict()` / `load_state_dict(d)`); otherwise resume
replays the iterator and skips the consumed batches (only right for deterministic iterators).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from psm_jax.sharding import host_array
from sae import checkpoint as ckpt_mod
from sae.config import SWEEPABLE, SaeConfig, check_stackable
from sae.archs import registry
from sae.model import (Params, SaeShapeError, after_update, fold_activation_scale, hyperparams, init_params,
                       normalize_decoder, project_decoder_grad, training_loss)

log = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
SINCE_CAP = 2 ** 30
TRACED_SCHEDULE_FIELDS = ("warmup_steps", "total_steps", "decay_start", "sparsity_warmup_steps",
                          "dead_tokens_threshold", "threshold_ema_rate")


class NanLossError(FloatingPointError):
    """Training produced a non-finite loss/gradient; the message names the step, batch and SAE."""


# ---------------------------------------------------------------------------------------------------
# optimiser and schedule
# ---------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------
# stacked state
# ---------------------------------------------------------------------------------------------------

def static_config(cfgs: Sequence[SaeConfig]) -> SaeConfig:
    """The config the traced step sees: shared fields, k = the largest k, and every value that travels traced in
    `hyperparams` (sweepable and schedule fields) canonical, so changing them reuses the compiled step."""
    check_stackable(cfgs)
    base = SaeConfig()
    canon = {f: getattr(base, f) for f in SWEEPABLE + TRACED_SCHEDULE_FIELDS}
    canon["k"] = max(c.k for c in cfgs)
    return cfgs[0].replace(**canon)


def stacked_hyperparams(cfgs: Sequence[SaeConfig]) -> dict[str, jax.Array]:
    hps = [hyperparams(c) for c in cfgs]
    return {k: jnp.stack([h[k] for h in hps]) for k in hps[0]}


def activation_scale(cfg: SaeConfig, sample) -> float:
    if cfg.normalize_activations == "none":
        return 1.0
    norms = np.linalg.norm(np.asarray(sample, np.float64).reshape(-1, cfg.d_in), axis=-1)
    return float(math.sqrt(cfg.d_in) / max(norms.mean(), 1e-12))


def init_state(cfgs: Sequence[SaeConfig], sample: jax.Array, act_scale: float | jax.Array = 1.0) -> dict:
    """Fresh stacked state; b_dec from `sample` (scaled by act_scale). Traceable (for jax.eval_shape)."""
    seeds = jnp.asarray([c.seed for c in cfgs], jnp.uint32)
    thr = jnp.asarray([c.jumprelu_init_threshold for c in cfgs], jnp.float32)
    return _init_state(static_config(cfgs), sample, act_scale, seeds, thr)


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


def unstack_params(params: Params, n: int) -> list[dict[str, np.ndarray]]:
    host = {k: host_array(v) for k, v in params.items()}
    return [{k: np.asarray(v[i]) for k, v in host.items()} for i in range(n)]


# ---------------------------------------------------------------------------------------------------
# sharding
# ---------------------------------------------------------------------------------------------------

def make_mesh(data: int = 1, latent: int = 1, devices=None) -> jax.sharding.Mesh:
    """A ("data", "latent") mesh with Auto axes over the first data*latent devices."""
    devices = jax.devices() if devices is None else devices
    if data * latent > len(devices):
        raise ValueError(f"mesh {data}x{latent} needs {data * latent} devices, have {len(devices)}")
    arr = np.asarray(devices[: data * latent]).reshape(data, latent)
    auto = jax.sharding.AxisType.Auto
    return jax.sharding.Mesh(arr, ("data", "latent"), axis_types=(auto, auto))


_LATENT_LAST = {"W_enc"}
_LATENT_FIRST = {"W_dec", "b_enc", "threshold", "since_fired"}


def state_shardings(state: Any, mesh: jax.sharding.Mesh) -> Any:
    """NamedShardings for a stacked state: latent-parallel over d_sae, everything else replicated."""

    def spec(path, leaf):
        names = [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]
        nd = len(np.shape(leaf))
        if any(n in _LATENT_LAST for n in names) and nd == 3:
            return NamedSharding(mesh, P(None, None, "latent"))
        if any(n in _LATENT_FIRST for n in names) and nd >= 2:
            return NamedSharding(mesh, P(None, "latent", *([None] * (nd - 2))))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(spec, state)


def _check_mesh(scfg: SaeConfig, mesh) -> None:
    if mesh is None:
        return
    nd, nl = mesh.shape["data"], mesh.shape["latent"]
    if scfg.batch_size % nd:
        raise ValueError(f"batch_size={scfg.batch_size} is not divisible by the mesh's data axis ({nd})")
    if scfg.d_sae % nl:
        raise ValueError(f"d_sae={scfg.d_sae} is not divisible by the mesh's latent axis ({nl})")
    if spans_processes(mesh):
        _check_process_blocks(mesh)


def spans_processes(mesh) -> bool:
    """True when `mesh` holds devices of other processes (a multi-process data-parallel run)."""
    return mesh is not None and any(d.process_index != jax.process_index() for d in mesh.devices.flat)


def _check_process_blocks(mesh) -> None:
    """In a multi-process run each process feeds its own rows of every global batch: process p's devices must be
    exactly the p-th block of mesh.shape["data"] / process_count rows of the data axis (what `make_mesh` builds
    from jax.devices(), which lists the processes' devices in process order)."""
    nproc, nd = jax.process_count(), mesh.shape["data"]
    if nd % nproc:
        raise ValueError(f"the mesh's data axis ({nd}) is not divisible by the process count ({nproc}); each "
                         "process feeds an equal share of every batch")
    block = nd // nproc
    for row, devs in enumerate(np.asarray(mesh.devices).reshape(nd, -1)):
        owners = {d.process_index for d in devs}
        if owners != {row // block}:
            raise ValueError(f"data row {row} of the mesh holds devices of processes {sorted(owners)}, expected only "
                             f"process {row // block}: build the mesh with sae.train.make_mesh over jax.devices()")


def _gather_rows(x: np.ndarray) -> np.ndarray:
    """Every process's rows of one batch ([..., rows, d]), concatenated in process order: the global batch."""
    from jax.experimental import multihost_utils

    return np.concatenate(list(np.asarray(multihost_utils.process_allgather(x, tiled=False))), axis=-2)


def _gather_json(obj: Any) -> list:
    """A JSON-able value of every process, as a list indexed by process (e.g. each process's data cursor)."""
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int32), tiled=False)).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:raw.size] = raw
    parts = np.asarray(multihost_utils.process_allgather(buf, tiled=False))
    return [json.loads(bytes(parts[i, :int(sizes[i])]).decode()) for i in range(len(sizes))]


def _put_global(tree: Any, shardings: Any) -> Any:
    """Place host values that every process holds in full onto shardings that span processes."""
    from psm_jax.sharding import put_global

    return jax.tree_util.tree_map(put_global, tree, shardings)


def _barrier(name: str) -> None:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------
# data sources
# ---------------------------------------------------------------------------------------------------

class ArraySource:
    """Batches of rows from an in-memory array or a .npy file (memory-mapped), shuffled per epoch with a seeded
    permutation. cursor = {"epoch", "pos"}; `seek(cursor)` restores it exactly. `loop=False` stops after one epoch
    (an incomplete last batch is dropped)."""

    def __init__(self, data: np.ndarray | str | os.PathLike, batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, loop: bool = True):
        if isinstance(data, (str, os.PathLike)):
            path = Path(data)
            if not path.exists():
                raise FileNotFoundError(f"activation file {path} does not exist")
            data = np.load(path, mmap_mode="r")
        if np.ndim(data) != 2:
            raise SaeShapeError(f"activation array must be [n_tokens, d_in], got shape {np.shape(data)}")
        if len(data) < batch_size:
            raise ValueError(f"activation array has {len(data)} rows, fewer than one batch of {batch_size}")
        self.data, self.batch_size, self.shuffle, self.seed, self.loop = data, batch_size, shuffle, seed, loop
        self.epoch, self.pos = 0, 0
        self._perm_epoch, self._perm = -1, None

    @property
    def d_in(self) -> int:
        return int(self.data.shape[1])

    @property
    def cursor(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def seek(self, cursor: Mapping[str, int]) -> None:
        self.epoch, self.pos = int(cursor["epoch"]), int(cursor["pos"])

    def _order(self):
        if not self.shuffle:
            return None
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.data))
            self._perm_epoch = self.epoch
        return self._perm

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self.pos + self.batch_size > len(self.data):
            if not self.loop:
                raise StopIteration
            self.epoch, self.pos = self.epoch + 1, 0
        order = self._order()
        sl = slice(self.pos, self.pos + self.batch_size)
        rows = self.data[sl] if order is None else self.data[np.sort(order[sl])]
        self.pos += self.batch_size
        return np.asarray(rows, np.float32)


class StoreStackSource:
    """[n_keys, batch_size, d] batches of several (site, layer) keys of one `sae.data.store.ActivationStore`, rows
    aligned (the same tokens for every key): one SAE per layer (or site) trained in one run, each on its own
    stream. JSON `cursor` and exact `seek`, like `sae.data.sources.StoreSource`."""

    def __init__(self, store, keys: Sequence[tuple[str, int]], batch_size: int, *, seed: int = 0,
                 epochs: int | None = None, roles: Sequence[int | str] | None = None, window_chunks: int = 4):
        from sae.data.store import ActivationStore

        self.store = store if isinstance(store, ActivationStore) else ActivationStore(store)
        self.keys = [(str(s), int(l)) for s, l in keys]
        widths = {k: self.store.d(*k) for k in self.keys}
        if len(set(widths.values())) != 1:
            raise SaeShapeError(f"stacked keys must share one width, got {widths}")
        self.d_in = next(iter(widths.values()))
        self.batch_size, self.seed = int(batch_size), int(seed)
        self._kw = dict(epochs=epochs, roles=roles, window_chunks=window_chunks, with_meta=False)
        self._cursor = self.store.start_cursor(self.keys, batch_size, seed, window_chunks=window_chunks, roles=roles)
        self._it = None

    @property
    def cursor(self) -> dict:
        return dict(self._cursor)

    def seek(self, cursor: Mapping[str, Any]) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None
        self._cursor = dict(cursor)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self._it is None:
            self._it = self.store.iter_batches(self.keys, self.batch_size, self.seed, start_cursor=self._cursor,
                                               **self._kw)
        batch, self._cursor = next(self._it)
        return np.stack([np.asarray(batch.acts[k], np.float32) for k in self.keys])


def get_cursor(source: Any) -> Any:
    c = getattr(source, "cursor", None)
    if c is not None:
        return c() if callable(c) else c
    if hasattr(source, "state_dict"):
        return source.state_dict()
    return None


def set_cursor(source: Any, cursor: Any) -> bool:
    if hasattr(source, "seek"):
        source.seek(cursor)
        return True
    if hasattr(source, "load_state_dict"):
        source.load_state_dict(cursor)
        return True
    return False


# ---------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainResult:
    params: list[dict[str, np.ndarray]]   # per SAE, activation scale folded in (runs on raw activations)
    cfgs: list[SaeConfig]
    step: int
    tokens: int
    stopped: str                          # "total_steps" | "max_steps" | "data_exhausted"
    run_dir: Path
    last_metrics: list[dict[str, float]]
    state: Any = None


def _truncate_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if rec.get("step", 0) <= step:
            keep.append(line)
    ckpt_mod.atomic_write_text(path, "".join(l + "\n" for l in keep))


def _to_batch(x, scfg: SaeConfig, n: int, rows: int | None = None) -> np.ndarray | None:
    """[rows, d_in] (one stream for every SAE) or [n, rows, d_in] (one stream per SAE); None for a short batch.
    rows: batch_size, or this process's share of it in a multi-process run."""
    rows = scfg.batch_size if rows is None else rows
    x = np.asarray(x, np.float32)
    ok = (x.ndim == 2 or (x.ndim == 3 and x.shape[0] == n)) and x.shape[-1] == scfg.d_in
    if not ok:
        raise SaeShapeError(f"activation batch has shape {x.shape}; the SAE expects [{rows} rows, "
                            f"d_in={scfg.d_in}] (or [n_saes={n}, {rows} rows, d_in]); does d_in match the "
                            "harvested site?")
    if x.shape[-2] != rows:
        return None
    return x


def train(cfg: SaeConfig | Sequence[SaeConfig], batches: Iterable[np.ndarray], run_dir: str | os.PathLike, *,
          max_steps: int | None = None, checkpoint_every: int = 1000, keep_checkpoints: int = 2, log_every: int = 1,
          mesh: jax.sharding.Mesh | None = None, progress: bool = False, resume_step: int | None = None,
          extra_config: Mapping[str, Any] | None = None, stack: str = "map",
          on_step: Callable[[int, list[dict]], None] | None = None,
          sae_names: Sequence[str] | None = None) -> TrainResult:
    """Train one SAE or a stack of SAEs (same structure, different sweepable fields) on `batches`.

    Stops at cfg.total_steps, at `max_steps` (total completed steps, counting resumed ones) or when the data ends,
    and always writes a final checkpoint. Pointed at a run dir with checkpoints of the same config it resumes
    exactly (params, optimiser, dead counters, PRNG, data cursor); another config raises RunConfigMismatchError.

    Several processes (`psm_jax.sharding.init_distributed`, a `mesh` over every process's devices): each process
    calls `train` with its own source yielding its rows of every batch (batch_size / process_count of them, e.g.
    from its share of the documents: `sae.data.harvest.process_share`); the global batch is the processes' rows in
    process order, sharded on the data axis without leaving their host. Checkpoints are written by all processes
    together into one run dir (shared file system) with every process's data cursor; the log is process 0's.

    sae_names (one folder name per SAE, e.g. "resid_post.3" per hook point): each SAE's checkpoints go to its own
    run dir run_dir/<name> (config.json + checkpoints/<step>), loadable alone with `load_run(run_dir/<name>)`;
    the stacked run resumes exactly from them. Default: one stacked folder, run_dir/checkpoints."""
    run, resumed = _open_run(cfg, batches, run_dir, mesh, sae_names, extra_config, keep_checkpoints)
    hp = _run_hyperparams(run)
    state, shardings, it, first, consumed = _initial_state(run, resume_step, resumed)
    step_fn = build_step(run.scfg, run.n, stack=stack, mesh=mesh, shardings=shardings)
    host_step = int(host_array(state["step"]))
    prog = _open_progress(run, host_step, max_steps, log_every, progress, on_step)
    stopped = "data_exhausted"
    pending = None                             # (step, metrics) of the last step, read once the next one is queued
    try:
        while prog.target is None or host_step < prog.target:
            if first is not None:
                x, first = first, None
            else:
                x = _next_batch(run, it)
                if x is None:
                    break
                consumed += 1
            prog.cursors[host_step + 1] = get_cursor(run.source)
            state, m = step_fn(state, hp, _to_device(run, x))
            host_step += 1
            if pending is not None:
                _record_step(run, prog, *pending)
            pending = (host_step, m)
            if checkpoint_every and host_step % checkpoint_every == 0:
                _record_step(run, prog, *pending)
                pending = None
                _save_checkpoint(run, prog, state, host_step, consumed)
            prog.cursors.pop(host_step - 2, None)
        else:
            total_steps = run.cfgs[0].total_steps
            stopped = "total_steps" if total_steps is not None and host_step >= total_steps else "max_steps"
        if pending is not None:
            _record_step(run, prog, *pending)
        if run.checkpointer.latest_step() != host_step:
            _save_checkpoint(run, prog, state, host_step, consumed)
    finally:
        if prog.bar is not None:
            prog.bar.close()
        run.checkpointer.close()
    return _result(run, state, host_step, stopped, prog.last_metrics)


@dataclasses.dataclass
class _Run:
    """What every step of one `train` call shares: the stacked configs, this process's place in the run, the data
    source, and the run dir with its checkpointer."""
    cfgs: list[SaeConfig]
    scfg: SaeConfig
    n: int
    source: Any
    run_dir: Path
    mesh: jax.sharding.Mesh | None
    multi: bool
    pid: int
    nproc: int
    local_rows: int                            # this process's rows of every batch
    names: list[str] | None
    checkpointer: Any
    log_path: Path
    writes_log: bool
    data_sharding: dict[int, NamedSharding] | None   # per batch rank: [rows, d_in] or [n, rows, d_in]


def _open_run(cfg, batches, run_dir, mesh, sae_names, extra_config, keep_checkpoints) -> tuple[_Run, bool]:
    """Checks the configs against the mesh and the run dir before any work is done; returns the run and whether the
    run dir already held it (written by `_write_run_config`)."""
    cfgs = [cfg] if isinstance(cfg, SaeConfig) else list(cfg)
    scfg = static_config(cfgs)
    _check_mesh(scfg, mesh)
    n = len(cfgs)
    multi = spans_processes(mesh)
    pid, nproc = (jax.process_index(), jax.process_count()) if multi else (0, 1)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    names = _check_sae_names(sae_names, n)
    resumed = _write_run_config(run_dir, cfgs, names, extra_config, pid, multi)
    checkpointer = (ckpt_mod.PerSaeCheckpointer(run_dir, names, keep=keep_checkpoints) if names else
                    ckpt_mod.Checkpointer(run_dir, keep=keep_checkpoints))
    data_sharding = None if mesh is None else {2: NamedSharding(mesh, P("data", None)),
                                                 3: NamedSharding(mesh, P(None, "data", None))}
    run = _Run(cfgs=cfgs, scfg=scfg, n=n, source=batches, run_dir=run_dir, mesh=mesh, multi=multi, pid=pid,
               nproc=nproc, local_rows=scfg.batch_size // nproc, names=names, checkpointer=checkpointer,
               log_path=run_dir / LOG_FILE, writes_log=pid == 0, data_sharding=data_sharding)
    return run, resumed


def _write_run_config(run_dir: Path, cfgs, names, extra_config, pid: int, multi: bool) -> bool:
    """Writes config.json (and each SAE's folder) or checks it against this run's, so one run dir never holds two
    configs; True when it was already there. Process 0 writes first, the others then check."""
    run_config = ckpt_mod.run_config_dict([c.to_dict() for c in cfgs], extra_config)
    if names:
        run_config[ckpt_mod.SAE_DIRS_KEY] = names
    ckpt_mod.check_layout(run_dir, names)

    def write_configs():
        was_there = ckpt_mod.ensure_run_config(run_dir, run_config)
        if names:
            ckpt_mod.ensure_sae_dirs(run_dir, names, run_config["saes"])
        return was_there

    if pid == 0:
        resumed = write_configs()
    if multi:
        _barrier("sae-run-config")
        if pid != 0:
            resumed = write_configs()
    return resumed


def _run_hyperparams(run: _Run) -> dict[str, jax.Array]:
    """The traced hyperparameters of the stack, replicated on every process's devices when the mesh spans them."""
    hp = stacked_hyperparams(run.cfgs)
    if run.multi:
        hp = _put_global(hp, jax.tree_util.tree_map(lambda _: NamedSharding(run.mesh, P()), hp))
    return hp


def _place(run: _Run, state):
    """(state laid out on the mesh, its shardings), which the step is compiled for; (state, None) without a mesh."""
    if run.mesh is None:
        return state, None
    sh = state_shardings(state, run.mesh)
    return (_put_global(state, sh) if run.multi else jax.device_put(state, sh)), sh


def _initial_state(run: _Run, resume_step: int | None, resumed: bool):
    """(state, shardings, batch iterator, first batch or None, batches consumed): a run dir with a checkpoint
    resumes from it, any other starts fresh."""
    latest = run.checkpointer.latest_step() if resumed else None
    if resume_step is not None and latest is None:
        raise ckpt_mod.CheckpointError(f"resume_step={resume_step} asked for, but {run.run_dir} has no checkpoint")
    return _resume(run, resume_step) if latest is not None else _start(run)


def _resume(run: _Run, resume_step: int | None):
    """Restores a checkpoint and moves the data source past the batches it had consumed, so the run goes on exactly
    as one that never stopped; the log loses the steps after the checkpoint."""
    scfg = run.scfg
    template = _zero_state(run.cfgs, scfg.batch_size)
    if run.names:                              # restored on the host from each SAE's folder, then placed
        state, meta = run.checkpointer.restore(template, step=resume_step)
        state, shardings = _place(run, jax.tree_util.tree_map(jnp.asarray, state) if run.mesh is None else state)
    else:
        template, shardings = _place(run, template)
        state, meta = run.checkpointer.restore(template, step=resume_step)
    consumed = int(meta.get("batches_consumed", meta["step"]))
    cursor = _own_cursor(meta, run.pid, run.nproc, run.checkpointer.directory)
    seeked = cursor is not None and set_cursor(run.source, cursor)
    it = iter(run.source)
    if not seeked:
        if consumed:
            log.warning("data source has no cursor/seek: skipping %d batches to resume", consumed)
        for _ in range(consumed):
            next(it)
    if run.writes_log:
        _truncate_log(run.log_path, int(meta["step"]))
    log.info("resumed %s at step %d", run.run_dir, int(meta["step"]))
    return state, shardings, it, None, consumed


def _start(run: _Run):
    """A fresh state initialised from the first batch (b_dec and the activation scale come from it); that batch is
    returned too, as the first step's."""
    it = iter(run.source)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("the activation source yielded no batch") from None
    first = _to_batch(first, run.scfg, run.n, run.local_rows)
    if first is None:
        raise ValueError(f"the first activation batch does not hold {run.local_rows} rows (batch_size="
                         f"{run.scfg.batch_size} over {run.nproc} process(es))")
    whole = _gather_rows(first) if run.multi else first   # b_dec and the scale come from the global batch
    scale = activation_scale(run.scfg, whole)
    state = _init_fn(run.scfg)(whole, jnp.float32(scale),
                               jnp.asarray([c.seed for c in run.cfgs], jnp.uint32),
                               jnp.asarray([c.jumprelu_init_threshold for c in run.cfgs], jnp.float32))
    state, shardings = _place(run, state)
    if run.writes_log:
        _truncate_log(run.log_path, 0)
    return state, shardings, it, first, 1


@dataclasses.dataclass
class _Progress:
    """The loop's host-side bookkeeping between steps: where to stop, the data cursor after each recent step (for
    checkpoints and error messages), the last metrics, the throughput clock and the progress bar."""
    target: int | None                         # total_steps or max_steps, whichever comes first
    log_every: int
    on_step: Callable[[int, list[dict]], None] | None
    bar: Any
    t_last: float
    tok_last: int
    last_metrics: list[dict] = dataclasses.field(default_factory=list)
    cursors: dict[int, Any] = dataclasses.field(default_factory=dict)


def _open_progress(run: _Run, host_step: int, max_steps, log_every, progress, on_step) -> _Progress:
    """Fixes where the loop stops and starts its clock (and bar) at the step it starts from."""
    total_steps = run.cfgs[0].total_steps
    targets = [s for s in (total_steps, max_steps) if s is not None]
    target = min(targets) if targets else None
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=None if target is None else target * run.scfg.batch_size,
                   initial=host_step * run.scfg.batch_size, unit="tok", unit_scale=True, dynamic_ncols=True)
    return _Progress(target=target, log_every=log_every, on_step=on_step, bar=bar, t_last=time.perf_counter(),
                     tok_last=host_step * run.scfg.batch_size)


def _next_batch(run: _Run, it) -> np.ndarray | None:
    """The next full batch of the source, or None where the data ends (a short last batch ends it too)."""
    try:
        raw = next(it)
    except StopIteration:
        return None
    x = _to_batch(raw, run.scfg, run.n, run.local_rows)
    if x is None:
        log.warning("stopping: a batch of %d rows (expected %d)", np.shape(raw)[-2], run.local_rows)
    return x


def _to_device(run: _Run, x):
    """A host batch sharded on the mesh's data axis; in a multi-process run x is this process's rows of it."""
    if run.data_sharding is None:
        return x
    if run.multi:
        global_shape = x.shape[:-2] + (run.scfg.batch_size, x.shape[-1])
        return jax.make_array_from_process_local_data(run.data_sharding[x.ndim], x, global_shape)
    return jax.device_put(x, run.data_sharding[x.ndim])


def _record_step(run: _Run, prog: _Progress, rec_step: int, m) -> None:
    """Reads one step's metrics on the host (a step late, so the device is not waited on): stops the run at a
    non-finite step, then logs, moves the bar and calls on_step."""
    m = jax.tree_util.tree_map(host_array, m)
    if not bool(np.all(m["ok"])):
        bad = [i for i in range(run.n) if not bool(m["ok"][i])]
        c = prog.cursors.get(rec_step)
        last = run.checkpointer.latest_step()
        raise NanLossError(
            f"non-finite loss or gradient at step {rec_step - 1} (batch index {rec_step - 1} of this run's "
            f"stream, data cursor after it {c!r}) in SAE(s) {bad}; training stopped without applying it. "
            f"Last good checkpoint: step {last} in {run.checkpointer.directory}")
    now = time.perf_counter()
    tokens = rec_step * run.scfg.batch_size
    tps = (tokens - prog.tok_last) / max(now - prog.t_last, 1e-9)
    prog.last_metrics = [{k: float(v[i]) for k, v in m.items() if k != "ok"} for i in range(run.n)]
    if run.writes_log and prog.log_every and (rec_step % prog.log_every == 0 or rec_step == prog.target):
        prog.t_last, prog.tok_last = now, tokens
        with open(run.log_path, "a") as f:
            for i, lm in enumerate(prog.last_metrics):
                f.write(json.dumps({"step": rec_step, "sae": i, "tokens": tokens, **lm,
                                    "tokens_per_s": tps, "time": time.time()}) + "\n")
    if prog.bar is not None:
        prog.bar.n = tokens
        lm = prog.last_metrics[0]
        prog.bar.set_postfix(step=rec_step, tok_s=f"{tps:.3g}", loss=f"{lm['loss']:.4g}",
                             L0=f"{lm['l0']:.1f}", dead=f"{lm['dead_fraction']:.3f}", refresh=False)
        prog.bar.refresh()
    if prog.on_step is not None:
        prog.on_step(rec_step, prog.last_metrics)


def _save_checkpoint(run: _Run, prog: _Progress, state, at_step: int, consumed: int) -> None:
    """Checkpoints the state with the data cursor after step at_step (every process's), which exact resume needs."""
    cursor = prog.cursors[at_step] if at_step in prog.cursors else get_cursor(run.source)
    place_cursor = ({"process_cursors": _gather_json(cursor), "processes": run.nproc} if run.multi else
                    {"cursor": cursor})
    meta = {**place_cursor,
            "batches_consumed": consumed, "tokens": at_step * run.scfg.batch_size,
            "configs": [c.to_dict() for c in run.cfgs], "time": time.time()}
    run.checkpointer.save(at_step, state, meta)


def _result(run: _Run, state, host_step: int, stopped: str, last_metrics: list[dict]) -> TrainResult:
    """The run's outcome, each SAE's params with the activation scale folded in so they run on raw activations."""
    return TrainResult(params=_folded_params(state, run.cfgs), cfgs=run.cfgs, step=host_step,
                       tokens=host_step * run.scfg.batch_size, stopped=stopped, run_dir=run.run_dir,
                       last_metrics=last_metrics, state=state)


def _check_sae_names(names, n: int) -> list[str] | None:
    if names is None:
        return None
    names = list(names)
    if len(names) != n or len(set(names)) != n:
        raise ValueError(f"sae_names={names!r}; expected {n} distinct folder names, one per SAE")
    for name in names:
        if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or name in (
                ckpt_mod.CHECKPOINT_DIR, "saes"):
            raise ValueError(f"sae_names entry {name!r}; expected a plain folder name (not {ckpt_mod.CHECKPOINT_DIR!r}"
                             " or 'saes')")
    return names


def _own_cursor(meta: Mapping[str, Any], pid: int, nproc: int, where) -> Any:
    """This process's data cursor from a checkpoint's meta; a checkpoint of another process count is an error."""
    saved = int(meta.get("processes", 1))
    if saved != nproc:
        raise ckpt_mod.CheckpointError(
            f"checkpoint step {meta.get('step')} in {where} was written by {saved} process(es), each with its own "
            f"data cursor; this run has {nproc}. Resume with {saved} process(es), or start a new run dir.")
    return meta["process_cursors"][pid] if nproc > 1 else meta.get("cursor")


def load_run(run_dir: str | os.PathLike, step: int | None = None) -> tuple[list[dict[str, np.ndarray]],
                                                                          list[SaeConfig], dict]:
    """(params per SAE with the activation scale folded in, configs, checkpoint meta) of a run dir's checkpoint.

    A run with one folder per SAE (`train(..., sae_names=...)`) loads whole from its run dir (the latest step every
    folder committed), or one SAE alone from its folder run_dir/<name>."""
    run_dir = Path(run_dir)
    path = run_dir / ckpt_mod.CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not an SAE run dir (no {ckpt_mod.CONFIG_FILE})")
    conf = json.loads(path.read_text())
    cfgs = [SaeConfig.from_dict(d) for d in conf["saes"]]
    template = _zero_state(cfgs, 8)
    names = conf.get(ckpt_mod.SAE_DIRS_KEY)
    checkpointer = ckpt_mod.PerSaeCheckpointer(run_dir, names) if names else ckpt_mod.Checkpointer(run_dir)
    try:
        state, meta = checkpointer.restore(template, step=step)
    finally:
        checkpointer.close()
    return _folded_params(state, cfgs), cfgs, meta


def _zero_state(cfgs: Sequence[SaeConfig], rows: int):
    """A zero-filled state of the stack's shapes: the template a checkpoint is restored into."""
    d_in = static_config(cfgs).d_in
    template = jax.eval_shape(lambda s: init_state(cfgs, s), jax.ShapeDtypeStruct((rows, d_in), jnp.float32))
    return jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), template)


def _folded_params(state, cfgs: Sequence[SaeConfig]) -> list[dict[str, np.ndarray]]:
    """Each SAE's params as host arrays, with the activation scale folded in so they run on raw activations."""
    scale = float(host_array(state["act_scale"]))
    params = unstack_params(state["params"], len(cfgs))
    return [{k: np.asarray(v) for k, v in fold_activation_scale(p, c, scale).items()} for p, c in zip(params, cfgs)]
