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

import dataclasses
import gc
import hashlib
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Mapping, NamedTuple

import numpy as np

from psm_jax.config import ModelConfig, from_hf_config
from psm_jax.loading.names import GGUF_NAMES, aligned_empty, param_specs

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
_GGUF_MAGIC = b"GGUF"
_TOKENIZER_CACHE_VERSION = "1"


# --------------------------------------------------------------------------- reading


class GGUFTensorInfo(NamedTuple):
    """Where one tensor's bytes are and how to view them (no data held)."""

    name: str
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # element shape, numpy/torch order ([out, in] for linear weights)
    storage_dtype: np.dtype  # how gguf-py views the raw bytes (uint8 for quantized types)
    storage_shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    n_bytes: int


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
    """The parsed header: scalar metadata (large tokenizer arrays left out) and tensor locations."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]


_MAX_KEPT_ARRAY = 4096  # metadata arrays longer than this are tokenizer vocabularies: not kept


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse a GGUF header with `gguf.GGUFReader`, keep what loading needs, then drop the reader.

    Why drop it: the reader makes a numpy view per vocabulary string (about 170 MB of Python
    objects for a 49k-token vocabulary). Freed before any weight is allocated, that memory does
    not add to the load's peak. A truncated download (tensor data running past the end of the
    file) is reported here as one clear error instead of an unrelated numpy one.
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
    try:
        metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if field.types and field.types[0] == gguf.GGUFValueType.ARRAY and len(field.data) > _MAX_KEPT_ARRAY:
                continue
            metadata[key] = field.contents()
        tensors: dict[str, GGUFTensorInfo] = {}
        for t in reader.tensors:
            if t.data.nbytes != t.n_bytes:
                raise ValueError(
                    f"{path} is truncated or corrupt: tensor {t.name!r} needs {t.n_bytes} bytes but only "
                    f"{t.data.nbytes} are in the file"
                )
            tensors[t.name] = GGUFTensorInfo(
                name=t.name,
                qtype=t.tensor_type,
                shape=tuple(int(s) for s in reversed(t.shape.tolist())),
                storage_dtype=t.data.dtype,
                storage_shape=tuple(t.data.shape),
                offset=int(t.data_offset),
                n_bytes=int(t.n_bytes),
            )
    finally:
        mm = getattr(reader.data, "_mmap", None)
        del reader
        gc.collect()
        if mm is not None:
            try:
                mm.close()
            except (BufferError, ValueError):
                pass
    return GGUFHeader(path=path, metadata=metadata, tensors=tensors)


def _req(md: Mapping[str, Any], key: str) -> Any:
    if key not in md:
        raise ValueError(f"GGUF metadata lacks the required key {key!r}")
    return md[key]


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


def _rope_scaling(header: GGUFHeader, arch: str, theta: float, head_dim: int) -> dict | None:
    """Recover HF `rope_scaling` from GGUF keys; llama3 scaling only survives as a rope_freqs tensor."""
    md = header.metadata
    kind = md.get(f"{arch}.rope.scaling.type")
    if "rope_freqs.weight" in header.tensors:
        got = read_tensor(header, "rope_freqs.weight").astype(np.float64).reshape(-1)
        # Llama 3.x publish low=1, high=4, original context 8192; find the factor that reproduces
        # the stored divisors (the largest one, or solved from a divisor in the smooth band).
        orig, low, high = 8192, 1.0, 4.0
        wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        smooth = (orig / wavelen - low) / (high - low)
        band = (wavelen >= orig / high) & (wavelen <= orig / low) & (smooth < 1)
        candidates = [float(got.max())] if got.size else []
        if got.shape == wavelen.shape:
            candidates += [float((1 - s_) / (1 / f_ - s_)) for s_, f_ in zip(smooth[band], got[band]) if 1 / f_ != s_]
        factor = next(
            (f_ for f_ in candidates if f_ >= 1 and got.shape == wavelen.shape
             and np.allclose(got, _llama3_rope_factors(theta, head_dim, f_, low, high, orig), rtol=1e-4, atol=1e-4)),
            None,
        )
        if factor is None:
            raise ValueError(
                "GGUF carries a rope_freqs.weight tensor that does not match Llama 3 RoPE scaling with "
                "low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192; not supported"
            )
        return {"rope_type": "llama3", "factor": float(f"{factor:.4g}"), "low_freq_factor": low,
                "high_freq_factor": high, "original_max_position_embeddings": orig}
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(_req(md, f"{arch}.rope.scaling.factor"))}
    raise ValueError(f"GGUF rope scaling type {kind!r} is not supported; expected none, linear or llama3")


def hf_config_from_gguf(header: GGUFHeader) -> dict:
    """Translate GGUF metadata into the HF config dict `from_hf_config` expects."""
    md, tensors = header.metadata, header.tensors
    arch = md.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; expected one of {sorted(GGUF_ARCHITECTURES)}"
        )
    a = arch
    if "token_embd.weight" not in tensors:
        raise ValueError("GGUF file has no token_embd.weight tensor")
    d_model = int(_req(md, f"{a}.embedding_length"))
    n_layers = int(_req(md, f"{a}.block_count"))
    n_heads, n_kv, head_dim = _gguf_heads(md, a, d_model)
    theta = _f32(md.get(f"{a}.rope.freq_base", 10000.0))
    hf: dict[str, Any] = {
        "model_type": GGUF_ARCHITECTURES[arch],
        "vocab_size": int(tensors["token_embd.weight"].shape[0]),  # [vocab, d_model]
        "hidden_size": d_model,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "intermediate_size": _uniform_int(_req(md, f"{a}.feed_forward_length"), f"{a}.feed_forward_length"),
        "rms_norm_eps": _f32(md.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6 if arch in _GEMMA else 1e-5)),
        "rope_theta": theta,
        "max_position_embeddings": int(md.get(f"{a}.context_length", 8192)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors and arch != "qwen2",
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
        "eos_token_id": _gguf_eos(md),
    }
    scaling = _rope_scaling(header, a, theta, head_dim)
    if scaling:
        hf["rope_scaling"] = scaling
    window = md.get(f"{a}.attention.sliding_window")
    if arch in _GEMMA:
        hf.update(_gemma_fields(md, a, window, n_heads, n_layers, head_dim, d_model))
    elif window:
        raise ValueError(f"GGUF {arch} file declares sliding_window={window}; psm-jax only supports it for Gemma")
    return hf


def _gguf_heads(md: dict, a: str, d_model: int) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim), refusing what the port does not run: per-layer head counts,
    values of another width than keys, partial rotary embeddings."""
    n_heads = _uniform_int(_req(md, f"{a}.attention.head_count"), f"{a}.attention.head_count")
    n_kv = _uniform_int(md.get(f"{a}.attention.head_count_kv", n_heads), f"{a}.attention.head_count_kv")
    head_dim = int(md.get(f"{a}.attention.key_length") or d_model // n_heads)
    value_dim = md.get(f"{a}.attention.value_length")
    if value_dim is not None and int(value_dim) != head_dim:
        raise ValueError(f"GGUF key_length {head_dim} != value_length {value_dim}; not supported")
    rot = md.get(f"{a}.rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise ValueError(f"partial rotary embeddings (rope.dimension_count={rot}, head_dim={head_dim}) "
                         "are not supported")
    return n_heads, n_kv, head_dim


def _gguf_eos(md: dict):
    """The end-of-sequence id, or the list of them (EOS, end-of-turn, end-of-message, without repeats), or None."""
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    eos = list(dict.fromkeys(int(md[k]) for k in keys if md.get(k) is not None))
    return eos[0] if len(eos) == 1 else (eos or None)


def _gemma_fields(md: dict, a: str, window, n_heads: int, n_layers: int, head_dim: int, d_model: int) -> dict:
    """The Gemma 2 / 3 settings of the HF config: activation, sliding window and its layer pattern, soft-caps,
    query scale, local RoPE base."""
    out: dict[str, Any] = {"hidden_activation": "gelu_pytorch_tanh", "sliding_window": int(window) if window else None}
    for k in ("attn_logit_softcapping", "final_logit_softcapping"):
        cap = md.get(f"{a}.{k}")
        out[k] = None if cap is None else _f32(cap)
    scale = md.get(f"{a}.attention.scale")
    if scale:
        out["query_pre_attn_scalar"] = _f32(1.0 / float(scale) ** 2)
    else:
        # llama.cpp hard-codes this: the 27B models scale queries by (d_model / n_heads) ** -0.5.
        big = (a == "gemma2" and n_layers == 46) or (a == "gemma3" and n_layers == 62)
        out["query_pre_attn_scalar"] = d_model // n_heads if big else head_dim
    if a == "gemma3":
        out["rope_local_base_freq"] = _f32(md.get(f"{a}.rope.freq_base_swa", 10000.0))
        pattern = md.get(f"{a}.attention.sliding_window_pattern")
        if isinstance(pattern, (list, tuple)):
            out["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
        elif pattern is not None:
            out["sliding_window_pattern"] = int(pattern)
    return out


def gguf_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a GGUF file, without dequantizing anything."""
    return from_hf_config(hf_config_from_gguf(read_gguf_header(path)))


# --------------------------------------------------------------------------- tensors


def dequantize(name: str, qtype, raw: np.ndarray) -> np.ndarray:
    """Dequantize raw GGUF storage to float32; an unsupported quant type names the tensor."""
    import gguf

    try:
        out = gguf.quants.dequantize(raw, qtype)
    except NotImplementedError as e:
        raise ValueError(
            f"GGUF tensor {name!r} uses quantization type {qtype.name}, which gguf-py cannot dequantize"
        ) from e
    return np.asarray(out, dtype=np.float32)


def read_tensor(header: GGUFHeader, name: str, f: BinaryIO | None = None) -> np.ndarray:
    """One tensor as float32 in torch layout ([out, in] for linear weights), read with plain file I/O.

    File reads instead of a memory map keep the file's pages out of this process's RSS.
    """
    info = header.tensors[name]
    if f is None:
        with open(header.path, "rb") as fh:
            return read_tensor(header, name, fh)
    f.seek(info.offset)
    count = int(np.prod(info.storage_shape)) if info.storage_shape else 1
    raw = np.fromfile(f, dtype=info.storage_dtype, count=count)
    if raw.nbytes != info.n_bytes:
        raise ValueError(f"{header.path} is truncated: tensor {name!r} is incomplete")
    out = dequantize(name, info.qtype, raw.reshape(info.storage_shape))
    return out.reshape(info.shape)


def check_supported(header: GGUFHeader) -> None:
    """Fail before any work if a tensor's quant type cannot be dequantized."""
    import gguf

    traits = getattr(gguf.quants, "_type_traits", None)
    if traits is None:  # private in gguf-py; without it, errors surface per tensor instead
        return
    floats = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    for t in header.tensors.values():
        if t.qtype not in floats and t.qtype not in traits:
            raise ValueError(
                f"GGUF tensor {t.name!r} uses quantization type {t.qtype.name}, which psm-jax cannot "
                f"dequantize (supported: F32, F16, {', '.join(sorted(q.name for q in traits))})"
            )


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its RoPE pairs adjacent dims; HF pairs i and i+d/2)."""
    rows = w.shape[0]
    cols = w.shape[1] if w.ndim == 2 else 1
    out = w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
    return out.reshape(w.shape)


def _to_jax(buf: np.ndarray, dtype):
    """numpy -> jax. `device_put` of an aligned float32 buffer aliases it on CPU (no second copy)."""
    import jax

    if np.dtype(dtype) != buf.dtype:
        buf = buf.astype(dtype)
    return jax.device_put(buf)


def load_gguf_params(header: GGUFHeader, config: ModelConfig, dtype=None) -> dict:
    """Dequantize a GGUF's tensors into the Params pytree for `config` (see names.py for the layout).

    Each stacked leaf is one preallocated float32 array filled layer by layer and handed to jax
    before the next leaf starts, so peak memory is the final params plus one layer's temporaries.
    """
    import jax.numpy as jnp

    dtype = jnp.float32 if dtype is None else dtype
    arch = header.metadata.get("general.architecture")
    permute = arch in _PERMUTED_QK
    gemma = arch in _GEMMA

    def convert(spec, name: str, f) -> np.ndarray:
        leaf = spec.leaf
        if name not in header.tensors:
            raise ValueError(f"GGUF file lacks tensor {name!r} (needed for Params leaf {leaf!r})")
        w = read_tensor(header, name, f)
        if permute and leaf in ("wq", "bq"):
            w = unpermute_qk(w, config.n_heads)
        elif permute and leaf in ("wk", "bk"):
            w = unpermute_qk(w, config.n_kv_heads)
        if gemma and leaf in _NORM_LEAVES:
            w -= 1.0  # the Gemma converter stores 1 + w; HF (and our norm_offset) keep w
        return w.T if spec.transpose else w

    params: dict[str, Any] = {"layers": {}}
    with open(header.path, "rb") as f:
        for spec in param_specs(config):
            template = GGUF_NAMES.get(spec.leaf)
            if template is None:
                raise ValueError(f"no GGUF tensor name known for Params leaf {spec.leaf!r}")
            if spec.per_layer:
                buf = aligned_empty((config.n_layers,) + spec.shape)
                for i in range(config.n_layers):
                    name = template.format(i=i)
                    w = convert(spec, name, f)
                    _check_shape(name, spec, w)
                    buf[i] = w
                    del w
            else:
                name = template.format(i=0)
                w = convert(spec, name, f)
                _check_shape(name, spec, w)
                buf = aligned_empty(spec.shape)
                buf[...] = w
                del w
            leaf = _to_jax(buf, dtype)
            del buf
            if spec.per_layer:
                params["layers"][spec.leaf] = leaf
            else:
                params[spec.leaf] = leaf
    return params


def _check_shape(name: str, spec, w: np.ndarray) -> None:
    if w.shape != spec.shape:
        raise ValueError(
            f"GGUF tensor {name!r} has shape {w.shape} after conversion; expected {spec.shape} for {spec.leaf!r}"
        )


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
    `tokenizer=False` skips building the HF tokenizer (None is returned for it, as for files
    without a vocabulary). The tokenizer is
    built before the weights so its transient memory is freed before the params exist.
    """
    header = read_gguf_header(path)
    config = from_hf_config(hf_config_from_gguf(header))
    check_supported(header)
    has_vocab = "tokenizer.ggml.model" in header.metadata
    tok = load_gguf_tokenizer(path) if tokenizer and has_vocab else None
    params = load_gguf_params(header, config, dtype)
    return params, config, tok, header.metadata.get("tokenizer.chat_template")
