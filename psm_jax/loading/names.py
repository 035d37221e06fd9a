"""The Params pytree layout and its mapping to Hugging Face tensor names.

Params is a plain dict. Per-layer weights are stacked on a leading `layer` axis so the forward
can `lax.scan` over them. Linear weights are stored input-major (`[d_in, d_out]`, i.e. the
transpose of torch's `nn.Linear.weight`) so the forward computes `x @ w`.

    embed        [vocab, d_model]
    final_norm   [d_model]
    unembed      [d_model, vocab]          absent when config.tie_embeddings
    layers/
      attn_norm      [L, d_model]
      wq, wk, wv     [L, d_model, heads*head_dim] / [L, d_model, kv_heads*head_dim]
      bq, bk, bv     [L, ...]              only when config.qkv_bias
      wo             [L, heads*head_dim, d_model];  bo [L, d_model] when config.o_bias
      q_norm, k_norm [L, head_dim]         only when config.qk_norm
      post_attn_norm [L, d_model]          only when config.sandwich_norms
      mlp_norm       [L, d_model]
      w_gate, w_up   [L, d_model, d_mlp];  w_down [L, d_mlp, d_model]
      post_mlp_norm  [L, d_model]          only when config.sandwich_norms
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

from psm_jax.config import ModelConfig


# Logical axis names of every leaf's per-layer array; stacked leaves get "layers" in front. These
# names are the only thing the sharding rules table (psm_jax.sharding.DEFAULT_RULES) refers to:
#   vocab, embed (d_model), heads / kv_heads (the flattened heads*head_dim projection width),
#   head_dim, mlp (d_mlp), norm (RMSNorm weights, kept whole by default), layers.
LEAF_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "final_norm": ("norm",),
    "unembed": ("embed", "vocab"),
    "attn_norm": ("norm",),
    "wq": ("embed", "heads"),
    "wk": ("embed", "kv_heads"),
    "wv": ("embed", "kv_heads"),
    "bq": ("heads",),
    "bk": ("kv_heads",),
    "bv": ("kv_heads",),
    "wo": ("heads", "embed"),
    "bo": ("embed",),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    "post_attn_norm": ("norm",),
    "mlp_norm": ("norm",),
    "post_mlp_norm": ("norm",),
    "w_gate": ("embed", "mlp"),
    "w_up": ("embed", "mlp"),
    "w_down": ("mlp", "embed"),
    "b_gate": ("mlp",),
    "b_up": ("mlp",),
    "b_down": ("embed",),
}


def leaf_axes(leaf: str, per_layer: bool) -> tuple[str, ...]:
    """Logical axes of a Params leaf as stored (with the stacked "layers" axis for per-layer leaves)."""
    if leaf not in LEAF_AXES:
        raise ValueError(f"unknown Params leaf {leaf!r}; expected one of {sorted(LEAF_AXES)}")
    return (("layers",) if per_layer else ()) + LEAF_AXES[leaf]


class TensorSpec(NamedTuple):
    """Where one stacked leaf comes from in an HF checkpoint."""

    leaf: str  # key in params["layers"] or a top-level key
    hf_name: str  # with `{i}` for the layer index
    shape: tuple[int, ...]  # per-layer shape in Params layout
    transpose: bool  # True for linear weights (torch [out, in] -> ours [in, out])
    per_layer: bool

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """Per-layer shape as the HF checkpoint stores it."""
        return tuple(reversed(self.shape)) if self.transpose else self.shape

    def stacked_shape(self, n_layers: int) -> tuple[int, ...]:
        """Shape of the Params leaf (with the layer axis for per-layer leaves)."""
        return ((n_layers,) if self.per_layer else ()) + self.shape

    @property
    def axes(self) -> tuple[str, ...]:
        return leaf_axes(self.leaf, self.per_layer)

    def hf_names(self, n_layers: int) -> list[str]:
        """Checkpoint tensor names, in layer order, behind this leaf."""
        return [self.hf_name.format(i=i) for i in range(n_layers)] if self.per_layer else [self.hf_name]


def param_specs(config: ModelConfig) -> Iterator[TensorSpec]:
    c = config
    D, F, hd = c.d_model, c.d_mlp, c.head_dim
    q, kv = c.n_heads * hd, c.n_kv_heads * hd
    pre = "model.layers.{i}."
    yield TensorSpec("embed", "model.embed_tokens.weight", (c.vocab_size, D), False, False)
    yield TensorSpec("final_norm", "model.norm.weight", (D,), False, False)
    if not c.tie_embeddings:
        yield TensorSpec("unembed", "lm_head.weight", (D, c.vocab_size), True, False)
    yield TensorSpec("attn_norm", pre + "input_layernorm.weight", (D,), False, True)
    yield TensorSpec("wq", pre + "self_attn.q_proj.weight", (D, q), True, True)
    yield TensorSpec("wk", pre + "self_attn.k_proj.weight", (D, kv), True, True)
    yield TensorSpec("wv", pre + "self_attn.v_proj.weight", (D, kv), True, True)
    if c.qkv_bias:
        yield TensorSpec("bq", pre + "self_attn.q_proj.bias", (q,), False, True)
        yield TensorSpec("bk", pre + "self_attn.k_proj.bias", (kv,), False, True)
        yield TensorSpec("bv", pre + "self_attn.v_proj.bias", (kv,), False, True)
    yield TensorSpec("wo", pre + "self_attn.o_proj.weight", (q, D), True, True)
    if c.o_bias:
        yield TensorSpec("bo", pre + "self_attn.o_proj.bias", (D,), False, True)
    if c.qk_norm:
        yield TensorSpec("q_norm", pre + "self_attn.q_norm.weight", (hd,), False, True)
        yield TensorSpec("k_norm", pre + "self_attn.k_norm.weight", (hd,), False, True)
    if c.sandwich_norms:
        yield TensorSpec("post_attn_norm", pre + "post_attention_layernorm.weight", (D,), False, True)
        yield TensorSpec("mlp_norm", pre + "pre_feedforward_layernorm.weight", (D,), False, True)
        yield TensorSpec("post_mlp_norm", pre + "post_feedforward_layernorm.weight", (D,), False, True)
    else:
        yield TensorSpec("mlp_norm", pre + "post_attention_layernorm.weight", (D,), False, True)
    yield TensorSpec("w_gate", pre + "mlp.gate_proj.weight", (D, F), True, True)
    yield TensorSpec("w_up", pre + "mlp.up_proj.weight", (D, F), True, True)
    yield TensorSpec("w_down", pre + "mlp.down_proj.weight", (F, D), True, True)
    if c.mlp_bias:
        yield TensorSpec("b_gate", pre + "mlp.gate_proj.bias", (F,), False, True)
        yield TensorSpec("b_up", pre + "mlp.up_proj.bias", (F,), False, True)
        yield TensorSpec("b_down", pre + "mlp.down_proj.bias", (D,), False, True)


# llama.cpp GGUF tensor names for the same leaves (blk.{i}.*).
GGUF_NAMES = {
    "embed": "token_embd.weight",
    "final_norm": "output_norm.weight",
    "unembed": "output.weight",
    "attn_norm": "blk.{i}.attn_norm.weight",
    "wq": "blk.{i}.attn_q.weight",
    "wk": "blk.{i}.attn_k.weight",
    "wv": "blk.{i}.attn_v.weight",
    "bq": "blk.{i}.attn_q.bias",
    "bk": "blk.{i}.attn_k.bias",
    "bv": "blk.{i}.attn_v.bias",
    "wo": "blk.{i}.attn_output.weight",
    "bo": "blk.{i}.attn_output.bias",
    "q_norm": "blk.{i}.attn_q_norm.weight",
    "k_norm": "blk.{i}.attn_k_norm.weight",
    "post_attn_norm": "blk.{i}.post_attention_norm.weight",
    "mlp_norm": "blk.{i}.ffn_norm.weight",
    "post_mlp_norm": "blk.{i}.post_ffw_norm.weight",
    "w_gate": "blk.{i}.ffn_gate.weight",
    "w_up": "blk.{i}.ffn_up.weight",
    "w_down": "blk.{i}.ffn_down.weight",
    "b_gate": "blk.{i}.ffn_gate.bias",
    "b_up": "blk.{i}.ffn_up.bias",
    "b_down": "blk.{i}.ffn_down.bias",
}


def aligned_empty(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """An uninitialised host buffer for one leaf (or shard), 64-byte aligned.

    Why aligned: `jax.device_put` on CPU adopts such a buffer without copying it, so a loader that
    fills leaves in these never holds a second copy of the weights.
    """
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + 64, np.uint8)
    start = (-raw.ctypes.data) % 64
    return raw[start:start + n].view(dtype).reshape(shape)
