"""Session fixtures for the packaged default model, and a writer of tiny GGUF files.

Import the fixtures into tests/conftest.py (`from fixtures_assets import smollm2, smollm2_tokenizer`).
The loads are memoised at module level as well, so a test module that also imports the fixtures
does not load the model a second time.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest


def _require_smollm2() -> Path:
    from psm_jax.loading import registry

    try:
        return registry.resolve("smollm2-135m-instruct")
    except FileNotFoundError as e:
        pytest.skip(str(e))


@functools.lru_cache(maxsize=None)
def _load_smollm2():
    from psm_jax.loading import load

    return load("smollm2-135m-instruct")


@functools.lru_cache(maxsize=None)
def _load_smollm2_tokenizer():
    if _load_smollm2.cache_info().currsize:
        return _load_smollm2().tokenizer
    from psm_jax.loading.gguf import load_gguf_tokenizer

    return load_gguf_tokenizer(_require_smollm2())


@functools.lru_cache(maxsize=None)
def random_smollm2_chat_model(n_layers: int, seed: int = 0):
    """A LoadedModel: random llama (d_model 16, `n_layers` layers) with SmolLM2's vocabulary, tokenizer and chat
    template; fast, its outputs are noise. Skips the test when the packaged SmolLM2 is missing."""
    import jax.numpy as jnp

    from psm_jax.config import ModelConfig
    from psm_jax.loading import LoadedModel
    from psm_jax.loading.names import param_specs

    _require_smollm2()
    tok = _load_smollm2_tokenizer()
    cfg = ModelConfig(family="llama", vocab_size=49152, d_model=16, n_layers=n_layers, n_heads=2, n_kv_heads=1,
                      head_dim=8, d_mlp=32, tie_embeddings=True, eos_token_ids=(2,), pad_token_id=2)
    rng = np.random.default_rng(seed)
    params, layers = {}, {}
    for spec in param_specs(cfg):
        shape = ((cfg.n_layers,) if spec.per_layer else ()) + spec.shape
        x = np.ones(shape) if "norm" in spec.leaf else rng.normal(0, 0.3 if spec.leaf == "embed" else 0.2, shape)
        (layers if spec.per_layer else params)[spec.leaf] = jnp.asarray(x, jnp.float32)
    params["layers"] = layers
    return LoadedModel(params=params, config=cfg, tokenizer=tok, chat_template=tok.chat_template, source="tiny")


@pytest.fixture(scope="session")
def smollm2():
    """LoadedModel of SmolLM2-135M-Instruct (float32), loaded once per test session."""
    _require_smollm2()
    return _load_smollm2()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The SmolLM2 HF tokenizer (built from the GGUF, cached on disk); does not load the weights."""
    _require_smollm2()
    return _load_smollm2_tokenizer()


