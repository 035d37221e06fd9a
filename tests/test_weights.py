"""Weight edits: orthogonalised weights == runtime directional ablation; folded bias == runtime add."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from psm_jax import edits as E
from psm_jax.loading.hf import load_hf_dir
from psm_jax.model import Capture, jit_forward
from psm_jax.weights import fold_add, orthogonalize

ATOL = 1e-5


def _load(tiny_hf, name):
    directory, _ = tiny_hf(name)
    params, config = load_hf_dir(directory)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 9)), jnp.int32)
    mask = np.ones((2, 9), bool)
    mask[1, :3] = False  # left padding in row 1
    return params, config, tokens, jnp.asarray(mask)


@pytest.fixture(scope="module")
def llama(tiny_hf):
    return _load(tiny_hf, "llama")


@pytest.fixture(scope="module")
def tied(tiny_hf):
    return _load(tiny_hf, "llama3_rope_tied")


def _with_biases(params, config, seed=3):
    """The llama model with random o_proj and MLP biases switched on (exercises the bias paths)."""
    rng = np.random.default_rng(seed)
    L, D, F = config.n_layers, config.d_model, config.d_mlp
    layers = dict(params["layers"])
    for name, shape in (("bo", (L, D)), ("b_gate", (L, F)), ("b_up", (L, F)), ("b_down", (L, D))):
        layers[name] = jnp.asarray(0.1 * rng.normal(size=shape), jnp.float32)
    return {**params, "layers": layers}, dataclasses.replace(config, o_bias=True, mlp_bias=True)


def _ablation_edits(config, direction):
    return tuple(E.project_out(config, direction, layers="all", site=s) for s in ("resid_pre", "attn_out", "mlp_out"))


def _logits(params, config, tokens, mask, edits=(), capture=Capture()):
    return jit_forward(params, config, tokens, attention_mask=mask, edits=tuple(edits), capture=capture)


def _direction(config, seed=0):
    return np.random.default_rng(seed).normal(size=config.d_model).astype(np.float32)


@pytest.mark.parametrize("which", ["llama", "tied", "biases"])
def test_orthogonalized_weights_equal_runtime_ablation(which, llama, tied):
    params, config, tokens, mask = {"llama": llama, "tied": tied, "biases": llama}[which]
    if which == "biases":
        params, config = _with_biases(params, config)
    r = _direction(config)
    base = _logits(params, config, tokens, mask).logits
    ablated = _logits(params, config, tokens, mask, _ablation_edits(config, r)).logits
    p2, c2 = orthogonalize(params, config, r)
    ortho = _logits(p2, c2, tokens, mask, capture=Capture(sites=("resid_pre", "resid_post"))).logits
    assert float(jnp.max(jnp.abs(ablated - base))) > 1e-3  # the ablation does something
    np.testing.assert_allclose(np.asarray(ortho), np.asarray(ablated), atol=ATOL, rtol=0)
    assert c2.tie_embeddings is False
    assert "unembed" in p2


def test_orthogonalized_residual_has_no_component(llama):
    params, config, tokens, mask = llama
    r = _direction(config)
    u = r / np.linalg.norm(r)
    p2, c2 = orthogonalize(params, config, r)
    cap = _logits(p2, c2, tokens, mask, capture=Capture(sites=("resid_pre", "attn_out", "mlp_out"))).captured
    for site in ("resid_pre", "attn_out", "mlp_out"):
        assert float(jnp.max(jnp.abs(cap[site] @ u))) < 1e-5, site


def test_orthogonalize_rank_two_and_inputs_untouched(llama):
    params, config, tokens, mask = llama
    rs = np.stack([_direction(config, 0), _direction(config, 1)])
    before = np.asarray(params["embed"]).copy()
    p2, c2 = orthogonalize(params, config, rs)
    np.testing.assert_array_equal(np.asarray(params["embed"]), before)
    ablated = _logits(params, config, tokens, mask, _ablation_edits(config, rs)).logits
    np.testing.assert_allclose(np.asarray(_logits(p2, c2, tokens, mask).logits), np.asarray(ablated), atol=ATOL)


def test_tied_model_without_untie_is_an_error(tied):
    params, config, _, _ = tied
    with pytest.raises(ValueError, match="tie_embeddings"):
        orthogonalize(params, config, _direction(config), untie=False)


def test_orthogonalize_bad_inputs(llama):
    params, config, _, _ = llama
    with pytest.raises(ValueError, match="d_model"):
        orthogonalize(params, config, np.ones(config.d_model + 1))
    with pytest.raises(ValueError, match="linearly"):
        orthogonalize(params, config, np.zeros(config.d_model))
    with pytest.raises(ValueError, match="NaN"):
        orthogonalize(params, config, np.full(config.d_model, np.nan))
    with pytest.raises(ValueError, match="sandwich"):
        orthogonalize(params, dataclasses.replace(config, sandwich_norms=True), _direction(config))


@pytest.mark.parametrize("site,layers,biased", [("resid_pre", [0, 2], False), ("attn_out", 1, False),
                                                ("resid_post", [0, 1], False), ("mlp_out", "all", True),
                                                ("resid_mid", [1], True)])
def test_fold_add_equals_runtime_add(llama, site, layers, biased):
    params, config, tokens, mask = llama
    if biased:
        params, config = _with_biases(params, config)
    v = 0.5 * _direction(config, 7)
    coef = 1.5
    runtime = _logits(params, config, tokens, mask, [E.add(config, v, layers=layers, coef=coef, site=site)]).logits
    p2, c2 = fold_add(params, config, v, layers=layers, site=site, coef=coef)
    folded = _logits(p2, c2, tokens, mask).logits
    np.testing.assert_allclose(np.asarray(folded), np.asarray(runtime), atol=ATOL, rtol=0)
    if not biased and site != "resid_pre":
        assert c2.o_bias or c2.mlp_bias  # a zero bias leaf was added and switched on


def test_fold_add_per_layer_vectors_and_tied_embedding(tied):
    params, config, tokens, mask = tied
    L, D = config.n_layers, config.d_model
    vs = np.random.default_rng(5).normal(size=(L, D)).astype(np.float32)
    coef = np.linspace(0.5, 1.0, L).astype(np.float32)
    layers = list(range(L))
    runtime = _logits(params, config, tokens, mask,
                      [E.add(config, vs, layers=layers, coef=coef, site="resid_pre")]).logits
    p2, c2 = fold_add(params, config, vs, layers=layers, coef=coef, site="resid_pre")
    assert c2.tie_embeddings is False
    np.testing.assert_allclose(np.asarray(_logits(p2, c2, tokens, mask).logits), np.asarray(runtime), atol=ATOL)


def test_fold_add_errors(llama):
    params, config, _, _ = llama
    v = _direction(config)
    with pytest.raises(ValueError, match="no o_proj bias"):
        fold_add(params, config, v, layers=0, site="attn_out", add_missing_bias=False)
    with pytest.raises(ValueError, match="no down_proj bias"):
        fold_add(params, config, v, layers=1, site="resid_pre", add_missing_bias=False)
    with pytest.raises(ValueError, match="site"):
        fold_add(params, config, v, layers=0, site="attn_in")
    with pytest.raises(ValueError, match="shape"):
        fold_add(params, config, v[:-1], layers=0)
    with pytest.raises(ValueError, match="coef"):
        fold_add(params, config, v, layers=0, coef=np.ones(config.n_layers + 1))
    with pytest.raises(ValueError, match="out of range"):
        fold_add(params, config, v, layers=config.n_layers)
    with pytest.raises(ValueError, match="sandwich"):
        fold_add(params, dataclasses.replace(config, sandwich_norms=True), v, layers=0, site="mlp_out")


@pytest.mark.slow
def test_smollm2_orthogonalized_matches_ablation(smollm2_model):
    """The real model (tied embeddings): orthogonalised weights vs runtime ablation, float32."""
    m = smollm2_model
    tok = jnp.asarray(np.random.default_rng(0).integers(0, m.config.vocab_size, (2, 24)), jnp.int32)
    r = _direction(m.config, 3)
    ablated = _logits(m.params, m.config, tok, None, _ablation_edits(m.config, r)).logits
    p2, c2 = orthogonalize(m.params, m.config, r)
    diff = float(jnp.max(jnp.abs(_logits(p2, c2, tok, None).logits - ablated)))
    assert diff < 1e-3, diff
