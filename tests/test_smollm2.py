"""The packaged default model against transformers' own GGUF load of the same file."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from psm_jax.generate import extend, generate, prefill
from psm_jax.model import jit_forward

pytestmark = pytest.mark.parity  # compared with Hugging Face torch

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Give me two tips for sleeping well."]


def _chat_ids(tok, text):
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return list(ids)


def test_logits_match_transformers_gguf_load(smollm2_model, smollm2_hf):
    m = smollm2_model
    ids = _chat_ids(m.tokenizer, PROMPTS[0])
    with torch.no_grad():
        ref = smollm2_hf(torch.tensor([ids])).logits[0].numpy()
    ours = np.asarray(jit_forward(m.params, m.config, jnp.asarray([ids], jnp.int32)).logits[0])
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)


@pytest.mark.slow  # about 40 s on a quiet 2-core machine; CI runs it in the bounded slow step
def test_greedy_generation_matches_hf_generate(smollm2_model, smollm2_hf):
    m = smollm2_model
    for text in PROMPTS:
        ids = _chat_ids(m.tokenizer, text)
        with torch.no_grad():
            ref = smollm2_hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(ids):].numpy()
        gen = generate(m.params, m.config, np.asarray([ids]), max_new_tokens=32, eos_ids=())
        np.testing.assert_array_equal(np.asarray(gen.tokens[0]), ref, err_msg=text)
    answer = m.tokenizer.decode(np.asarray(generate(m.params, m.config, np.asarray([_chat_ids(
        m.tokenizer, PROMPTS[0])]), max_new_tokens=12).tokens[0]))
    assert "Paris" in answer


def test_cached_decoding_equals_full_recompute(smollm2_model):
    m = smollm2_model
    ids = jnp.asarray([_chat_ids(m.tokenizer, PROMPTS[1])], jnp.int32)
    full = jit_forward(m.params, m.config, ids).logits[0]
    t0 = ids.shape[1] - 4
    out = prefill(m.params, m.config, ids[:, :t0], cache_size=ids.shape[1])
    np.testing.assert_allclose(out.logits[0, -1], full[t0 - 1], atol=1e-4)
    cache = out.cache
    for t in range(t0, ids.shape[1]):
        step = extend(m.params, m.config, cache, ids[:, t:t + 1])
        cache = step.cache
        np.testing.assert_allclose(step.logits[0, -1], full[t], atol=1e-4)