# --------------------------------------------------------------------------- tiny GGUF files


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row permutation llama.cpp's converter applies to llama Q/K weights (HF -> GGUF)."""
    rows = w.shape[0]
    cols = w.shape[1] if w.ndim == 2 else 1
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(
    path,
    arch: str = "llama",
    *,
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int = 8,
    d_mlp: int = 64,
    vocab: int = 48,
    tied: bool = True,
    rope_scaling: dict | None = None,
    weight_qtype=None,
    extra_kv: dict | None = None,
    rope_freqs: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Write a random tiny model as GGUF, the way llama.cpp's converter lays it out.

    Returns the HF-layout tensors (torch [out, in] order, HF norm convention), keyed by HF name,
    that a correct loader must recover. `weight_qtype` stores the 2-D weights in that quant type
    (raw bytes; for testing rejection of unsupported types).
    """
    import gguf

    rng = np.random.default_rng(seed)
    gemma = arch in ("gemma2", "gemma3")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_context_length(256)
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(d_mlp)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6 if gemma else 1e-5)
    w.add_rope_freq_base(10000.0)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if gemma:
        w.add_sliding_window(16)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
    if rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling["type"]))
        w.add_rope_scaling_factor(rope_scaling["factor"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for k, v in (extra_kv or {}).items():
        w.add_string(k, v) if isinstance(v, str) else w.add_uint32(k, v)

    hf: dict[str, np.ndarray] = {}
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))

    def add(gname: str, hname: str, value: np.ndarray, stored: np.ndarray | None = None, quant: bool = False):
        hf[hname] = value.astype(np.float32)
        data = (value if stored is None else stored).astype(np.float32)
        if quant and weight_qtype is not None:
            block, size = gguf.GGML_QUANT_SIZES[weight_qtype]
            rows, cols = data.shape
            raw = rng.integers(0, 255, size=(rows, cols // block * size), dtype=np.uint8)
            w.add_tensor(gname, raw, raw_shape=(rows, cols // block * size), raw_dtype=weight_qtype)
        else:
            w.add_tensor(gname, data)

    def norm(n):
        v = rng.normal(0, 0.1, n).astype(np.float32)
        return v, (v + 1 if gemma else v)

    q, kv = n_heads * head_dim, n_kv_heads * head_dim
    add("token_embd.weight", "model.embed_tokens.weight", rng.normal(size=(vocab, d_model)))
    for i in range(n_layers):
        p, h = f"blk.{i}.", f"model.layers.{i}."
        v, s = norm(d_model)
        add(p + "attn_norm.weight", h + "input_layernorm.weight", v, s)
        wq, wk = rng.normal(size=(q, d_model)), rng.normal(size=(kv, d_model))
        perm = arch == "llama"
        add(p + "attn_q.weight", h + "self_attn.q_proj.weight", wq, llamacpp_permute(wq, n_heads) if perm else None, True)
        add(p + "attn_k.weight", h + "self_attn.k_proj.weight", wk, llamacpp_permute(wk, n_kv_heads) if perm else None, True)
        add(p + "attn_v.weight", h + "self_attn.v_proj.weight", rng.normal(size=(kv, d_model)), quant=True)
        add(p + "attn_output.weight", h + "self_attn.o_proj.weight", rng.normal(size=(d_model, q)), quant=True)
        if arch == "qwen2":
            add(p + "attn_q.bias", h + "self_attn.q_proj.bias", rng.normal(size=q))
            add(p + "attn_k.bias", h + "self_attn.k_proj.bias", rng.normal(size=kv))
            add(p + "attn_v.bias", h + "self_attn.v_proj.bias", rng.normal(size=kv))
        if arch in ("qwen3", "gemma3"):
            v, s = norm(head_dim)
            add(p + "attn_q_norm.weight", h + "self_attn.q_norm.weight", v, s)
            v, s = norm(head_dim)
            add(p + "attn_k_norm.weight", h + "self_attn.k_norm.weight", v, s)
        if gemma:
            v, s = norm(d_model)
            add(p + "post_attention_norm.weight", h + "post_attention_layernorm.weight", v, s)
            v, s = norm(d_model)
            add(p + "ffn_norm.weight", h + "pre_feedforward_layernorm.weight", v, s)
            v, s = norm(d_model)
            add(p + "post_ffw_norm.weight", h + "post_feedforward_layernorm.weight", v, s)
        else:
            v, s = norm(d_model)
            add(p + "ffn_norm.weight", h + "post_attention_layernorm.weight", v, s)
        add(p + "ffn_gate.weight", h + "mlp.gate_proj.weight", rng.normal(size=(d_mlp, d_model)), quant=True)
        add(p + "ffn_up.weight", h + "mlp.up_proj.weight", rng.normal(size=(d_mlp, d_model)), quant=True)
        add(p + "ffn_down.weight", h + "mlp.down_proj.weight", rng.normal(size=(d_model, d_mlp)), quant=True)
    v, s = norm(d_model)
    add("output_norm.weight", "model.norm.weight", v, s)
    if not tied:
        add("output.weight", "lm_head.weight", rng.normal(size=(vocab, d_model)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf
