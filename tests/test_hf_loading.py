"""Bad checkpoints and configs get errors that name the problem."""
import json
import shutil

import pytest

from psm_jax.config import from_hf_config
from psm_jax.loading.hf import load_hf_dir


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_dir(tmp_path)


def test_unsupported_architecture_and_rope():
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        from_hf_config({"model_type": "gpt2"})
    base = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=10,
                intermediate_size=32)
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="activation"):
        from_hf_config({**base, "hidden_act": "relu2"})


def test_missing_and_corrupt_weights(tiny_hf, tmp_path):
    src, _ = tiny_hf("llama")
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    (d / "model.safetensors").rename(d / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf_dir(d)
    (d / "moved.safetensors").rename(d / "model.safetensors")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="corrupt"):
        load_hf_dir(d)
    # a checkpoint whose config promises more layers than the weights hold
    shutil.copy(src / "model.safetensors", d / "model.safetensors")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KeyError, match="model.layers.3"):
        load_hf_dir(d)
