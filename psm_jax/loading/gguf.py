"""GGUF (llama.cpp) files -> Params + ModelConfig + HF tokenizer + chat template.

Why a loader of our own: the packaged default model ships only as a quantized GGUF, and
transformers' GGUF path builds a whole torch model first. Here every tensor is dequantized to
float32 with `gguf.quants.dequantize`, put back into Hugging Face's layout (llama.cpp permutes
the Q/K rows of llama-architecture files for its RoPE kernel, and adds 1 to Gemma's RMSNorm
weights), transposed to our `[d_in, d_out]` layout and stacked over layers, one leaf at a time,
so the load never holds much more than the final fp32 parameters in memory.

The ModelConfig is built by translating the GGUF metadata into a Hugging Face style config dict
and handing it to `psm_jax.config.from_hf_config`, so family defaults live in one place.
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from psm_jax.config import ModelConfig, from_hf_config
from psm_jax.loading.names import GGUF_NAMES, param_specs

# llama.cpp architecture name -> HF model_type understood by from_hf_config.
GGUF_ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
}
# Architectures whose converter permutes attn_q / attn_k rows (llama.cpp's LlamaModel).
_PERMUTED_QK = ("llama",)
_GEMMA = ("gemma2", "gemma3")
_NORM_LEAVES = ("final_norm", "attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "q_norm", "k_norm")
# Leaves that names.GGUF_NAMES does not list yet.
_EXTRA_GGUF_NAMES = {
    "b_gate": "blk.{i}.ffn_gate.bias",
    "b_up": "blk.{i}.ffn_up.bias",
    "b_down": "blk.{i}.ffn_down.bias",
}
_GGUF_MAGIC = b"GGUF"
_TOKENIZER_CACHE_VERSION = "1"


# --------------------------------------------------------------------------- reading


def open_gguf(path: str | os.PathLike):
    """Open a GGUF file with `gguf.GGUFReader`, turning low-level failures into one clear error.

    A truncated download is the common failure: the header parses but tensor data runs past the
    end of the file, which the reader reports (if at all) as an unrelated numpy error.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (first bytes {magic!r}, expected {_GGUF_MAGIC!r})")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # noqa: BLE001 - the reader raises many kinds on corrupt input
        raise ValueError(f"{path} could not be read as GGUF (truncated or corrupt file?): {type(e).__name__}: {e}") from e
    for t in reader.tensors:
        if t.data.nbytes != t.n_bytes:
            raise ValueError(
                f"{path} is truncated or corrupt: tensor {t.name!r} needs {t.n_bytes} bytes but only "
                f"{t.data.nbytes} are in the file"
            )
    return reader


