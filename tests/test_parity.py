"""Numerical parity with the transformers (torch) reference for every supported family."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from psm_jax.loading.hf import load_hf_dir
from psm_jax.model import Capture, jit_forward
from tests.tiny_models import VARIANTS

pytestmark = pytest.mark.parity  # compared with Hugging Face torch

SEQ = 20  # longer than the sliding windows (8) of the windowed variants
SITES = ("resid_pre", "attn_in", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post", "q_prerope", "v")
TOL = 1e-4


def _reference(model, tokens, mask):
    """Logits and per-site activations from the torch model, via hidden_states and module hooks."""
    gemma = model.config.model_type.startswith("gemma")
    grabbed = {k: [] for k in SITES if k not in ("resid_pre", "resid_post", "resid_mid")}
    hooks = []

    def keep(name, reshape_heads=False):
        def hook(_mod, _inp, out):
            out = out[0] if isinstance(out, tuple) else out
            if out.ndim == 4 and out.shape[1] == model.config.num_attention_heads and out.shape[2] == SEQ:
                out = out.transpose(1, 2)  # some families norm q in [B, H, T, hd]
            if reshape_heads:
                out = out.reshape(*out.shape[:2], -1, model.config.head_dim if hasattr(model.config, "head_dim")
                                  and model.config.head_dim else model.config.hidden_size
                                  // model.config.num_attention_heads)
            grabbed[name].append(out.detach().numpy())
        return hook

    for layer in model.model.layers:
        attn = layer.self_attn
        hooks.append(layer.input_layernorm.register_forward_hook(keep("attn_in")))
        hooks.append((layer.post_attention_layernorm if gemma else attn).register_forward_hook(keep("attn_out")))
        hooks.append((layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm)
                     .register_forward_hook(keep("mlp_in")))
        hooks.append((layer.post_feedforward_layernorm if gemma else layer.mlp).register_forward_hook(keep("mlp_out")))
        if hasattr(attn, "q_norm"):
            hooks.append(attn.q_norm.register_forward_hook(keep("q_prerope")))
        else:
            hooks.append(attn.q_proj.register_forward_hook(keep("q_prerope", True)))
        hooks.append(attn.v_proj.register_forward_hook(keep("v", True)))
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                    position_ids=torch.tensor(pos), output_hidden_states=True)
    for h in hooks:
        h.remove()
    hs = [x.numpy() for x in out.hidden_states]
    L = len(model.model.layers)
    ref = {k: np.stack(v) for k, v in grabbed.items()}
    ref["resid_pre"] = np.stack(hs[:L])
    ref["resid_post"] = np.stack(hs[1:L]) if L > 1 else None
    ref["resid_mid"] = ref["resid_pre"] + ref["attn_out"]
    return out.logits.numpy(), ref


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_matches_transformers(tiny_hf, name):
    directory, model = tiny_hf(name)
    params, config = load_hf_dir(directory)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, config.vocab_size, (2, SEQ)).astype(np.int32)
    mask = np.ones((2, SEQ), bool)
    mask[1, :5] = False  # left padding in the second row
    logits_ref, ref = _reference(model, tokens, mask)
    out = jit_forward(params, config, jnp.asarray(tokens), attention_mask=jnp.asarray(mask),
                      capture=Capture(sites=SITES))
    valid = mask[None, :, :, None]
    np.testing.assert_allclose(np.asarray(out.logits)[mask], logits_ref[mask], atol=TOL, rtol=0)
    assert np.abs(logits_ref[mask]).max() > 0.05  # the comparison is not trivially of zeros
    for site in SITES:
        ours = np.asarray(out.captured[site])
        if site == "resid_post":
            ours = ours[:-1]  # HF's last hidden state has the final norm applied
        theirs = ref[site]
        if ours.ndim == 5:
            ours = ours.reshape(*ours.shape[:3], -1)
            theirs = theirs.reshape(*theirs.shape[:3], -1)
        sel = np.broadcast_to(valid, ours.shape)
        np.testing.assert_allclose(ours[sel], theirs[sel], atol=TOL, rtol=1e-5, err_msg=f"{name}:{site}")


def test_capture_subset_of_layers(tiny_hf):
    directory, _ = tiny_hf("llama")
    params, config = load_hf_dir(directory)
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    full = jit_forward(params, config, tokens, capture=Capture(sites=("resid_post",)))
    part = jit_forward(params, config, tokens, capture=Capture(sites=("resid_post",), layers=(2, 0)))
    assert set(part.captured) == {"resid_post"}
    np.testing.assert_array_equal(part.captured["resid_post"], full.captured["resid_post"][jnp.array([2, 0])])
    # a subset goes through carried buffers: any order, repeats, and several sites of different shapes
    sites = ("resid_post", "q", "mlp_out")
    every = jit_forward(params, config, tokens, capture=Capture(sites=sites))
    some = jit_forward(params, config, tokens, capture=Capture(sites=sites, layers=(1, 1, 0)))
    for s in sites:
        np.testing.assert_array_equal(some.captured[s], every.captured[s][jnp.array([1, 1, 0])])
    np.testing.assert_array_equal(some.logits, every.logits)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_forward_over_a_layer_range_continues_the_residual_stream(tiny_hf, name):
    """Layers [0, a) then [a, L) from the returned residual: the residual equals transformers' hidden_states[a],
    the logits its logits, with and without a KV cache that the two ranges fill together; captures inside the
    range come back at their absolute layers."""
    from psm_jax.generate import prefill

    directory, model = tiny_hf(name)
    params, config = load_hf_dir(directory)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, config.vocab_size, (2, SEQ)).astype(np.int32)
    mask = np.ones((2, SEQ), bool)
    mask[1, :4] = False
    logits_ref, ref = _reference(model, tokens, mask)
    t, m = jnp.asarray(tokens), jnp.asarray(mask)
    a = config.n_layers - 1
    low = jit_forward(params, config, t, attention_mask=m, stop_layer=a)
    assert low.logits is None
    np.testing.assert_allclose(np.asarray(low.residual)[mask], ref["resid_pre"][a][mask], atol=TOL, rtol=1e-5)
    high = jit_forward(params, config, t, attention_mask=m, start_layer=a, residual=low.residual,
                       capture=Capture(sites=("resid_pre",), layers=(a,)))
    np.testing.assert_allclose(np.asarray(high.logits)[mask], logits_ref[mask], atol=TOL, rtol=1e-5)
    np.testing.assert_array_equal(high.captured["resid_pre"][0], low.residual)

    whole = prefill(params, config, t, m, cache_size=SEQ + 4)
    from psm_jax.model import forward, init_cache

    empty = init_cache(config, 2, SEQ + 4, whole.cache.k.dtype)
    first = forward(params, config, t, attention_mask=m, cache=empty, stop_layer=a)
    # the upper range writes the same slots: it starts from the lower range's K/V with the empty cache's bookkeeping
    second = forward(params, config, t, attention_mask=m, start_layer=a, residual=first.residual,
                     cache=empty.replace(k=first.cache.k, v=first.cache.v), logits_positions="last")
    np.testing.assert_allclose(second.logits, whole.logits, atol=TOL, rtol=1e-5)
    np.testing.assert_allclose(second.cache.k, whole.cache.k, atol=TOL, rtol=1e-5)
    np.testing.assert_array_equal(second.cache.length, whole.cache.length)


def test_layer_range_bad_inputs(tiny_hf):
    from psm_jax import edits as E

    directory, _ = tiny_hf("llama")
    params, config = load_hf_dir(directory)
    t = jnp.zeros((1, 4), jnp.int32)
    h = jnp.zeros((1, 4, config.d_model))
    with pytest.raises(ValueError, match=r"layer range \[2, 2\); expected 0 <= start_layer < stop_layer"):
        jit_forward(params, config, t, start_layer=2, stop_layer=2, residual=h)
    with pytest.raises(ValueError, match="start_layer=1 with residual=None"):
        jit_forward(params, config, t, start_layer=1)
    with pytest.raises(ValueError, match="start_layer=0 with residual=an array"):
        jit_forward(params, config, t, residual=h)
    with pytest.raises(ValueError, match=r"residual has shape \(1, 3, 64\); expected \(1, 4, 64\)"):
        jit_forward(params, config, t, start_layer=1, residual=h[:, :3])
    with pytest.raises(ValueError, match=r"an edit acts at layers \[0\], outside the forward's layers \[1, 3\)"):
        jit_forward(params, config, t, start_layer=1, residual=h,
                    edits=(E.add(config, np.ones(config.d_model), layers=[0, 2]),))
    with pytest.raises(ValueError, match=r"capture layers \[2\] lie outside the forward's layers \[0, 2\)"):
        jit_forward(params, config, t, stop_layer=2, capture=Capture(sites=("resid_post",), layers=(2,)))
