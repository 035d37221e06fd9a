"""HF export: every tiny family, with a non-trivial LoRA adapter merged, loads in transformers with psm-jax's
logits (1e-4) and back into psm-jax with the same params; bf16 exports merge in fp32; bad configs are named."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import psm_jax
from psm_jax.export import save_hf, to_hf_config
from psm_jax.finetune.adapters import LoraConfig, init_adapters, merge_adapters
from psm_jax.model import jit_forward
from tests.tiny_models import VARIANTS


def _random_adapters(params, config, lora, seed=0):
    """Adapters with B drawn at random (a fresh adapter's B is zero and would merge to nothing)."""
    adapters = init_adapters(jax.random.PRNGKey(seed), params, config, lora)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(adapters))
    return {leaf: {"a": ab["a"], "b": 0.2 * jax.random.normal(k, ab["b"].shape)}
            for k, (leaf, ab) in zip(keys, sorted(adapters.items()))}


def _hf_logits(folder, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


@pytest.mark.parity
@pytest.mark.parametrize("name", list(VARIANTS))
def test_merged_lora_export_matches_transformers_and_reloads(name, tiny_hf, tmp_path):
    folder, _ = tiny_hf(name)
    model = psm_jax.load(folder)
    params, config = model.params, model.config
    lora = LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"),
                      layers=tuple(range(1, config.n_layers)))
    adapters = _random_adapters(params, config, lora)
    out = save_hf(params, config, tmp_path / "export", adapters=adapters, lora=lora)

    merged = merge_adapters(params, adapters, config, lora)
    back = psm_jax.load(out)
    assert back.config == config or to_hf_config(back.config) == to_hf_config(config)
    for path, leaf in jax.tree_util.tree_flatten_with_path(merged)[0]:
        got = back.params
        for p in path:
            got = got[p.key]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(leaf), err_msg=jax.tree_util.keystr(path))
    # layer 0 has no adapter; the others moved
    np.testing.assert_array_equal(np.asarray(merged["layers"]["wq"][0]), np.asarray(params["layers"]["wq"][0]))
    assert float(jnp.max(jnp.abs(merged["layers"]["w_down"][1] - params["layers"]["w_down"][1]))) > 1e-2

    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 12)).astype(np.int32)
    ours = np.asarray(jit_forward(merged, config, tokens).logits)
    np.testing.assert_allclose(_hf_logits(out, tokens), ours, atol=1e-4, rtol=1e-4)
    base = np.asarray(jit_forward(params, config, tokens).logits)
    assert np.max(np.abs(ours - base)) > 1e-2  # the adapter changed the model the export carries


def test_bf16_export_merges_in_float32_then_casts(tiny_hf, tmp_path):
    model = psm_jax.load(tiny_hf("llama")[0])
    params, config = model.params, model.config
    lora = LoraConfig(rank=2, alpha=2.0, targets=("down",))
    adapters = _random_adapters(params, config, lora)
    adapters = {"w_down": {"a": adapters["w_down"]["a"], "b": 1e-3 * adapters["w_down"]["b"]}}
    out = save_hf(params, config, tmp_path / "bf16", adapters=adapters, lora=lora, dtype=jnp.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    got = psm_jax.load(out, dtype=jnp.bfloat16).params["layers"]["w_down"]
    once = merge_adapters(params, adapters, config, lora)["layers"]["w_down"].astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(once.astype(jnp.float32)))
    bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    twice = merge_adapters(bf16_params, adapters, config, lora)["layers"]["w_down"]  # rounded before the merge
    assert not np.array_equal(np.asarray(twice.astype(jnp.float32)), np.asarray(once.astype(jnp.float32)))


@pytest.mark.parity
def test_orthogonalized_weights_export_with_tokenizer(tiny_chat_model, tmp_path):
    from transformers import AutoTokenizer

    from psm_jax.weights import orthogonalize

    m = tiny_chat_model
    direction = np.random.default_rng(0).normal(size=m.config.d_model).astype(np.float32)
    params, config = orthogonalize(m.params, m.config, direction)
    out = save_hf(params, config, tmp_path / "ortho", tokenizer=m.tokenizer)
    assert AutoTokenizer.from_pretrained(str(out)).encode("hello there") == m.tokenizer.encode("hello there")
    tokens = np.asarray([m.tokenizer.encode("The cat sat on the mat")], np.int32)
    np.testing.assert_allclose(_hf_logits(out, tokens), np.asarray(jit_forward(params, config, tokens).logits),
                               atol=1e-4, rtol=1e-4)


def test_unrepresentable_config_is_refused_naming_the_field(tiny_chat_model):
    import dataclasses

    bad = dataclasses.replace(tiny_chat_model.config, norm_offset=1.0)
    with pytest.raises(ValueError, match="norm_offset=1.0"):
        to_hf_config(bad)


def test_existing_folder_and_failed_write_leave_the_target_alone(tiny_hf, tmp_path):
    model = psm_jax.load(tiny_hf("qwen2")[0])
    out = save_hf(model.params, model.config, tmp_path / "m")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        save_hf(model.params, model.config, out)

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_hf(model.params, model.config, out, tokenizer=BrokenTokenizer(), overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary sibling left behind
    with pytest.raises(ValueError, match="lack leaf 'wq'"):
        save_hf({**model.params, "layers": {k: v for k, v in model.params["layers"].items() if k != "wq"}},
                model.config, tmp_path / "n")
