"""sae.config / sae.model: validation, init, encode semantics, custom gradients, edit export."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from sae import cpu_kernels, model as M
from sae.archs import batchtopk, jumprelu
from sae.config import SaeConfig, SaeConfigError, check_stackable, diff, sweep


def _cfg(arch="topk", **kw):
    base = dict(architecture=arch, d_in=8, d_sae=32, k=4, batch_size=16)
    base.update(kw)
    return SaeConfig(**base)


@pytest.fixture(scope="module")
def x():
    return jnp.asarray(np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))


# ---------------------------------------------------------------------------------------------------------- config

def test_config_validation_names_the_field():
    with pytest.raises(SaeConfigError, match=r"k=40.*d_sae=32"):
        _cfg(k=40)
    with pytest.raises(SaeConfigError, match="architecture"):
        _cfg(arch="gated")
    with pytest.raises(SaeConfigError, match="lr"):
        _cfg(lr=-1.0)
    _cfg(arch="relu", k=40)  # k is irrelevant for relu


def test_config_roundtrip_diff_and_sweep():
    c = _cfg()
    assert SaeConfig.from_dict(c.to_dict()) == c
    with pytest.raises(SaeConfigError, match="unknown SaeConfig field"):
        SaeConfig.from_dict({**c.to_dict(), "bogus": 1})
    assert diff(c, c.replace(k=5)) == {"k": (4, 5)}
    cs = sweep(c, k=[2, 4], seed=[0, 1])
    assert [(s.k, s.seed) for s in cs] == [(2, 0), (4, 1)]
    with pytest.raises(SaeConfigError, match="d_sae"):
        check_stackable([c, c.replace(d_sae=64)])
    with pytest.raises(SaeConfigError, match="cannot be swept"):
        sweep(c, d_sae=[1, 2])
    assert abs(SaeConfig(d_sae=2 ** 14).effective_lr - 2e-4) < 1e-12


# ---------------------------------------------------------------------------------------------------------- init

def test_init_decoder_unit_norm_and_tied_encoder(x):
    c = _cfg(b_dec_init="mean")
    p = M.init_params(jax.random.PRNGKey(0), c, x)
    np.testing.assert_allclose(np.linalg.norm(p["W_dec"], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(p["W_enc"], p["W_dec"].T)
    np.testing.assert_allclose(p["b_dec"], np.asarray(x).mean(0), rtol=1e-5, atol=1e-6)
    assert "threshold" not in p
    assert M.init_params(jax.random.PRNGKey(0), _cfg("jumprelu"), x)["threshold"].shape == (32,)


def test_geometric_median_is_the_minimiser():
    rng = np.random.default_rng(1)
    pts = np.concatenate([rng.standard_normal((50, 3)), 100 + rng.standard_normal((5, 3))]).astype(np.float32)
    gm = np.asarray(M.geometric_median(jnp.asarray(pts), iters=200))

    def cost(y):
        return np.linalg.norm(pts - y, axis=1).sum()

    assert cost(gm) < cost(pts.mean(0)) - 50          # robust to the outliers, unlike the mean
    for d in np.eye(3):
        assert cost(gm) <= min(cost(gm + 1e-2 * d), cost(gm - 1e-2 * d)) + 1e-3
    u = (gm - pts) / np.linalg.norm(gm - pts, axis=1, keepdims=True)
    assert np.linalg.norm(u.sum(0)) < 0.05            # first-order optimality: unit vectors sum to ~0


# ---------------------------------------------------------------------------------------------------------- encode

def test_topk_encode_keeps_the_k_largest(x):
    c = _cfg()
    p = M.init_params(jax.random.PRNGKey(0), c, x)
    p["b_enc"] = p["b_enc"] + 10.0                    # every pre-activation positive
    out = M.forward(p, c, x)
    f = np.asarray(out.latents)
    assert ((f > 0).sum(-1) == 4).all()
    pre = np.asarray(out.pre_acts)
    kth = np.sort(pre, -1)[:, -4][:, None]
    np.testing.assert_array_equal(f > 0, pre >= kth)
    np.testing.assert_allclose(out.recon, f @ np.asarray(p["W_dec"]) + np.asarray(p["b_dec"]), rtol=1e-5, atol=1e-5)


def test_apply_b_dec_to_input_and_jumprelu_threshold(x):
    c = _cfg("jumprelu", apply_b_dec_to_input=False)
    p = M.init_params(jax.random.PRNGKey(0), c, x)
    p["b_dec"] = p["b_dec"] + 3.0
    p["threshold"] = jnp.full((32,), 0.5)
    pre = np.asarray(x) @ np.asarray(p["W_enc"])     # b_dec not subtracted
    np.testing.assert_allclose(M.pre_activations(p, c, x), pre, rtol=1e-5, atol=1e-6)
    f = np.asarray(M.encode(p, c, x))
    np.testing.assert_allclose(f, np.where(pre > 0.5, pre, 0.0), rtol=1e-5, atol=1e-6)


def test_check_input_names_the_mismatch():
    with pytest.raises(M.SaeShapeError, match="d_in=8"):
        M.check_input(np.zeros((3, 9)), _cfg())
    with pytest.raises(M.SaeShapeError, match="W_dec"):
        M.check_params({**M.init_params(jax.random.PRNGKey(0), _cfg()), "W_dec": np.zeros((3, 3))}, _cfg())


# ---------------------------------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_sparse_topk_path_matches_dense_autodiff(x, apply_b_dec):
    c = _cfg(aux_k=6, apply_b_dec_to_input=apply_b_dec, dead_tokens_threshold=1)
    p = M.init_params(jax.random.PRNGKey(3), c, x)
    p["b_dec"] = p["b_dec"] + 0.3
    hp = dict(M.hyperparams(c), k=jnp.int32(3))        # a stacked sweep masks ranks >= its own k
    since = jnp.asarray(np.random.default_rng(2).integers(0, 2, 32).astype(np.int32))   # some latents dead

    def loss(p, sparse, chunks=None, impl="xla"):
        return M.training_loss(p, c.replace(sparse_decode=sparse), x, hp, since, 0, chunks=chunks, impl=impl)

    vg = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(1, 2, 3))
    (l1, i1), g1 = vg(p, True)
    (l2, i2), g2 = vg(p, False)
    assert float(i1["aux"]) > 0 and float(i1["l0"]) <= 3
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for name in g1:
        np.testing.assert_allclose(g1[name], g2[name], rtol=1e-4, atol=1e-6, err_msg=name)
    variants = [(4, "xla")] + ([(1, "ffi"), (4, "ffi")] if cpu_kernels.available() else [])
    for chunks, impl in variants:                     # chunked encoder / compiled CPU kernels: the same function
        (l3, _), g3 = vg(p, True, chunks, impl)
        np.testing.assert_allclose(l3, l1, rtol=1e-6)
        for name in g1:
            np.testing.assert_allclose(g3[name], g1[name], rtol=1e-5, atol=1e-6, err_msg=f"{name} {chunks} {impl}")


def test_jumprelu_and_step_pseudo_gradients_hand_computed():
    thr = jnp.asarray([1.0, 2.0])
    bw = jnp.asarray(0.5)
    pre = jnp.asarray([[0.9, 2.3], [1.2, 1.7], [3.0, 2.1]])    # |pre - thr| < 0.25: (0,0) (1,0)? no: 0.2 yes; (2,1)
    inside = np.abs(np.asarray(pre) - np.asarray(thr)) < 0.25
    g_thr = jax.grad(lambda t: jumprelu._jumprelu(pre, t, bw).sum())(thr)
    np.testing.assert_allclose(g_thr, -(np.asarray(thr) / 0.5) * inside.sum(0), rtol=1e-6)
    g_thr0 = jax.grad(lambda t: jumprelu._step(pre, t, bw).sum())(thr)
    np.testing.assert_allclose(g_thr0, -(1 / 0.5) * inside.sum(0), rtol=1e-6)
    g_pre = jax.grad(lambda p: jumprelu._jumprelu(p, thr, bw).sum())(pre)
    np.testing.assert_array_equal(g_pre, (np.asarray(pre) > np.asarray(thr)).astype(np.float32))
    assert float(jnp.abs(jax.grad(lambda p: jumprelu._step(p, thr, bw).sum())(pre)).sum()) == 0.0


def test_relu_l1_is_weighted_by_decoder_norms(x):
    c = _cfg("relu", normalize_decoder=False, l1_coef=2.0)
    p = M.init_params(jax.random.PRNGKey(0), c, x)
    p["W_dec"] = p["W_dec"] * jnp.arange(1, 33, dtype=jnp.float32)[:, None]
    loss, info = M.training_loss(p, c, x, M.hyperparams(c))
    f = np.maximum(np.asarray(M.pre_activations(p, c, x)), 0)
    want = (f * np.linalg.norm(np.asarray(p["W_dec"]), axis=1)).sum() / 16
    np.testing.assert_allclose(info["sparsity"], want, rtol=1e-5)
    np.testing.assert_allclose(loss, info["mse"] + 2.0 * want, rtol=1e-5)


def test_decoder_gradient_projection_is_orthogonal():
    rng = np.random.default_rng(0)
    w = M.normalize_decoder(jnp.asarray(rng.standard_normal((5, 7)), jnp.float32))
    g = jnp.asarray(rng.standard_normal((5, 7)), jnp.float32)
    gp = M.project_decoder_grad(g, w)
    np.testing.assert_allclose((gp * w).sum(-1), 0.0, atol=1e-6)


def test_batch_threshold_is_exact_including_fallback():
    rng = np.random.default_rng(0)
    acts = rng.random((8, 64)).astype(np.float32)
    acts[3] += 5.0                                     # one row holds far more than 2k of the batch's top set
    for k in (2, 4):
        want = np.sort(acts.reshape(-1))[::-1][k * 8 - 1]
        got = batchtopk.batch_threshold(jnp.asarray(acts), 4, jnp.int32(k))
        assert float(got) == float(want)


# ---------------------------------------------------------------------------------------------------------- export

@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "batchtopk"])
def test_to_edit_sae_matches_psm_jax_edit_semantics(x, arch):
    edits = pytest.importorskip("psm_jax.edits")
    c = _cfg(arch)
    p = M.init_params(jax.random.PRNGKey(0), c, x)
    p["b_dec"] = p["b_dec"] + 0.2
    if c.has_threshold:
        p["threshold"] = jnp.full((32,), 0.1)
    e = M.to_edit_sae(p, c)
    f = edits.sae_encode(e["sae"], x, e["activation"], e["k"], e["apply_b_dec_to_input"])
    out = M.forward(p, c, x)
    np.testing.assert_allclose(f, out.latents, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(edits.sae_decode(e["sae"], f), out.recon, rtol=1e-5, atol=1e-5)


def test_fold_activation_scale(x):
    c = _cfg()
    p = M.init_params(jax.random.PRNGKey(0), c, x)
    s = 3.0
    folded = M.fold_activation_scale(p, c, s)
    a, b = M.forward(p, c, x * s), M.forward(folded, c, x)
    np.testing.assert_allclose(b.latents, a.latents, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b.recon, a.recon / s, rtol=1e-4, atol=1e-5)
