"""Write params + ModelConfig as a Hugging Face model folder (config.json, model.safetensors, tokenizer).

Any params can be exported: merged LoRA adapters, full fine-tunes, or edited weights such as
`psm_jax.weights.orthogonalize`. With `adapters=`, each adapted weight is merged here, one layer at a
time, in float32 (`W + s * A @ B`) and only then cast to the output dtype: merging in bf16 rounds the
small LoRA delta away (a known source of drift in merged PEFT models).

The config is the inverse of `psm_jax.config.from_hf_config`, and is checked by running it back
through that function: a ModelConfig that no HF config expresses (say, Gemma's norm offset on a
llama) is refused with the differing fields named instead of exporting a model that loads wrong.

Tensors are written one at a time into a single safetensors file (header first, from the shapes),
so the host holds one tensor beyond the params; sharded params are gathered tensor by tensor, and
with several processes only process 0 writes. The folder is built in a temporary sibling and
renamed into place (`psm_jax.atomic.replace_dir`): a reader never sees a half-written export.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from pathlib import Path
from typing import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from psm_jax.atomic import replace_dir
from psm_jax.config import ModelConfig, RopeConfig, from_hf_config
from psm_jax.loading.names import TensorSpec, param_specs

# family -> (HF model_type, architecture class)
HF_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}
_SAFETENSORS_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(jnp.bfloat16): "BF16"}


def _rope_parameters(rope: RopeConfig) -> dict:
    out = {"rope_type": rope.kind, "rope_theta": rope.theta}
    if rope.kind in ("linear", "llama3"):
        out["factor"] = rope.factor
    if rope.kind == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                   original_max_position_embeddings=rope.original_max_position)
    return out


def _layer_types(config: ModelConfig) -> list[str]:
    return ["sliding_attention" if s else "full_attention" for s in config.layer_is_sliding]


def _as_number(x: float):
    """x, as an int when it is one up to rounding (query_pre_attn_scalar recovered from a scale)."""
    return int(round(x)) if abs(x - round(x)) < 1e-6 * max(1.0, abs(x)) else x


def to_hf_config(config: ModelConfig) -> dict:
    """The HF config.json dict of `config`; raises ValueError when no HF config of its family expresses it."""
    c = config
    model_type, arch = HF_ARCHITECTURES[c.family]
    gemma = c.family in ("gemma2", "gemma3")
    eos = list(c.eos_token_ids)
    hf = {
        "architectures": [arch], "model_type": model_type, "vocab_size": c.vocab_size, "hidden_size": c.d_model,
        "intermediate_size": c.d_mlp, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "rms_norm_eps": c.norm_eps,
        "max_position_embeddings": c.max_position, "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": c.o_bias if c.family != "qwen2" else False, "mlp_bias": c.mlp_bias,
        "bos_token_id": c.bos_token_id, "pad_token_id": c.pad_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "rope_parameters": _rope_parameters(c.rope), "dtype": "float32",
        ("hidden_activation" if gemma else "hidden_act"): {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[
            c.activation],
    }
    sliding = any(c.layer_is_sliding)
    hf["sliding_window"] = c.sliding_window if sliding else None
    if c.family in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = sliding
        hf["layer_types"] = _layer_types(c)
    if gemma:
        hf["layer_types"] = _layer_types(c)
        hf["query_pre_attn_scalar"] = _as_number((c.query_scale or c.head_dim ** -0.5) ** -2)
        hf["attn_logit_softcapping"] = c.attn_logit_softcap
        hf["final_logit_softcapping"] = c.final_logit_softcap
    if c.family == "gemma3":
        local = c.rope_local or RopeConfig(theta=10000.0)
        hf["rope_parameters"] = {"full_attention": _rope_parameters(c.rope),
                                 "sliding_attention": _rope_parameters(local)}
    _check_round_trip(config, hf)
    return hf


def _normalised(config: ModelConfig) -> dict:
    d = dataclasses.asdict(config)
    d["query_scale"] = config.query_scale or config.head_dim ** -0.5
    if not any(config.layer_is_sliding):
        d["sliding_window"], d["sliding_layers"] = None, ()
    if config.family != "gemma3":
        d["rope_local"] = None
    return d


def _check_round_trip(config: ModelConfig, hf: Mapping) -> None:
    back, want = _normalised(from_hf_config(hf)), _normalised(config)

    def same(a, b):
        if isinstance(a, float) and isinstance(b, float):
            return math.isclose(a, b, rel_tol=1e-9)
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return a == b

    diff = [f"{k}={want[k]!r} (HF config gives {back[k]!r})" for k in want if not same(want[k], back.get(k))]
    if diff:
        raise ValueError(f"this ModelConfig cannot be written as a Hugging Face {config.family} config; fields "
                         f"that would load differently: {'; '.join(diff)}")


def _tensors(params: Mapping, config: ModelConfig) -> Iterator[tuple[TensorSpec, str, int | None]]:
    """(spec, HF tensor name, layer index or None) for every tensor of the checkpoint, in order."""
    for spec in param_specs(config):
        tree = params["layers"] if spec.per_layer else params
        if spec.leaf not in tree:
            raise ValueError(f"params lack leaf {spec.leaf!r}, which config ({config.family}) needs for "
                             f"{spec.hf_name!r}")
        shape = tuple(tree[spec.leaf].shape)
        if shape != spec.stacked_shape(config.n_layers):
            raise ValueError(f"params leaf {spec.leaf!r} has shape {shape}; expected "
                             f"{spec.stacked_shape(config.n_layers)} for this config")
        if spec.per_layer:
            for i, name in enumerate(spec.hf_names(config.n_layers)):
                yield spec, name, i
        else:
            yield spec, spec.hf_name, None
    expected = {s.leaf for s in param_specs(config)}
    extra = sorted((set(params) - {"layers"} | set(params["layers"])) - expected)
    if extra:
        raise ValueError(f"params hold leaves {extra} that config ({config.family}, tie_embeddings="
                         f"{config.tie_embeddings}) does not use; expected exactly {sorted(expected)}")


def _host(x) -> np.ndarray:
    """A whole array on the host (gathered across processes when it is not fully addressable)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _tensor(params, config, spec, layer, adapters, scales, dtype) -> np.ndarray:
    """One checkpoint tensor in torch layout: merged in float32 when adapted, then cast to dtype."""
    leaf = (params["layers"] if spec.per_layer else params)[spec.leaf]
    w = leaf[layer] if layer is not None else leaf
    out_dtype = np.dtype(w.dtype if dtype is None else dtype)
    if adapters is not None and spec.leaf in adapters:
        from psm_jax.finetune.adapters import merge_weight

        ab = adapters[spec.leaf]
        w = merge_weight(w, ab["a"][layer], ab["b"][layer], scales[layer])
    arr = _host(w).astype(out_dtype)
    return np.ascontiguousarray(arr.T if spec.transpose else arr)


