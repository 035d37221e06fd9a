"""sae.archs: the registry, one definition per architecture shared by training, inference, edits and export,
and the Matryoshka TopK SAE added through it (loss vs a numpy reference, planted-feature recovery, prefix
reconstruction, SAELens round trip)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psm_jax import edits as E
from sae import model as M
from sae.archs import registry
from sae.archs.matryoshka import prefix_sizes
from sae.config import SaeConfig, SaeConfigError
from sae.interop import export_saelens, load_sae
from sae.synthetic import PlantedSource, max_cosine
from sae.train import train

D, F, B = 32, 64, 256
BASE = SaeConfig(architecture="matryoshka_topk", d_in=D, d_sae=128, k=3, batch_size=B, lr=3e-3, warmup_steps=10,
                 dead_tokens_threshold=B * 50, geometric_median_iters=10)


def test_registry_names_each_architecture_once_with_its_export():
    assert registry.names() == ("relu", "topk", "batchtopk", "jumprelu", "matryoshka_topk")
    want = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu",
            "matryoshka_topk": "topk"}
    assert {n: registry.get(n).saelens_name for n in registry.names()} == want
    assert registry.saelens_names() == ("jumprelu", "standard", "topk")
    assert [registry.from_saelens(s).name for s in ("standard", "topk", "jumprelu")] == ["relu", "topk", "jumprelu"]
    for name in registry.names():
        assert registry.get(name).edit_activation in E.SAE_ACTIVATIONS, name
    with pytest.raises(ValueError, match="'gated'.*relu"):
        registry.get("gated")
    with pytest.raises(ValueError, match="'gated'"):
        registry.from_saelens("gated")
    with pytest.raises(SaeConfigError, match="architecture='gatd'.*matryoshka_topk"):
        SaeConfig(architecture="gatd")
    with pytest.raises(SaeConfigError, match="k=0"):
        SaeConfig(architecture="matryoshka_topk", k=0)


def test_prefix_sizes():
    assert prefix_sizes(128) == (16, 32, 64, 128)
    assert prefix_sizes(4) == (1, 2, 4)
    assert prefix_sizes(1) == (1,)


def _np_topk_codes(p, x, k):
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    idx = np.argsort(-pre, axis=1)[:, :k]
    f = np.zeros_like(pre)
    np.put_along_axis(f, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0), 1)
    return f


@pytest.mark.parametrize("sparse", [True, False])
def test_matryoshka_loss_matches_numpy(sparse):
    cfg = BASE.replace(d_in=12, d_sae=40, k=4, sparse_decode=sparse)
    p = {k: np.asarray(v, np.float64) for k, v in M.init_params(jax.random.PRNGKey(1), cfg).items()}
    rng = np.random.default_rng(0)
    p["b_enc"] = rng.normal(size=cfg.d_sae) * 0.1
    p["b_dec"] = rng.normal(size=cfg.d_in) * 0.1
    x = rng.normal(size=(64, cfg.d_in))
    f = _np_topk_codes(p, x, cfg.k)
    want = sum(np.sum((f[:, :m] @ p["W_dec"][:m] + p["b_dec"] - x) ** 2) / len(x) for m in (5, 10, 20, 40))
    p32 = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
    loss, info = M.training_loss(p32, cfg, jnp.asarray(x, jnp.float32), M.hyperparams(cfg), with_aux=False)
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)
    np.testing.assert_allclose(float(info["mse"]), np.sum((f @ p["W_dec"] + p["b_dec"] - x) ** 2) / len(x), rtol=1e-4)
    assert float(info["l0"]) == pytest.approx(np.mean((f > 0).sum(1)))
    # inference is TopK: the port's encode (what edits and the feature analysis run) gives the same codes
    np.testing.assert_allclose(np.asarray(M.encode(p32, cfg, jnp.asarray(x, jnp.float32))), f, atol=1e-5)


def _prefix_ev(params, cfg, x, m):
    f = np.asarray(M.encode(params, cfg, jnp.asarray(x)))
    recon = f[:, :m] @ np.asarray(params["W_dec"])[:m] + np.asarray(params["b_dec"])
    return 1 - np.sum((recon - x) ** 2) / np.sum((x - x.mean(0)) ** 2)


def test_matryoshka_recovers_planted_features_and_front_loads_them(tmp_path):
    src = PlantedSource(D, F, B, active=3, seed=0)
    mat = train(BASE.replace(total_steps=400), src, tmp_path / "mat", checkpoint_every=0)
    assert mat.stopped == "total_steps"
    mc = max_cosine(src.dictionary, mat.params[0]["W_dec"])
    assert mc.mean() > 0.9, mc.mean()
    assert mat.last_metrics[0]["explained_variance"] > 0.85   # the prefix losses cost some full-width fit
    assert mat.last_metrics[0]["l0"] == pytest.approx(3.0)
    top = train(BASE.replace(architecture="topk", total_steps=400), PlantedSource(D, F, B, active=3, seed=0),
                tmp_path / "top", checkpoint_every=0)
    x = PlantedSource(D, F, 2048, active=3, seed=0).batch(10_000)
    cfg_top = BASE.replace(architecture="topk")
    m = BASE.d_sae // 4          # a quarter of the latents alone
    ev_mat, ev_top = _prefix_ev(mat.params[0], BASE, x, m), _prefix_ev(top.params[0], cfg_top, x, m)
    assert ev_mat > ev_top + 0.1, (ev_mat, ev_top)


def test_matryoshka_saelens_round_trip(tmp_path):
    cfg = BASE.replace(d_in=8, d_sae=24, k=5)
    p = {k: np.asarray(v) for k, v in M.init_params(jax.random.PRNGKey(0), cfg).items()}
    p["b_enc"] = np.random.default_rng(0).normal(size=24).astype(np.float32) * 0.1
    out = export_saelens(p, cfg, tmp_path / "sae", hook_name="model.layers.1", model_name="tiny")
    d = json.loads((out / "cfg.json").read_text())
    assert d["architecture"] == "topk" and d["k"] == 5 and "threshold" not in d
    imp = load_sae(out)
    assert imp.cfg == cfg and sorted(imp.params) == sorted(p)
    for k in p:
        np.testing.assert_array_equal(imp.params[k], p[k], err_msg=k)
    # a SAELens folder without our metadata loads as the plain TopK SAE it runs as
    d["metadata"].pop("psm_sae_config")
    (out / "cfg.json").write_text(json.dumps(d))
    assert load_sae(out).cfg.architecture == "topk"


def test_edits_take_an_encode_callable(tiny_hf):
    """An SAE whose encoder is not one of the named activations carries its encode into the edit."""
    from psm_jax.loading.hf import load_hf_dir
    from psm_jax.model import jit_forward

    params, config = load_hf_dir(tiny_hf("llama")[0])
    cfg = SaeConfig(architecture="topk", d_in=config.d_model, d_sae=3 * config.d_model, k=4)
    kw = M.to_edit_sae(M.init_params(jax.random.PRNGKey(0), cfg), cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 6)), jnp.int32)
    named = E.sae_splice(config, kw["sae"], layers=[1], activation="topk", k=4)

    def encode(sae, x):
        return E.sae_activate(sae, (x - sae["b_dec"]) @ sae["W_enc"] + sae["b_enc"], "topk", 4)

    carried = E.sae_splice(config, kw["sae"], layers=[1], activation=encode)
    base = jit_forward(params, config, tokens).logits
    a = jit_forward(params, config, tokens, edits=(named,)).logits
    b = jit_forward(params, config, tokens, edits=(carried,)).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(base))
    with pytest.raises(ValueError, match="'gelu'"):
        E.sae_splice(config, kw["sae"], layers=[1], activation="gelu")
    with pytest.raises(ValueError, match="W_dec has shape"):
        E.sae_splice(config, dict(kw["sae"], W_dec=kw["sae"]["W_dec"][:-1]), layers=[1], activation="topk", k=4)
