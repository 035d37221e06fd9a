"""Bad checkpoints and configs get errors that name the problem; good ones load exactly."""
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from psm_jax.config import from_hf_config
from psm_jax.loading import load
from psm_jax.loading import hf as H
from psm_jax.loading.hf import load_hf_dir
from psm_jax.loading.names import param_specs

BASE = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=10,
            intermediate_size=32)


def _copy_with(src, dst, mutate=None, config=None):
    """A copy of checkpoint `src` in `dst` whose tensors (a name -> array dict) went through `mutate`."""
    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    if mutate:
        mutate(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    return dst


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_dir(tmp_path)


def test_unsupported_architecture_and_rope():
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        from_hf_config({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        from_hf_config({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="activation"):
        from_hf_config({**BASE, "hidden_act": "relu2"})


def test_invalid_config_values():
    with pytest.raises(TypeError, match="JSON object.*got list"):
        from_hf_config([BASE])
    with pytest.raises(ValueError, match="no 'model_type' key"):
        from_hf_config({k: v for k, v in BASE.items() if k != "model_type"})
    with pytest.raises(ValueError, match=r"lacks required keys \['hidden_size', 'num_hidden_layers'\]"):
        from_hf_config({k: v for k, v in BASE.items() if k not in ("hidden_size", "num_hidden_layers")})
    for key, bad in (("hidden_size", "64"), ("num_hidden_layers", 2.5), ("vocab_size", True), ("intermediate_size", 0),
                     ("num_key_value_heads", -2)):
        with pytest.raises(ValueError, match=f"{key}={bad!r}.*expected a positive int"):
            from_hf_config({**BASE, key: bad})
    with pytest.raises(ValueError, match="hidden_size=64 is not divisible by num_attention_heads=5"):
        from_hf_config({**BASE, "num_attention_heads": 5, "num_key_value_heads": 5})


def test_quantized_checkpoint_is_refused():
    with pytest.raises(ValueError, match="quant_method='awq'.*not supported|not supported.*quant_method='awq'"):
        from_hf_config({**BASE, "quantization_config": {"quant_method": "awq", "bits": 4}})
    gemma = {"model_type": "gemma3", "text_config": {**BASE, "model_type": "gemma3_text"},
             "quantization_config": {"quant_method": "bitsandbytes"}}
    with pytest.raises(ValueError, match="quant_method='bitsandbytes'"):
        from_hf_config(gemma)


def test_config_json_that_is_not_json(tiny_hf, tmp_path):
    src, _ = tiny_hf("llama")
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    (d / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load(d)


def test_missing_and_corrupt_weights(tiny_hf, tmp_path):
    src, _ = tiny_hf("llama")
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    (d / "model.safetensors").rename(d / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf_dir(d)
    (d / "moved.safetensors").rename(d / "model.safetensors")
    data = (d / "model.safetensors").read_bytes()
    for cut in (len(data) // 3, len(data) - 10, 5):
        (d / "model.safetensors").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="corrupt"):
            load_hf_dir(d)
    # a checkpoint whose config promises more layers than the weights hold
    shutil.copy(src / "model.safetensors", d / "model.safetensors")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"lacks 9 tensors the config needs \(n_layers=4.*'model.layers.3.input_"):
        load_hf_dir(d)


def test_unexpected_tensors_are_listed(tiny_hf, tmp_path):
    src, _ = tiny_hf("llama")

    def add_extras(t):
        t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)  # attention_bias is false
        t["score.weight"] = np.zeros((2, 64), np.float32)  # a classifier head
        t["model.layers.1.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)  # derived buffer: fine

    d = _copy_with(src, tmp_path / "extra", add_extras)
    with pytest.raises(ValueError, match=r"2 tensors the config does not account for: "
                                         r"'model.layers.0.self_attn.q_proj.bias', 'score.weight'.*ignore_unexpected"):
        load_hf_dir(d)
    params, _ = load_hf_dir(d, ignore_unexpected=True)
    ref, _ = load_hf_dir(src)
    np.testing.assert_array_equal(np.asarray(params["layers"]["wq"]), np.asarray(ref["layers"]["wq"]))
    assert "bq" not in params["layers"]


def test_nan_and_inf_weights_are_named(tiny_hf, tmp_path):
    src, _ = tiny_hf("llama")

    def poison(t):
        w = t["model.layers.2.mlp.up_proj.weight"]
        w[3, :2] = np.nan
        w[5, 7] = np.inf

    d = _copy_with(src, tmp_path / "nan", poison)
    with pytest.raises(ValueError, match=r"'model.layers.2.mlp.up_proj.weight' holds 3 NaN/inf values"):
        load(d)


def test_wrong_shape_and_dtype_are_named(tiny_hf, tmp_path):
    src, _ = tiny_hf("llama")

    def shrink(t):
        t["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"][:16]

    d = _copy_with(src, tmp_path / "shape", shrink)
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.k_proj.weight'.*shape \(16, 64\); "
                                         r"expected \(32, 64\)"):
        load_hf_dir(d)

    def to_int8(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.int8)

    d = _copy_with(src, tmp_path / "int8", to_int8)
    with pytest.raises(ValueError, match="'model.norm.weight'.*dtype I8; expected float weights"):
        load_hf_dir(d)


def _save_multifile(model, directory, dtype="float32"):
    """Save a copy of the session's shared torch model (casting it in place would round the shared weights)."""
    import copy

    import torch

    copy.deepcopy(model).to(getattr(torch, dtype)).save_pretrained(directory, max_shard_size="40KB")
    assert (directory / "model.safetensors.index.json").is_file()
    return directory


def test_multifile_index_errors(tiny_hf, tmp_path):
    _, model = tiny_hf("llama")
    d = _save_multifile(model, tmp_path / "multi")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    lost = index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (d / lost).rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(FileNotFoundError, match=f"weight files \\['{lost}'\\] listed in model.safetensors.index.json "
                                                 "are missing.*'model.layers.1.mlp.up_proj.weight'"):
        load_hf_dir(d)
    (tmp_path / "elsewhere.safetensors").rename(d / lost)
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid safetensors index"):
        load_hf_dir(d)
    wm = index["weight_map"]
    wm["model.norm.weight"] = next(f for f in sorted(set(wm.values())) if f != wm["model.norm.weight"])
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lists tensors that are not in the files it names: 'model.norm.weight'"):
        load_hf_dir(d)


def test_multifile_bf16_checkpoint_equals_torch_weights(tiny_hf, tmp_path, monkeypatch):
    """Index + several files, bf16 on disk, column blocks read in small chunks: exact torch weights."""
    import torch

    _, model = tiny_hf("llama")
    d = _save_multifile(model, tmp_path / "bf16", "bfloat16")
    ref = {k: v.to(torch.bfloat16).float().numpy() for k, v in model.state_dict().items()}
    monkeypatch.setattr(H, "_READ_CHUNK", 300)  # several chunks per block
    params, config = load_hf_dir(d)
    for spec in param_specs(config):
        names = spec.hf_names(config.n_layers)
        want = np.stack([ref[n].T if spec.transpose else ref[n] for n in names]) if spec.per_layer else \
            (ref[names[0]].T if spec.transpose else ref[names[0]])
        leaf = (params["layers"] if spec.per_layer else params)[spec.leaf]
        np.testing.assert_array_equal(np.asarray(leaf), want, err_msg=spec.leaf)
    # one block of a transposed leaf: layers 1..2, a column band and a row band of w_gate ([L, D, F])
    spec = next(s for s in param_specs(config) if s.leaf == "w_gate")
    with H.SafetensorsCheckpoint(d) as ckpt:
        block = H.read_shard(ckpt, spec, config.n_layers, (slice(1, 3), slice(16, 48), slice(64, 128)), np.float32)
        assert ckpt.bytes_read < 2 * 128 * 64 * 2  # only the needed rows (of [F, D] on disk), two layers
    np.testing.assert_array_equal(block, np.asarray(params["layers"]["w_gate"])[1:3, 16:48, 64:128])
