"""Decoding from the KV cache: per-step monitors against a capture forward, and the cache-room contract."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psm_jax import edits as E
from psm_jax.generate import Monitor, _generate, decode, extend, generate, prefill
from psm_jax.loading.hf import load_hf_dir
from psm_jax.model import Capture, jit_forward


@pytest.fixture(scope="module")
def llama(tiny_hf):
    directory, _ = tiny_hf("llama")
    return load_hf_dir(directory)


def _reference_projections(params, config, prompt, mask, gen, site, layers, dirs, edits=()):
    """<a, d> from one forward with capture over prompt + generated tokens, at the positions that produced them."""
    p, n = prompt.shape[1], gen.tokens.shape[1]
    full = jnp.concatenate([jnp.asarray(prompt, jnp.int32), gen.tokens], axis=1)
    full_mask = jnp.concatenate([jnp.asarray(mask), jnp.ones(gen.tokens.shape, bool)], axis=1)
    out = jit_forward(params, config, full, attention_mask=full_mask, edits=tuple(edits),
                      capture=Capture(sites=(site,), layers=layers))
    acts = np.asarray(out.captured[site])[:, :, p - 1:p - 1 + n]  # [n_layers, B, n, D]
    return np.einsum("lbtd,kd->btlk", acts.astype(np.float64), np.asarray(dirs, np.float64))


def test_monitors_match_a_capture_forward(llama):
    """Monitored projections (with an edit active and a left-padded row) equal those of a separate forward with
    capture over the final sequence; a new direction set of the same shape reuses the compiled loop."""
    params, config = llama
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, config.vocab_size, (2, 7))
    mask = np.ones((2, 7), bool)
    mask[1, :2] = False
    dirs = rng.normal(size=(3, config.d_model)).astype(np.float32)
    edit = E.add(config, rng.normal(size=config.d_model).astype(np.float32), layers=[1], coef=2.0)
    mon = Monitor(directions=jnp.asarray(dirs), site="resid_post", layers=(0, 2))
    gen = generate(params, config, prompt, mask, max_new_tokens=6, eos_ids=(), edits=[edit], monitors=mon)
    assert gen.monitored.shape == (2, 6, 2, 3) and gen.monitored.dtype == jnp.float32
    ref = _reference_projections(params, config, prompt, mask, gen, "resid_post", (0, 2), dirs, [edit])
    np.testing.assert_allclose(np.asarray(gen.monitored), ref, atol=1e-4, rtol=1e-5)

    n_compiled = _generate._cache_size()
    other = rng.normal(size=(3, config.d_model)).astype(np.float32)
    again = generate(params, config, prompt, mask, max_new_tokens=6, eos_ids=(), edits=[edit],
                     monitors=mon.replace(directions=jnp.asarray(other)))
    assert _generate._cache_size() == n_compiled
    np.testing.assert_array_equal(again.tokens, gen.tokens)
    ref = _reference_projections(params, config, prompt, mask, gen, "resid_post", (0, 2), other, [edit])
    np.testing.assert_allclose(np.asarray(again.monitored), ref, atol=1e-4, rtol=1e-5)


def test_monitors_after_eos_are_zero(llama):
    params, config = llama
    prompt = np.arange(3, 9)[None]
    free = generate(params, config, prompt, max_new_tokens=6, eos_ids=())
    eos = int(free.tokens[0, 2])
    dirs = np.random.default_rng(1).normal(size=(2, config.d_model)).astype(np.float32)
    mon = Monitor(directions=jnp.asarray(dirs), site="mlp_out", layers=(1,))
    gen = generate(params, config, prompt, max_new_tokens=6, eos_ids=(eos,), pad_id=0, monitors=mon)
    n = int(gen.lengths[0])
    assert n < 6 and bool(gen.finished[0])
    ref = _reference_projections(params, config, prompt, np.ones(prompt.shape, bool), gen, "mlp_out", (1,), dirs)
    np.testing.assert_allclose(np.asarray(gen.monitored[0, :n]), ref[0, :n], atol=1e-4, rtol=1e-5)
    assert not np.any(np.asarray(gen.monitored[0, n:]))


def test_decode_checks_cache_room_and_stops_when_full_under_jit(llama):
    """Concrete caches are checked before the loop; under jit the loop stops at the last slot instead of
    overwriting it, and the tokens it did produce are those of a run with room."""
    params, config = llama
    prompt = jnp.asarray(np.random.default_rng(2).integers(0, config.vocab_size, (2, 5)), jnp.int32)
    pre = prefill(params, config, prompt, cache_size=8)  # 3 free slots: room for 4 new tokens
    with pytest.raises(ValueError, match=r"max_new_tokens=6 needs 5 free cache slots but the cache has 3"):
        decode(params, config, pre.cache, pre.logits[:, -1], max_new_tokens=6)
    with pytest.raises(ValueError, match=r"writing 4 tokens at slot 5 overflows the KV cache of 8 slots"):
        extend(params, config, pre.cache, prompt[:, :4])
    short = jax.jit(lambda c, lg: decode(params, config, c, lg, max_new_tokens=6, eos_ids=()))(
        pre.cache, pre.logits[:, -1])
    roomy = generate(params, config, prompt, max_new_tokens=6, eos_ids=())
    np.testing.assert_array_equal(np.asarray(short.lengths), [4, 4])
    assert int(short.cache.length) == 8 and not bool(jnp.any(short.finished))
    np.testing.assert_array_equal(np.asarray(short.tokens[:, :4]), np.asarray(roomy.tokens[:, :4]))
    np.testing.assert_allclose(np.asarray(short.cache.k), np.asarray(roomy.cache.k[:, :, :8]), atol=1e-5)


@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.bfloat16])
def test_a_decode_step_writes_its_slot_without_converting_the_cache(llama, cache_dtype):
    """The compiled decoding loop never converts a whole cache-shaped array: each step writes its token's K/V into
    the cache in its own dtype. (XLA's CPU backend would otherwise update a bf16 cache in f32, converting all of it
    at every layer of every step.)"""
    params, config = llama
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 6)), jnp.int32)
    pre = prefill(params, config, tokens, cache_size=10, cache_dtype=cache_dtype)
    step = jax.jit(lambda p, cache, logits: decode(p, config, cache, logits, max_new_tokens=4, eos_ids=()).tokens)
    hlo = step.lower(params, pre.cache, pre.logits[:, -1]).compile().as_text()
    shape = ",".join(str(n) for n in pre.cache.k.shape)
    converts = [line for line in hlo.splitlines() if f"[{shape}]" in line and " convert(" in line]
    assert not converts, converts[:2]
