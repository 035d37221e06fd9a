"""ModelConfig: one frozen description of a decoder LLM, covering six HF families.

Family differences are switches on this dataclass, never separate forwards. `from_hf_config`
reads a Hugging Face `config.json` dictionary (old `rope_theta`/`rope_scaling` keys and the
newer `rope_parameters` form alike) and refuses anything it cannot represent exactly.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary embedding for one attention kind (global or local)."""

    theta: float
    kind: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.kind not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope type {self.kind!r}; expected one of {SUPPORTED_ROPE_TYPES}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig(theta=10000.0)
    rope_local: RopeConfig | None = None  # used by sliding layers when set (Gemma 3)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    # Gemma switches
    norm_offset: float = 0.0  # RMSNorm weight is (offset + w): 1.0 for Gemma
    sandwich_norms: bool = False  # extra post-attention / post-MLP norms (Gemma 2/3)
    embed_scale: float = 1.0  # embeddings multiplied by this (sqrt(d_model) for Gemma)
    query_scale: float | None = None  # None -> head_dim ** -0.5
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    activation: str = "silu"  # silu | gelu_tanh
    # Attention windows: per-layer sliding flag; window = keys with q_pos - k_pos < sliding_window.
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    max_position: int = 8192
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"unsupported model family {self.family!r}; expected one of {SUPPORTED_FAMILIES}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"unsupported activation {self.activation!r}; expected 'silu' or 'gelu_tanh'")
        if self.sliding_layers and len(self.sliding_layers) != self.n_layers:
            raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries, expected n_layers={self.n_layers}")
        if any(self.sliding_layers) and not self.sliding_window:
            raise ValueError("sliding_layers marks sliding layers but sliding_window is not set")

    @property
    def layer_is_sliding(self) -> tuple[bool, ...]:
        return self.sliding_layers or (False,) * self.n_layers

    def check_layer(self, layer: int, what: str = "layer") -> int:
        if not isinstance(layer, (int,)) or isinstance(layer, bool) or not 0 <= layer < self.n_layers:
            raise ValueError(f"{what} {layer!r} is out of range; expected an int in [0, {self.n_layers - 1}]")
        return layer

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["rope"] = RopeConfig(**d["rope"])
        if d.get("rope_local") is not None:
            d["rope_local"] = RopeConfig(**d["rope_local"])
        for key in ("sliding_layers", "eos_token_ids"):
            d[key] = tuple(d.get(key) or ())
        return cls(**d)


_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}


def _rope_from(params: Mapping[str, Any] | None, default_theta: float) -> RopeConfig:
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {kind!r}; expected one of {SUPPORTED_ROPE_TYPES}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported; expected 1.0")
    return RopeConfig(
        theta=float(params.get("rope_theta", default_theta)),
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", 8192)),
    )


def _as_tuple(x) -> tuple[int, ...]:
    if x is None:
        return ()
    return tuple(x) if isinstance(x, (list, tuple)) else (int(x),)


_REQUIRED_INT_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
_OPTIONAL_INT_KEYS = ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")


def _positive_int(hf: Mapping[str, Any], key: str) -> int:
    """hf[key] as an int >= 1; a float, bool, string or non-positive value is a malformed config."""
    value = hf[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config key {key}={value!r} ({type(value).__name__}); expected a positive int")
    return value


def check_hf_config(hf: Any) -> None:
    """Refuse a config dict psm-jax cannot represent exactly, naming the key and what was expected.

    Why up front: a quantized checkpoint or a string-valued size would otherwise surface later as
    a shape mismatch on some tensor, far from its cause.
    """
    if not isinstance(hf, Mapping):
        raise TypeError(f"a Hugging Face config must be a JSON object (dict); got {type(hf).__name__}")
    quant = hf.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, Mapping) else quant
        raise ValueError(f"quantized checkpoints are not supported (quantization_config.quant_method={method!r}); "
                         "expected unquantized float weights (float32, float16 or bfloat16)")
    if "model_type" not in hf:
        raise ValueError(f"config has no 'model_type' key; expected one of {sorted(_MODEL_TYPES)}")
    missing = [k for k in _REQUIRED_INT_KEYS if k not in hf]
    if missing:
        raise ValueError(f"config (model_type={hf['model_type']!r}) lacks required keys {missing}")
    for key in _REQUIRED_INT_KEYS:
        _positive_int(hf, key)
    for key in _OPTIONAL_INT_KEYS:
        if hf.get(key) is not None:
            _positive_int(hf, key)
    if hf.get("head_dim") is None and hf["hidden_size"] % hf["num_attention_heads"]:
        raise ValueError(f"hidden_size={hf['hidden_size']} is not divisible by num_attention_heads="
                         f"{hf['num_attention_heads']} and the config gives no head_dim")


