"""Bad inputs of the forward, generation and KV cache: each raises a clear error naming the value and what was expected.

Every case here is a row of docs/bad_inputs/port.md. The checks run on the host before anything is compiled.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psm_jax import edits as E
from psm_jax.generate import Monitor, decode, extend, generate, prefill
from psm_jax.loading.hf import load_hf_dir
from psm_jax.model import forward, jit_forward


@pytest.fixture(scope="module")
def llama(tiny_hf):
    directory, _ = tiny_hf("llama")  # vocab 256, max_position 256, 3 layers, d_model 64
    return load_hf_dir(directory)


def _tokens(config, shape=(2, 5)):
    return jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, shape), jnp.int32)


@pytest.mark.parametrize("make, kind, match", [
    (lambda c: jnp.zeros((5,), jnp.int32), ValueError, r"shape \(5,\); expected \[batch, seq\]"),
    (lambda c: jnp.zeros((2, 0), jnp.int32), ValueError, r"shape \(2, 0\); expected \[batch, seq\] with batch, seq >= 1"),
    (lambda c: jnp.zeros((2, 5), jnp.float32), TypeError, r"dtype float32; expected an integer dtype"),
    (lambda c: jnp.full((2, 5), c.vocab_size, jnp.int32), ValueError, r"id 256; expected ids in \[0, 256\)"),
    (lambda c: jnp.full((2, 5), -1, jnp.int32), ValueError, r"id -1; expected ids in \[0, 256\)"),
    (lambda c: jnp.zeros((1, c.max_position + 1), jnp.int32), ValueError,
     r"sequence length 257 exceeds the model's max_position=256"),
])
def test_bad_tokens(llama, make, kind, match):
    params, config = llama
    bad = make(config)
    for fn in (forward, jit_forward):
        with pytest.raises(kind, match=match):
            fn(params, config, bad)


def test_bad_token_ids_in_prefill_extend_generate(llama):
    params, config = llama
    bad = jnp.asarray([[1, 2, 300]], jnp.int32)
    with pytest.raises(ValueError, match=r"id 300; expected ids in \[0, 256\)"):
        prefill(params, config, bad, cache_size=8)
    with pytest.raises(ValueError, match=r"id 300; expected ids in \[0, 256\)"):
        generate(params, config, bad, max_new_tokens=2)
    pre = prefill(params, config, _tokens(config, (1, 3)), cache_size=8)
    with pytest.raises(ValueError, match=r"id 300; expected ids in \[0, 256\)"):
        extend(params, config, pre.cache, bad)


def test_bad_masks_and_edits(llama):
    params, config = llama
    tokens = _tokens(config)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\); expected \(2, 5\)"):
        forward(params, config, tokens, attention_mask=jnp.ones((2, 4), bool))
    wide = E.add(config, np.ones(config.d_model), layers=[0], positions=np.ones((2, 9), bool))
    with pytest.raises(ValueError, match=r"edit positions mask has shape \(2, 9\); expected \(2, 5\)"):
        forward(params, config, tokens, edits=[wide])
    with pytest.raises(ValueError, match=r"edit positions mask has shape \(2, 9\); expected \(2, 7\)"):
        generate(params, config, tokens, max_new_tokens=2, edits=[wide])  # mask wider than prompt + new tokens
    bad_rows = E.add(config, np.ones(config.d_model), layers=[0], positions=np.ones((3, 5), bool))
    with pytest.raises(ValueError, match=r"edit positions mask has shape \(3, 7\); expected \(2, 7\)"):
        generate(params, config, tokens, max_new_tokens=2, edits=[bad_rows])
    bad_layers = E.Add(layers=jnp.ones((5,), bool), positions=None, vector=jnp.ones(config.d_model), coef=1.0)
    with pytest.raises(ValueError, match=r"edit layer mask has shape \(5,\); expected \(3,\)"):
        forward(params, config, tokens, edits=[bad_layers])
    for fn in (lambda e: forward(params, config, tokens, edits=e),
               lambda e: generate(params, config, tokens, max_new_tokens=2, edits=e)):
        with pytest.raises(TypeError, match=r"edit 'add' is not an edit; expected psm_jax.edits objects"):
            fn(["add"])


def test_cache_overflow_and_size(llama):
    params, config = llama
    tokens = _tokens(config)
    with pytest.raises(ValueError, match=r"cache_size=4 is smaller than the prompt length 5; expected cache_size >= 5"):
        prefill(params, config, tokens, cache_size=4)
    with pytest.raises(ValueError, match=r"cache_size=8.0; expected an int >= 1"):
        prefill(params, config, tokens, cache_size=8.0)
    pre = prefill(params, config, tokens, cache_size=7)
    with pytest.raises(ValueError, match=r"writing 3 tokens at slot 5 overflows the KV cache of 7 slots; "
                                         r"expected cache.length \+ T <= cache.size"):
        extend(params, config, pre.cache, tokens[:, :3])
    with pytest.raises(ValueError, match=r"tokens have batch 1 but the KV cache has batch 2"):
        extend(params, config, pre.cache, tokens[:1, :1])
    with pytest.raises(ValueError, match=r"max_new_tokens=4 needs 3 free cache slots but the cache has 2"):
        decode(params, config, pre.cache, pre.logits[:, -1], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"max_new_tokens=0; expected an int >= 1"):
        decode(params, config, pre.cache, pre.logits[:, -1], max_new_tokens=0)


def test_positions_past_max_position(llama):
    params, config = llama
    long = _tokens(config, (1, 250))
    with pytest.raises(ValueError, match=r"prompt length 250 \+ max_new_tokens=10 exceeds the model's max_position=256"):
        generate(params, config, long, max_new_tokens=10)
    pre = prefill(params, config, long, cache_size=260)
    with pytest.raises(ValueError, match=r"7 tokens starting at position 250 exceed the model's max_position=256"):
        extend(params, config, pre.cache, long[:, :7])


@pytest.mark.parametrize("kwargs, kind, match", [
    (dict(temperature=float("nan")), ValueError, r"temperature=nan; expected a number"),
    (dict(temperature=-0.5), ValueError, r"temperature=-0.5, top_p=1.0; expected a finite temperature >= 0"),
    (dict(temperature=float("inf")), ValueError, r"temperature=inf, top_p=1.0; expected a finite temperature"),
    (dict(temperature="0.7"), TypeError, r"temperature='0.7' has type str; expected a Python or NumPy real"),
    (dict(top_p=1.5), ValueError, r"top_p=1.5; expected .*0 < top_p <= 1"),
    (dict(top_p=0.0), ValueError, r"top_p=0.0; expected .*0 < top_p <= 1"),
    (dict(top_p=float("nan")), ValueError, r"top_p=nan; expected a number"),
    (dict(top_p=True), TypeError, r"top_p=True has type bool"),
    (dict(max_new_tokens=0), ValueError, r"max_new_tokens=0; expected an int >= 1"),
    (dict(max_new_tokens=2.5), ValueError, r"max_new_tokens=2.5; expected an int >= 1"),
    (dict(eos_ids=(2, 999)), ValueError, r"eos_ids contains id 999; expected ids in \[0, 256\)"),
    (dict(eos_ids=("</s>",)), TypeError, r"eos_ids contains '</s>'; expected int token ids"),
    (dict(eos_ids=None, pad_id=-3), ValueError, r"pad_id contains id -3; expected ids in \[0, 256\)"),
    (dict(top_k=0), ValueError, r"top_k=0; expected None or an int >= 1"),
    (dict(temperature=0.7), ValueError, r"sampling \(temperature > 0\) needs an explicit PRNG key"),
])
def test_bad_generate_arguments(llama, kwargs, kind, match):
    params, config = llama
    with pytest.raises(kind, match=match):
        generate(params, config, _tokens(config), **{"max_new_tokens": 2, **kwargs})


@pytest.mark.parametrize("monitor, kind, match", [
    (lambda c: Monitor(directions=jnp.ones((2, c.d_model)), site="q", layers=(0,)), ValueError,
     r"monitor site 'q'; expected a residual-width site"),
    (lambda c: Monitor(directions=jnp.ones((2, c.d_model)), layers=(3,)), ValueError,
     r"monitor layer 3 is out of range; expected an int in \[0, 2\]"),
    (lambda c: Monitor(directions=jnp.ones((2, c.d_model)), layers=()), ValueError,
     r"monitor layers=\(\); expected a non-empty tuple"),
    (lambda c: Monitor(directions=jnp.ones((2, 10)), layers=(0,)), ValueError,
     r"monitor directions have shape \(2, 10\); expected \[n_dirs, d_model=64\]"),
    (lambda c: Monitor(directions=jnp.full((1, c.d_model), jnp.nan), layers=(0,)), ValueError,
     r"monitor directions contain NaN or inf"),
    (lambda c: jnp.ones((2, c.d_model)), TypeError, r"expected a psm_jax.generate.Monitor or None"),
])
def test_bad_monitors(llama, monitor, kind, match):
    params, config = llama
    with pytest.raises(kind, match=match):
        generate(params, config, _tokens(config), max_new_tokens=2, monitors=monitor(config))


def test_checks_leave_traced_inputs_alone(llama):
    """Under jit the value checks are skipped (documented contract), so a jitted forward still traces."""
    params, config = llama
    out = jax.jit(lambda t: forward(params, config, t).logits)(_tokens(config))
    assert out.shape == (2, 5, config.vocab_size)


def test_bad_logits_positions(llama):
    params, config = llama
    with pytest.raises(ValueError, match=r"logits_positions='first'; expected None, 'last' or positions \[B, A\]"):
        forward(params, config, _tokens(config), logits_positions="first")
    at = forward(params, config, _tokens(config), logits_positions=jnp.asarray([[1, 3], [0, 4]])).logits
    full = forward(params, config, _tokens(config)).logits
    np.testing.assert_allclose(at, np.stack([full[0, [1, 3]], full[1, [0, 4]]]), atol=1e-5)
