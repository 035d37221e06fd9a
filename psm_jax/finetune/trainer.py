"""The fine-tuning loop: LoRA or full fine-tuning of the port's forward, with activation edits active.

One jitted step takes (state, frozen params, batch, extras) and returns the next state. Inside it
the trainable pytree (LoRA adapters, or a subset of the params for full fine-tuning) is put into the
frozen params (`adapters.apply_adapters` / `adapters.overlay`), cast to the compute dtype, and run
through `psm_jax.model.forward` with the caller's edits: preventative steering (an `edits.add`),
concept-ablation fine-tuning (`edits.project_out`), a clamp or an SAE-latent edit act during training
exactly as at inference, and are never part of what is trained or saved. `FinetuneConfig.edit_roles`
restricts the edits to tokens of the given chat roles (the same role masks as at inference), rebuilt
per batch because the role layout changes from batch to batch.

Loss = next-token NLL on assistant tokens (through the fused vocabulary head of `losses.next_token_nll_from_hidden`
whenever the unembedding is not trained) + kl_weight * KL(policy || frozen original) on a
reference batch + steer_weight * squared projection shift along a direction. Each term is summed
per micro-batch and divided by its count over the whole batch (known before the step), so
`grad_accum` micro-batches (a `lax.scan`) and data parallelism over a mesh reproduce the gradient
of one batch. The trainable weights stay float32 (master weights); `compute_dtype="bfloat16"`
casts the merged params for the forward only.

`finetune` drives the steps: batches from a `ChatDataset` cursor, orbax checkpoints of the whole
state (exact resume: the same batches, optimizer moments and step counts as an uninterrupted run),
and a `kill_point("finetune_step")` after each step for the crash tests.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from psm_jax.atomic import kill_point
from psm_jax.chat import Role
from psm_jax.config import ModelConfig
from psm_jax.edits import EDITABLE_SITES
from psm_jax.finetune import adapters as lora_lib
from psm_jax.finetune.checkpoint import Checkpointer, ensure_run_config
from psm_jax.finetune.data import ChatDataset, Cursor, next_batch
from psm_jax.finetune.losses import (assistant_targets, kl_to_reference, next_token_nll, next_token_nll_from_hidden,
                                    projection_shift)
from psm_jax.model import Capture, check_edits, forward

SCHEDULES = ("constant", "cosine", "linear")
METHODS = ("lora", "full")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
RUN_FORMAT = "psm-finetune-run/1"


def _check_number(name: str, value, *, minimum: float = 0.0, allow_equal: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or value < minimum or (value == minimum and not allow_equal):
        raise ValueError(f"{name}={value!r}; expected a finite number {'>=' if allow_equal else '>'} {minimum}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with an optional linear warmup, then a constant, cosine or linear decay to 0 at total_steps."""

    learning_rate: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        _check_number("learning_rate", self.learning_rate, allow_equal=False)
        _check_number("weight_decay", self.weight_decay)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}; expected one of {SCHEDULES}")
        if self.schedule != "constant" and (self.total_steps is None or self.total_steps <= self.warmup_steps):
            raise ValueError(f"schedule={self.schedule!r} needs total_steps > warmup_steps={self.warmup_steps}; "
                             f"got total_steps={self.total_steps!r}")
        if self.max_grad_norm is not None:
            _check_number("max_grad_norm", self.max_grad_norm, allow_equal=False)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    peak = cfg.learning_rate
    if cfg.schedule == "constant":
        decay = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, cfg.total_steps - cfg.warmup_steps)
    else:
        decay = optax.linear_schedule(peak, 0.0, cfg.total_steps - cfg.warmup_steps)
    schedule = decay
    if cfg.warmup_steps:
        schedule = optax.join_schedules([optax.linear_schedule(0.0, peak, cfg.warmup_steps), decay],
                                        [cfg.warmup_steps])
    tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return tx if cfg.max_grad_norm is None else optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), tx)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """What is trained and how. `batch_size` is the global batch per optimizer step, split into
    `grad_accum` micro-batches. `edit_roles`: chat roles (psm_jax.chat.Role values) whose tokens the
    edits act on (None: every position). `kl_weight` needs a reference dataset; `steer_weight` a direction
    whose projection at (steer_site, steer_layer) is kept where the frozen model has it."""

    method: str = "lora"
    lora: lora_lib.LoraConfig = lora_lib.LoraConfig()
    full_leaves: tuple[str, ...] | None = None
    optimizer: OptimizerConfig = OptimizerConfig()
    batch_size: int = 8
    grad_accum: int = 1
    compute_dtype: str = "float32"
    edit_roles: tuple[int, ...] | None = None
    kl_weight: float = 0.0
    steer_weight: float = 0.0
    steer_site: str = "resid_post"
    steer_layer: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}; expected one of {METHODS}")
        for name in ("batch_size", "grad_accum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}; expected a positive int")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} is not a multiple of grad_accum={self.grad_accum}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r}; expected one of {sorted(COMPUTE_DTYPES)}")
        _check_number("kl_weight", self.kl_weight)
        _check_number("steer_weight", self.steer_weight)
        if self.steer_site not in EDITABLE_SITES:
            raise ValueError(f"steer_site={self.steer_site!r}; expected one of {EDITABLE_SITES}")
        if self.edit_roles is not None:
            roles = tuple(int(Role(r)) for r in self.edit_roles)  # ValueError names a bad role id
            object.__setattr__(self, "edit_roles", roles)
        if self.full_leaves is not None:
            object.__setattr__(self, "full_leaves", tuple(self.full_leaves))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    trainable: Any  # adapters {leaf: {"a", "b"}} or a params subtree, float32
    opt_state: Any
    data_key: jax.Array  # raw uint32 key: the batch order is a function of (data_key, cursor)


