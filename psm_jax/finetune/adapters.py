"""LoRA adapters as a pytree beside the frozen params, applied factored (or merged) inside the jitted loss.

Shape: `{leaf: {"a": [L, d_in, r], "b": [L, r, d_out]}}` for leaves among wq, wk, wv, wo, w_gate,
w_up, w_down, stacked on the layer axis like the params they adapt, so the forward's `lax.scan`
over layers is untouched and only the adapter subtree is differentiated. B starts at zero (PEFT's
convention: a fresh adapter leaves the model unchanged); A is drawn from an explicit PRNG key with
PEFT's kaiming-uniform bound 1/sqrt(d_in).

Training applies them factored by default (`LoraConfig.factored`, `factored_params`): each adapted
projection computes `x W + s (x A) B` (`psm_jax.lowrank.LowRank`), whose backward costs 2·T·r·(in + out)
per weight on top of the frozen weight's activation gradient, and never forms a gradient of W's size.
`apply_adapters` merges `W + s A B` instead (2·in·r·out FLOPs per weight in the forward, but the
gradient then reaches A and B through the full weight cotangent x^T dy, 2·T·in·out per weight, as in
full fine-tuning); inference and export use the merged weights (`merge_weight`, in fp32), so one
forward serves inference, training and export.

Per-layer selection is a static mask folded into the scale: unselected layers get a zero delta
(and zero gradients), which keeps the stacked shapes that the scan needs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psm_jax.config import ModelConfig
from psm_jax.lowrank import LowRank

# Short projection names (PEFT's q_proj ... down_proj) -> Params leaves.
PROJECTIONS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"}
ADAPTABLE_LEAVES = tuple(PROJECTIONS.values())


def _leaf_name(target: str) -> str:
    if target in ADAPTABLE_LEAVES:
        return target
    if target in PROJECTIONS:
        return PROJECTIONS[target]
    raise ValueError(f"unknown LoRA target {target!r}; expected one of {sorted(PROJECTIONS)} "
                     f"or a Params leaf among {ADAPTABLE_LEAVES}")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha, targets (short names or leaves), layers (None = all), rslora: scale alpha/sqrt(r).
    factored: training applies `x @ W + s * (x @ A) @ B` (`factored_params`) instead of merging A @ B into W
    (`apply_adapters`); the same function, but the backward never forms a gradient of W's size."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    layers: tuple[int, ...] | None = None
    rslora: bool = False
    factored: bool = True

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank={self.rank!r}; expected a positive int")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha={self.alpha!r}; expected a positive finite number")
        if isinstance(self.targets, str) or not self.targets:
            raise ValueError(f"LoRA targets={self.targets!r}; expected a non-empty tuple of names like ('q', 'v')")
        leaves = tuple(_leaf_name(t) for t in self.targets)
        if len(set(leaves)) != len(leaves):
            raise ValueError(f"LoRA targets={self.targets!r} name a projection twice")
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def leaves(self) -> tuple[str, ...]:
        return tuple(_leaf_name(t) for t in self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def layer_scales(self, config: ModelConfig) -> np.ndarray:
        """float32 [L]: the scale on selected layers, 0 elsewhere (static, folded into the merge)."""
        mask = np.ones(config.n_layers, bool)
        if self.layers is not None:
            mask[:] = False
            for layer in self.layers:
                mask[config.check_layer(layer, "LoRA layer")] = True
        return (mask * self.scale).astype(np.float32)


def init_adapters(key: jax.Array, params: Mapping, config: ModelConfig, lora: LoraConfig,
                  dtype=jnp.float32) -> dict:
    """Fresh adapters for `params`: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) from `key`, B = 0."""
    layers = params["layers"]
    out = {}
    for leaf, sub in zip(lora.leaves, jax.random.split(key, len(lora.leaves))):
        if leaf not in layers:
            raise ValueError(f"LoRA target {leaf!r} is not in the params (have {sorted(layers)})")
        n, d_in, d_out = layers[leaf].shape
        bound = 1.0 / math.sqrt(d_in)
        out[leaf] = {"a": jax.random.uniform(sub, (n, d_in, lora.rank), dtype, -bound, bound),
                     "b": jnp.zeros((n, lora.rank, d_out), dtype)}
    check_adapters(adapters=out, params=params, config=config, lora=lora)
    return out


def check_adapters(adapters: Mapping, params: Mapping, config: ModelConfig, lora: LoraConfig) -> None:
    """Raise unless `adapters` has exactly lora's leaves with [L, d_in, r] / [L, r, d_out] shapes."""
    lora.layer_scales(config)  # names a selected layer outside the model
    if set(adapters) != set(lora.leaves):
        raise ValueError(f"adapters cover {sorted(adapters)}; expected the LoRA targets {sorted(lora.leaves)}")
    for leaf, ab in adapters.items():
        n, d_in, d_out = params["layers"][leaf].shape
        want = {"a": (n, d_in, lora.rank), "b": (n, lora.rank, d_out)}
        if not isinstance(ab, Mapping) or set(ab) != {"a", "b"}:
            raise ValueError(f"adapter {leaf!r} must be a dict with keys 'a' and 'b'; got {ab!r:.80}")
        for k, shape in want.items():
            if tuple(ab[k].shape) != shape:
                raise ValueError(f"adapter {leaf}.{k} has shape {tuple(ab[k].shape)}; expected {shape}")