def _text_config(hf):
    """A multimodal Gemma 3 config's text part (keeping its quantization_config, which check_hf_config refuses)."""
    if isinstance(hf, Mapping) and "text_config" in hf and hf.get("model_type") in ("gemma3",):
        return {**hf["text_config"], "model_type": "gemma3_text",
                **({"quantization_config": hf["quantization_config"]} if "quantization_config" in hf else {})}
    return hf


def _hf_rope(hf: Mapping[str, Any], family: str) -> tuple[RopeConfig, RopeConfig | None]:
    """(global, local) RoPE from new-style `rope_parameters` (flat, or per layer type for Gemma 3) or legacy keys;
    local is None where every layer uses the global one."""
    rp = hf.get("rope_parameters")
    default_theta = float(hf.get("rope_theta", 1_000_000.0 if family == "gemma3" else 10000.0))
    local_theta = float(hf.get("rope_local_base_freq", 10000.0))
    if isinstance(rp, Mapping) and "full_attention" in rp:
        return _rope_from(rp["full_attention"], default_theta), _rope_from(rp.get("sliding_attention"), local_theta)
    legacy = dict(hf.get("rope_scaling") or {})
    legacy.setdefault("rope_theta", default_theta)
    rope = _rope_from(rp if isinstance(rp, Mapping) else legacy, default_theta)
    return rope, RopeConfig(theta=local_theta) if family == "gemma3" else None


def _hf_sliding_layers(hf: Mapping[str, Any], family: str, n_layers: int) -> tuple[tuple[bool, ...], int | None]:
    """(which layers use sliding-window attention, the window), or ((), None) without a window: `layer_types`
    where the config lists them, else each family's fixed pattern."""
    layer_types = hf.get("layer_types")
    window = hf.get("sliding_window")
    if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        window = None
    if not window:
        return (), None
    if layer_types:
        sliding = tuple(t == "sliding_attention" for t in layer_types)
    elif family == "mistral":
        sliding = (True,) * n_layers
    elif family == "gemma2":
        sliding = tuple(i % 2 == 0 for i in range(n_layers))
    elif family == "gemma3":
        pattern = int(hf.get("sliding_window_pattern", 6))
        sliding = tuple(bool((i + 1) % pattern) for i in range(n_layers))
    else:
        sliding = ()
    return sliding, window


def _hf_activation(hf: Mapping[str, Any]) -> str:
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    act = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}.get(act)
    if act is None:
        raise ValueError(f"unsupported activation {hf.get('hidden_act')!r}; expected silu or gelu_pytorch_tanh")
    return act


def from_hf_config(hf: Mapping[str, Any]) -> ModelConfig:
    """Translate a Hugging Face config dict into a ModelConfig (raises on unsupported features)."""
    hf = _text_config(hf)
    if isinstance(hf, Mapping) and "model_type" in hf and hf["model_type"] not in _MODEL_TYPES:
        raise ValueError(
            f"unsupported architecture model_type={hf['model_type']!r}; expected one of {sorted(_MODEL_TYPES)}"
        )
    check_hf_config(hf)
    if hf.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=True is not supported; expected a causal decoder")
    family = _MODEL_TYPES[hf["model_type"]]
    d_model = hf["hidden_size"]
    n_heads = hf["num_attention_heads"]
    head_dim = int(hf.get("head_dim") or d_model // n_heads)
    n_layers = hf["num_hidden_layers"]
    gemma = family in ("gemma2", "gemma3")
    rope, rope_local = _hf_rope(hf, family)
    sliding, window = _hf_sliding_layers(hf, family, n_layers)
    act = _hf_activation(hf)
    return ModelConfig(
        family=family,
        vocab_size=int(hf["vocab_size"]),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=head_dim,
        d_mlp=int(hf["intermediate_size"]),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6 if gemma else 1e-5)),
        rope=rope,
        rope_local=rope_local,
        qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
        o_bias=family != "qwen2" and bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=family in ("qwen3", "gemma3"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        norm_offset=1.0 if gemma else 0.0,
        sandwich_norms=gemma,
        embed_scale=math.sqrt(d_model) if gemma else 1.0,
        query_scale=float(hf["query_pre_attn_scalar"]) ** -0.5 if gemma and hf.get("query_pre_attn_scalar") else None,
        attn_logit_softcap=hf.get("attn_logit_softcapping") if gemma else None,
        final_logit_softcap=hf.get("final_logit_softcapping") if gemma else None,
        activation=act,
        sliding_window=int(window) if window else None,
        sliding_layers=sliding,
        max_position=int(hf.get("max_position_embeddings", 8192)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_as_tuple(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
    )