def init_state(params: Mapping, config: ModelConfig, ft: FinetuneConfig, key: jax.Array,
               optimizer: optax.GradientTransformation | None = None) -> TrainState:
    """Fresh state: adapters from `key` (B = 0) or a float32 copy of the trained leaves; data key from `key`."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    init_key, data_key = jax.random.split(key)
    if ft.method == "lora":
        trainable = lora_lib.init_adapters(init_key, params, config, ft.lora)
    else:
        # a copy, never the caller's arrays: the step donates the state's buffers
        trainable = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True),
                                 lora_lib.select_leaves(params, ft.full_leaves))
    optimizer = make_optimizer(ft.optimizer) if optimizer is None else optimizer
    return TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable), data_key)


def materialize(trainable, frozen: Mapping, config: ModelConfig, ft: FinetuneConfig) -> dict:
    """The params the forward runs with: trainable put into the frozen params (LoRA factored, or merged in
    float32 and cast straight to the compute dtype, so bf16 frozen weights round once), cast to the compute dtype."""
    dtype = COMPUTE_DTYPES[ft.compute_dtype]
    if ft.method == "lora" and ft.lora.factored:
        params = lora_lib.factored_params(frozen, trainable, config, ft.lora)
    elif ft.method == "lora":
        params = lora_lib.apply_adapters(frozen, trainable, config, ft.lora, dtype)
    else:
        params = lora_lib.overlay(frozen, trainable)
    return jax.tree.map(lambda x: x.astype(dtype), params)


def finetuned_params(frozen: Mapping, config: ModelConfig, ft: FinetuneConfig, trainable, dtype=None) -> dict:
    """The fine-tuned model for inference or export (merged in float32, cast to `dtype` or the params' dtypes).
    Training-time edits are not in it: pass them to the forward again to get the trained-with-edits model."""
    if ft.method == "lora":
        return lora_lib.merge_adapters(frozen, trainable, config, ft.lora, dtype)
    merged = lora_lib.overlay(frozen, trainable)
    return jax.tree.map(lambda m, p: m.astype(p.dtype if dtype is None else dtype), merged, dict(frozen))


def _denominators(batch: Mapping) -> dict:
    """Counts over the whole batch that each summed term is divided by (at least 1)."""
    out = {"nll": jnp.maximum(jnp.sum(assistant_targets(batch["roles"], batch["attention_mask"])), 1),
           "steer": jnp.maximum(jnp.sum(batch["attention_mask"]), 1)}
    if "ref_tokens" in batch:
        out["kl"] = jnp.maximum(jnp.sum(batch["ref_attention_mask"]), 1)
    return {k: v.astype(jnp.float32) for k, v in out.items()}


def _term_names(ft: FinetuneConfig) -> tuple[str, ...]:
    return ("nll",) + (("kl",) if ft.kl_weight > 0 else ()) + (("steer",) if ft.steer_weight > 0 else ())


def _unembedding_frozen(ft: FinetuneConfig, config: ModelConfig) -> bool:
    """Whether training leaves the vocabulary projection's weight as it is, so the NLL can take the fused head
    (`next_token_nll_from_hidden`, no [B, T, V] logits) instead of full logits."""
    if ft.method == "lora":
        return True
    head = "embed" if config.tie_embeddings else "unembed"
    return ft.full_leaves is not None and head not in ft.full_leaves


def _micro_loss(trainable, frozen, config: ModelConfig, ft: FinetuneConfig, batch, extras, denoms):
    """Weighted loss terms of one micro-batch (each a sum divided by its whole-batch count)."""
    params = materialize(trainable, frozen, config, ft)
    tokens, mask, roles = batch["tokens"], batch["attention_mask"].astype(bool), batch["roles"]
    edits = tuple(extras["edits"])
    if ft.edit_roles is not None:
        where = jnp.isin(roles, jnp.asarray(ft.edit_roles, roles.dtype)) & mask
        edits = tuple(e.replace(positions=where) for e in edits)
    steer = ft.steer_weight > 0
    capture = Capture(sites=(ft.steer_site,), layers=(ft.steer_layer,)) if steer else Capture()
    fused = _unembedding_frozen(ft, config)
    out = forward(params, config, tokens, attention_mask=mask, edits=edits, capture=capture, return_logits=not fused)
    targets = assistant_targets(roles, mask)
    nll = (next_token_nll_from_hidden(params, config, out.residual, tokens, targets) if fused
           else next_token_nll(out.logits, tokens, targets))
    terms = {"nll": nll / denoms["nll"]}
    if ft.kl_weight > 0 or steer:
        reference = jax.lax.stop_gradient(jax.tree.map(lambda x: x.astype(COMPUTE_DTYPES[ft.compute_dtype]),
                                                       dict(frozen)))
    if ft.kl_weight > 0:
        ref_tokens, ref_mask = batch["ref_tokens"], batch["ref_attention_mask"].astype(bool)
        policy = forward(params, config, ref_tokens, attention_mask=ref_mask).logits
        original = forward(reference, config, ref_tokens, attention_mask=ref_mask).logits
        terms["kl"] = ft.kl_weight * kl_to_reference(policy, original, ref_mask) / denoms["kl"]
    if steer:
        frozen_out = forward(reference, config, tokens, attention_mask=mask, edits=edits, capture=capture)
        shift = projection_shift(out.captured[ft.steer_site][0], frozen_out.captured[ft.steer_site][0],
                                 extras["direction"], mask)
        terms["steer"] = ft.steer_weight * shift / denoms["steer"]
    return sum(terms.values()), terms


def batch_loss(trainable, frozen, config: ModelConfig, ft: FinetuneConfig, batch: Mapping, extras: Mapping):
    """(loss, terms) of a whole batch as one micro-batch: what a step differentiates."""
    return _micro_loss(trainable, frozen, config, ft, batch, extras, _denominators(batch))


def _train_step(state: TrainState, frozen, batch, extras, *, config, ft, optimizer):
    denoms = _denominators(batch)
    micro = jax.tree.map(lambda x: x.reshape(ft.grad_accum, -1, *x.shape[1:]), dict(batch))
    grad_fn = jax.value_and_grad(_micro_loss, has_aux=True)

    def accumulate(acc, mb):
        (_, terms), grads = grad_fn(state.trainable, frozen, config, ft, mb, extras, denoms)
        return jax.tree.map(jnp.add, acc, (grads, terms)), None

    zero = (jax.tree.map(jnp.zeros_like, state.trainable), {k: jnp.zeros((), jnp.float32) for k in _term_names(ft)})
    (grads, terms), _ = jax.lax.scan(accumulate, zero, micro)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {**terms, "loss": sum(terms.values()), "grad_norm": optax.tree.norm(grads),
               "target_tokens": denoms["nll"]}
    return TrainState(state.step + 1, trainable, opt_state, state.data_key), metrics


def make_train_step(config: ModelConfig, ft: FinetuneConfig, optimizer: optax.GradientTransformation) -> Callable:
    """jitted `step(state, frozen, batch, extras) -> (state, metrics)`; the state argument is donated.

    batch: tokens / attention_mask / roles [batch_size, T] (+ ref_tokens / ref_attention_mask with a KL term);
    extras: {"edits": tuple of edits with positions=None, "direction": [D] array or None}."""
    return jax.jit(functools.partial(_train_step, config=config, ft=ft, optimizer=optimizer), donate_argnums=(0,))


@functools.lru_cache(maxsize=8)
def cached_train_step(config: ModelConfig, ft: FinetuneConfig) -> Callable:
    """`make_train_step` with the optimizer of `ft`, one per (model config, fine-tune config): a study that runs
    many fine-tunes of one model (data mixes, steering strengths) compiles the step once, the edits' vectors
    and coefficients being traced inputs."""
    return make_train_step(config, ft, make_optimizer(ft.optimizer))


class FinetuneResult(NamedTuple):
    state: TrainState
    log: list  # one dict per step run in this call: step and float metrics


def _check_extras(config: ModelConfig, ft: FinetuneConfig, data: ChatDataset, edits, ref_data, direction) -> None:
    check_edits(config, edits, ft.batch_size // ft.grad_accum, data.seq_len)
    for e in edits:
        if e.positions is not None:
            raise ValueError("training edits must have positions=None (every token); choose tokens by role with "
                             f"FinetuneConfig.edit_roles instead of a fixed mask of shape {tuple(e.positions.shape)}")
    if (ft.kl_weight > 0) != (ref_data is not None):
        raise ValueError(f"kl_weight={ft.kl_weight} and ref_data={'given' if ref_data is not None else None}: "
                         "a KL term needs a reference dataset and a reference dataset needs kl_weight > 0")
    if ft.steer_weight > 0:
        config.check_layer(ft.steer_layer, "steer_layer")
        if direction is None or np.shape(direction) != (config.d_model,):
            raise ValueError(f"steer_weight={ft.steer_weight} needs a direction of shape ({config.d_model},); got "
                             f"{None if direction is None else np.shape(direction)}")
        if not np.all(np.isfinite(direction)) or not np.any(direction):
            raise ValueError("steering direction is zero or not finite; expected a finite non-zero vector")


def run_config(config: ModelConfig, ft: FinetuneConfig, data: ChatDataset) -> dict:
    """What config.json of a run dir records (and a resume must match)."""
    return {"format": RUN_FORMAT, "finetune": ft.to_dict(), "model": config.to_dict(),
            "data": {"conversations": len(data), "seq_len": data.seq_len}}


def finetune(params: Mapping, config: ModelConfig, ft: FinetuneConfig, data: ChatDataset, *, steps: int,
             key: jax.Array, edits: Sequence = (), ref_data: ChatDataset | None = None, direction=None,
             run_dir=None, checkpoint_every: int = 0, keep: int = 2, mesh=None,
             on_step: Callable[[dict], None] | None = None) -> FinetuneResult:
    """Train for `steps` optimizer steps (in total: a run dir with checkpoints resumes where it stopped).

    edits: psm_jax.edits objects (positions=None) applied in every training forward. mesh: a
    `psm_jax.sharding.make_mesh` mesh; the batch is split over its data axes, weights replicated.
    run_dir: checkpoints every `checkpoint_every` steps and at the end (keeping `keep`), resumed from.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}; expected a positive int")
    edits = tuple(edits)
    _check_extras(config, ft, data, edits, ref_data, direction)
    optimizer = make_optimizer(ft.optimizer)
    state = init_state(params, config, ft, key, optimizer)
    frozen = dict(params)
    extras = {"edits": edits, "direction": None if direction is None else jnp.asarray(direction, jnp.float32)}
    place = jnp.asarray
    if mesh is not None:  # data parallel: weights and optimizer state replicated, the batch split
        from psm_jax.sharding import shard_batch

        state, frozen, extras = jax.device_put((state, frozen, extras), NamedSharding(mesh, P()))
        place = functools.partial(shard_batch, mesh=mesh)
    cursor = ref_cursor = Cursor()
    ckpt = None
    if run_dir is not None:
        ensure_run_config(run_dir, run_config(config, ft, data))
        ckpt = Checkpointer(run_dir, keep)
        if ckpt.latest_step() is not None:
            state, meta = ckpt.restore(state)
            cursor, ref_cursor = Cursor(*meta["cursor"]), Cursor(*meta["ref_cursor"])
    step_fn = cached_train_step(config, ft)
    log = []
    for step in range(int(state.step), steps):
        batch, cursor = next_batch(data, state.data_key, cursor, ft.batch_size)
        if ref_data is not None:
            ref, ref_cursor = next_batch(ref_data, jax.random.fold_in(state.data_key, 1), ref_cursor, ft.batch_size)
            batch.update(ref_tokens=ref["tokens"], ref_attention_mask=ref["attention_mask"])
        state, metrics = step_fn(state, frozen, {k: place(v) for k, v in batch.items()}, extras)
        row = {"step": step + 1, **{k: float(v) for k, v in metrics.items()}}
        log.append(row)
        if on_step is not None:
            on_step(row)
        if ckpt is not None and (step + 1 == steps or (checkpoint_every and (step + 1) % checkpoint_every == 0)):
            ckpt.save(step + 1, state, {"cursor": list(cursor), "ref_cursor": list(ref_cursor)})
        kill_point("finetune_step")
    if ckpt is not None:
        ckpt.close()
    return FinetuneResult(state, log)