def apply_adapters(params: Mapping, adapters: Mapping, config: ModelConfig, lora: LoraConfig,
                   dtype=None) -> dict:
    """params with `W + s_l * A_l @ B_l` on every adapted stacked leaf, the delta computed in float32.

    `dtype`: dtype of the merged leaves (default: each weight's own dtype). Export passes float32 and
    casts afterwards, so a bf16 checkpoint is rounded once, after the merge.
    """
    scales = jnp.asarray(lora.layer_scales(config))[:, None, None]
    layers = dict(params["layers"])
    for leaf, ab in adapters.items():
        w = layers[leaf]
        layers[leaf] = merge_weight(w, ab["a"], ab["b"], scales).astype(w.dtype if dtype is None else dtype)
    return {**params, "layers": layers}


def factored_params(params: Mapping, adapters: Mapping, config: ModelConfig, lora: LoraConfig) -> dict:
    """params whose adapted stacked leaves are `LowRank(W, A, B, s_l)`: what training runs. The port's
    projections apply them as `x @ W + s_l * (x @ A) @ B`, so the gradient reaching A and B never passes
    through a merged [d_in, d_out] matrix (`apply_adapters` merges, for inference and export)."""
    scales = jnp.asarray(lora.layer_scales(config))
    layers = dict(params["layers"])
    for leaf, ab in adapters.items():
        layers[leaf] = LowRank(layers[leaf], ab["a"], ab["b"], scales)
    return {**params, "layers": layers}


def merge_weight(w, a, b, scale):
    """float32 `w + scale * a @ b`, for one layer ([d_in, d_out]) or stacked layers ([L, ...], scale [L, 1, 1])."""
    f32 = jnp.float32
    return w.astype(f32) + jnp.asarray(scale, f32) * jnp.matmul(a.astype(f32), b.astype(f32))


def merge_adapters(params: Mapping, adapters: Mapping, config: ModelConfig, lora: LoraConfig,
                   dtype=None) -> dict:
    """The fine-tuned params for inference or export: merged in float32, then every leaf cast to `dtype`
    (default: the params' own dtypes). The adapters' training-time edits are not part of them."""
    check_adapters(adapters, params, config, lora)
    merged = jax.jit(apply_adapters, static_argnames=("config", "lora", "dtype"))(
        params, adapters, config, lora, jnp.float32)
    if dtype is None:
        return jax.tree.map(lambda m, p: m.astype(p.dtype), merged, dict(params))
    return jax.tree.map(lambda m: m.astype(dtype), merged)


def select_leaves(params: Mapping, leaves: Sequence[str] | None) -> dict:
    """The trainable subtree of full fine-tuning: all params (None) or the named leaves (top level or per layer)."""
    if leaves is None:
        return {**params, "layers": dict(params["layers"])}
    out: dict = {}
    for leaf in leaves:
        if leaf in params and leaf != "layers":
            out[leaf] = params[leaf]
        elif leaf in params["layers"]:
            out.setdefault("layers", {})[leaf] = params["layers"][leaf]
        else:
            raise ValueError(f"full fine-tuning leaf {leaf!r} is not in the params; expected one of "
                             f"{sorted(k for k in params if k != 'layers') + sorted(params['layers'])}")
    return out


def overlay(params: Mapping, trainable: Mapping) -> dict:
    """params with the leaves of `trainable` (a `select_leaves` subtree) put in place."""
    out = {**params, **{k: v for k, v in trainable.items() if k != "layers"}}
    out["layers"] = {**params["layers"], **trainable.get("layers", {})}
    return out