class _Metadata:
    """Lazy access to GGUF key/values (the tokenizer arrays are large; decode only what is asked)."""

    def __init__(self, reader):
        self._reader = reader

    def __contains__(self, key: str) -> bool:
        return self._reader.get_field(key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        field = self._reader.get_field(key)
        if field is None:
            return default
        return field.contents()

    def __getitem__(self, key: str) -> Any:
        field = self._reader.get_field(key)
        if field is None:
            raise KeyError(key)
        return field.contents()


def _f32(x) -> float:
    """GGUF stores floats as float32; round back to the decimal HF configs hold (9.99999e-06 -> 1e-05)."""
    return float(f"{float(x):.7g}")


def _uniform_int(value, key: str) -> int:
    """Some GGUFs store per-layer arrays for head counts / FFN sizes; we need them uniform."""
    if isinstance(value, (list, tuple)):
        values = set(int(v) for v in value)
        if len(values) != 1:
            raise ValueError(f"GGUF key {key} varies across layers ({sorted(values)}); psm-jax needs one value")
        return values.pop()
    return int(value)


def _llama3_rope_factors(theta: float, head_dim: int, factor: float, low: float, high: float, orig: int) -> np.ndarray:
    """The per-frequency divisors Llama 3.1 RoPE scaling applies (what llama.cpp stores as rope_freqs)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (orig / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, mid))


def _rope_scaling(md: _Metadata, arch: str, tensors: dict, theta: float, head_dim: int) -> dict | None:
    """Recover HF `rope_scaling` from GGUF keys; llama3 scaling only survives as a rope_freqs tensor."""
    kind = md.get(f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in tensors:
        got = np.asarray(dequantize_tensor(tensors["rope_freqs.weight"]), np.float64).reshape(-1)
        factor = float(got.max())
        # Llama 3.x publish low=1, high=4, original context 8192; check the stored factors agree.
        want = _llama3_rope_factors(theta, head_dim, factor, 1.0, 4.0, 8192)
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-4):
            raise ValueError(
                "GGUF carries a rope_freqs.weight tensor that does not match Llama 3 RoPE scaling with "
                "low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192; not supported"
            )
        return {"rope_type": "llama3", "factor": _f32(factor), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(md[f"{arch}.rope.scaling.factor"])}
    raise ValueError(f"GGUF rope scaling type {kind!r} is not supported; expected none, linear or llama3")


def hf_config_from_gguf(md: _Metadata, tensors: dict) -> dict:
    """Translate GGUF metadata into the HF config dict `from_hf_config` expects."""
    arch = md.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; expected one of {sorted(GGUF_ARCHITECTURES)}"
        )
    a = arch
    if "token_embd.weight" not in tensors:
        raise ValueError("GGUF file has no token_embd.weight tensor")
    vocab = int(tensors["token_embd.weight"].shape[1])  # GGUF shape is [d_model, vocab]
    d_model = int(md[f"{a}.embedding_length"])
    n_layers = int(md[f"{a}.block_count"])
    n_heads = _uniform_int(md[f"{a}.attention.head_count"], f"{a}.attention.head_count")
    n_kv = _uniform_int(md.get(f"{a}.attention.head_count_kv", n_heads), f"{a}.attention.head_count_kv")
    head_dim = int(md.get(f"{a}.attention.key_length") or d_model // n_heads)
    value_dim = md.get(f"{a}.attention.value_length")
    if value_dim is not None and int(value_dim) != head_dim:
        raise ValueError(f"GGUF key_length {head_dim} != value_length {value_dim}; not supported")
    rot = md.get(f"{a}.rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise ValueError(f"partial rotary embeddings (rope.dimension_count={rot}, head_dim={head_dim}) are not supported")
    theta = _f32(md.get(f"{a}.rope.freq_base", 10000.0))
    hf: dict[str, Any] = {
        "model_type": GGUF_ARCHITECTURES[arch],
        "vocab_size": vocab,
        "hidden_size": d_model,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "intermediate_size": _uniform_int(md[f"{a}.feed_forward_length"], f"{a}.feed_forward_length"),
        "rms_norm_eps": _f32(md.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6 if arch in _GEMMA else 1e-5)),
        "rope_theta": theta,
        "max_position_embeddings": int(md.get(f"{a}.context_length", 8192)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors and arch != "qwen2",
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
    }
    eos = [md.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
    eos = list(dict.fromkeys(int(e) for e in eos if e is not None))
    hf["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
    scaling = _rope_scaling(md, a, tensors, theta, head_dim)
    if scaling:
        hf["rope_scaling"] = scaling

    window = md.get(f"{a}.attention.sliding_window")
    if arch in _GEMMA:
        hf["hidden_activation"] = "gelu_pytorch_tanh"
        hf["sliding_window"] = int(window) if window else None
        hf["attn_logit_softcapping"] = md.get(f"{a}.attn_logit_softcapping")
        hf["final_logit_softcapping"] = md.get(f"{a}.final_logit_softcapping")
        for k in ("attn_logit_softcapping", "final_logit_softcapping"):
            if hf[k] is not None:
                hf[k] = _f32(hf[k])
        scale = md.get(f"{a}.attention.scale")
        if scale:
            hf["query_pre_attn_scalar"] = _f32(1.0 / float(scale) ** 2)
        else:
            # llama.cpp hard-codes this: the 27B models scale queries by (d_model / n_heads) ** -0.5.
            big = (arch == "gemma2" and n_layers == 46) or (arch == "gemma3" and n_layers == 62)
            hf["query_pre_attn_scalar"] = d_model // n_heads if big else head_dim
        if arch == "gemma3":
            hf["rope_local_base_freq"] = _f32(md.get(f"{a}.rope.freq_base_swa", 10000.0))
            pattern = md.get(f"{a}.attention.sliding_window_pattern")
            if isinstance(pattern, (list, tuple)):
                hf["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
            elif pattern is not None:
                hf["sliding_window_pattern"] = int(pattern)
    elif window:
        raise ValueError(f"GGUF {arch} file declares sliding_window={window}; psm-jax only supports it for Gemma")
    return hf


def gguf_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a GGUF file, without dequantizing anything."""
    reader = open_gguf(path)
    return from_hf_config(hf_config_from_gguf(_Metadata(reader), {t.name: t for t in reader.tensors}))


# --------------------------------------------------------------------------- tensors


def dequantize_tensor(tensor) -> np.ndarray:
    """One GGUF tensor as float32 in torch layout ([out, in] for linear weights)."""
    import gguf

    qtype = tensor.tensor_type
    try:
        out = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError as e:
        raise ValueError(
            f"GGUF tensor {tensor.name!r} uses quantization type {qtype.name}, which gguf-py cannot dequantize"
        ) from e
    shape = tuple(int(s) for s in reversed(tensor.shape.tolist()))
    return np.asarray(out, dtype=np.float32).reshape(shape)


def check_supported(tensors: Iterable) -> None:
    """Fail before any work if a tensor's quant type cannot be dequantized."""
    import gguf

    traits = getattr(gguf.quants, "_type_traits", None)
    if traits is None:  # private in gguf-py; without it, errors surface per tensor instead
        return
    floats = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    for t in tensors:
        if t.tensor_type not in floats and t.tensor_type not in traits:
            raise ValueError(
                f"GGUF tensor {t.name!r} uses quantization type {t.tensor_type.name}, which psm-jax cannot "
                f"dequantize (supported: F32, F16, {', '.join(sorted(q.name for q in traits))})"
            )


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its RoPE pairs adjacent dims; HF pairs i and i+d/2)."""
    rows = w.shape[0]
    cols = w.shape[1] if w.ndim == 2 else 1
    out = w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
    return out.reshape(w.shape)


def _to_jax(buf: np.ndarray, dtype):
    import jax.numpy as jnp

    if np.dtype(dtype) != buf.dtype:
        buf = buf.astype(dtype)
    return jnp.asarray(buf)


def load_gguf_params(reader, config: ModelConfig, dtype=None) -> dict:
    """Dequantize a GGUF's tensors into the Params pytree for `config` (see names.py for the layout).

    Each stacked leaf is one preallocated float32 array filled layer by layer and converted to a jax
    array before the next leaf starts, so peak memory is the final params plus one leaf.
    """
    import jax.numpy as jnp

    dtype = jnp.float32 if dtype is None else dtype
    arch = _Metadata(reader).get("general.architecture")
    tensors = {t.name: t for t in reader.tensors}
    permute = arch in _PERMUTED_QK
    gemma = arch in _GEMMA
    params: dict[str, Any] = {"layers": {}}
    for spec in param_specs(config):
        template = GGUF_NAMES.get(spec.leaf) or _EXTRA_GGUF_NAMES.get(spec.leaf)
        if template is None:
            raise ValueError(f"no GGUF tensor name known for Params leaf {spec.leaf!r}")
        layers = range(config.n_layers) if spec.per_layer else [None]
        buf = np.empty(((config.n_layers,) if spec.per_layer else ()) + spec.shape, np.float32)
        for i in layers:
            name = template.format(i=i)
            if name not in tensors:
                raise ValueError(f"GGUF file lacks tensor {name!r} (needed for Params leaf {spec.leaf!r})")
            w = dequantize_tensor(tensors[name])
            if permute and spec.leaf in ("wq", "bq"):
                w = unpermute_qk(w, config.n_heads)
            elif permute and spec.leaf in ("wk", "bk"):
                w = unpermute_qk(w, config.n_kv_heads)
            if gemma and spec.leaf in _NORM_LEAVES:
                w = w - 1.0  # the Gemma converter stores 1 + w; HF (and our norm_offset) keep w
            if spec.transpose:
                w = w.T
            if w.shape != spec.shape:
                raise ValueError(
                    f"GGUF tensor {name!r} has shape {w.shape} after conversion; expected {spec.shape} for {spec.leaf!r}"
                )
            if i is None:
                buf[...] = w
            else:
                buf[i] = w
            del w
        leaf = _to_jax(buf, dtype)
        del buf
        if spec.per_layer:
            params["layers"][spec.leaf] = leaf
        else:
            params[spec.leaf] = leaf
    return params


# --------------------------------------------------------------------------- tokenizer


def cache_root() -> Path:
    """psm-jax's on-disk cache: $PSM_JAX_CACHE, else ~/.cache/psm_jax (XDG_CACHE_HOME honoured)."""
    env = os.environ.get("PSM_JAX_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "psm_jax"


def gguf_cache_key(path: str | os.PathLike) -> str:
    """A cheap content key: sha256 of the size, the first and the last MiB (hashing 100s of MB is slow)."""
    import transformers

    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    h.update(f"psm-jax-tokenizer-v{_TOKENIZER_CACHE_VERSION};transformers={transformers.__version__};size={size};".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > (1 << 20):
            f.seek(max(size - (1 << 20), 1 << 20))
            h.update(f.read(1 << 20))
    return h.hexdigest()


def load_gguf_tokenizer(path: str | os.PathLike, cache: bool = True):
    """The HF tokenizer embedded in a GGUF file.

    transformers' GGUF conversion takes seconds, so the converted tokenizer is saved once under
    `cache_root()/gguf_tokenizers/<gguf_cache_key>` (written to a temp dir, then renamed, so a
    crash or a parallel process never leaves a half-written cache) and reloaded from there.
    """
    from transformers import AutoTokenizer

    path = Path(path).resolve()
    target = cache_root() / "gguf_tokenizers" / gguf_cache_key(path) if cache else None
    if target is not None and (target / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(target))
        except Exception as e:  # noqa: BLE001 - a broken cache entry is rebuilt, never fatal
            warnings.warn(f"ignoring unreadable tokenizer cache {target}: {e}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if target is not None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
            try:
                tok.save_pretrained(str(tmp))
                if target.exists():
                    shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if not (target / "tokenizer_config.json").is_file():
                    raise
        except OSError as e:
            warnings.warn(f"could not cache the converted tokenizer under {target}: {e}")
    return tok


# --------------------------------------------------------------------------- entry point


def load_gguf(path: str | os.PathLike, dtype=None, *, tokenizer: bool = True):
    """Load a GGUF file: returns (params, config, tokenizer, chat_template).

    `dtype` is the dtype of the returned params (dequantization is always float32 first).
    `tokenizer=False` skips building the HF tokenizer (returns None for it).
    """
    reader = open_gguf(path)
    md = _Metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    config = from_hf_config(hf_config_from_gguf(md, tensors))
    check_supported(tensors.values())
    params = load_gguf_params(reader, config, dtype)
    chat_template = md.get("tokenizer.chat_template")
    del tensors, md, reader
    tok = load_gguf_tokenizer(path) if tokenizer else None
    return params, config, tok, chat_template