def _write_safetensors(path: Path, entries, make) -> None:
    """entries: [(name, shape, dtype)]; make(i) -> the i-th array. Header first, then the data in order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in entries:
        if np.dtype(dtype) not in _SAFETENSORS_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {np.dtype(dtype)}; expected float32, float16 or bfloat16")
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _SAFETENSORS_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for i, (name, shape, dtype) in enumerate(entries):
            arr = make(i)
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):  # pragma: no cover - internal invariant
                raise AssertionError(f"{name}: {arr.shape} {arr.dtype} != {shape} {dtype}")
            f.write(arr.tobytes())


def save_hf(params: Mapping, config: ModelConfig, path: str | os.PathLike, *, tokenizer=None, adapters=None,
            lora=None, dtype=None, overwrite: bool = False) -> Path:
    """Write an HF folder at `path` that `AutoModelForCausalLM.from_pretrained` and `psm_jax.load` read back.

    adapters / lora: LoRA adapters (`psm_jax.finetune`) merged in float32 into the written weights.
    dtype: dtype of the written tensors (default: each leaf's own). tokenizer: saved beside the weights.
    overwrite: replace an existing folder (atomically); otherwise an existing `path` is an error.
    """
    if (adapters is None) != (lora is None):
        raise ValueError("adapters and lora go together: pass both (to merge LoRA adapters) or neither")
    if dtype is not None and np.dtype(dtype) not in _SAFETENSORS_NAMES:
        raise TypeError(f"dtype={dtype!r}; expected float32, float16 or bfloat16")
    scales = None
    if adapters is not None:
        from psm_jax.finetune.adapters import check_adapters

        check_adapters(adapters, params, config, lora)
        scales = lora.layer_scales(config)
    hf = to_hf_config(config)
    items = list(_tensors(params, config))
    entries = []
    for spec, name, _ in items:
        shape = spec.hf_shape
        leaf_dtype = (params["layers"] if spec.per_layer else params)[spec.leaf].dtype
        entries.append((name, shape, np.dtype(leaf_dtype if dtype is None else dtype)))
    hf["dtype"] = str(entries[0][2]) if len({e[2] for e in entries}) == 1 else "float32"

    def make(i):
        spec, _, layer = items[i]
        return _tensor(params, config, spec, layer, adapters, scales, entries[i][2])

    if jax.process_index() != 0:  # other processes take part in the gathers; process 0 writes
        for i in range(len(items)):
            make(i)
        return Path(path)
    with replace_dir(path, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
        _write_safetensors(tmp / "model.safetensors", entries, make)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(path)
