"""sae.metrics: hand-computed values on fixed batches; CE-recovered limits; accumulation over batches."""
import math

import numpy as np
import pytest

from sae.config import SaeConfig
from sae.metrics import (LMStats, ReconstructionStats, ce_metrics, evaluate_lm, evaluate_reconstruction,
                         lm_metrics, reconstruction_metrics)

X = np.array([[3.0, 4.0], [0.0, 1.0]], np.float32)
R = np.array([[3.0, 3.0], [0.0, 1.0]], np.float32)
F = np.array([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]], np.float32)


def test_reconstruction_metrics_hand_computed():
    m = reconstruction_metrics(X, R, F)
    # E|x-x^|^2 = (1 + 0)/2; E|x|^2 = 13; E x = (1.5, 2.5) -> total variance 13 - 8.5 = 4.5
    assert m["mse_sum_over_dims"] == pytest.approx(0.5)
    assert m["explained_variance_saelens_new"] == pytest.approx(1 - 0.5 / 4.5)
    assert m["fvu_saelens_new"] == pytest.approx(0.5 / 4.5)
    assert m["nmse_openai"] == pytest.approx((1 / 25 + 0 / 1) / 2)
    assert m["shrinkage_norm_ratio"] == pytest.approx((math.sqrt(18) / 5 + 1) / 2)
    assert m["relative_reconstruction_bias"] == pytest.approx((18 + 1) / (21 + 1))
    assert m["l0_mean_per_token"] == pytest.approx(1.0)
    assert m["dead_fraction_never_fired"] == pytest.approx(1 / 3)
    assert m["dense_fraction_density_gt_0.1"] == pytest.approx(2 / 3)
    assert m["n_tokens"] == 2


def test_accumulation_uses_the_global_mean():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5)).astype(np.float32) + 3.0
    r = x + 0.3 * rng.standard_normal((40, 5)).astype(np.float32)
    f = (rng.random((40, 7)) > 0.7).astype(np.float32)
    st = ReconstructionStats(5, 7)
    for i in range(0, 40, 10):
        st.update(x[i:i + 10], r[i:i + 10], f[i:i + 10])
    whole = reconstruction_metrics(x, r, f)
    for k, v in st.result().items():
        assert v == pytest.approx(whole[k], rel=1e-5, abs=1e-7), k
    np.testing.assert_allclose(st.firing_density(), f.mean(0), rtol=1e-6)
    masked = ReconstructionStats(5, 7)
    masked.update(x, r, f, mask=np.arange(40) < 20)
    assert masked.result()["n_tokens"] == 20
    assert masked.result()["mse_sum_over_dims"] == pytest.approx(reconstruction_metrics(x[:20], r[:20], f[:20])[
        "mse_sum_over_dims"], rel=1e-6)


def test_perfect_sae_scores_perfectly():
    d = 4
    cfg = SaeConfig(architecture="relu", d_in=d, d_sae=2 * d, apply_b_dec_to_input=False)
    eye = np.eye(d, dtype=np.float32)
    params = {"W_enc": np.concatenate([eye, -eye], 1), "b_enc": np.zeros(2 * d, np.float32),
              "W_dec": np.concatenate([eye, -eye], 0), "b_dec": np.zeros(d, np.float32)}
    batches = [np.random.default_rng(i).standard_normal((16, d)).astype(np.float32) for i in range(3)]
    m, _ = evaluate_reconstruction(params, cfg, batches)
    assert m["explained_variance_saelens_new"] == pytest.approx(1.0, abs=1e-6)
    assert m["nmse_openai"] == pytest.approx(0.0, abs=1e-6)
    assert m["shrinkage_norm_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert m["relative_reconstruction_bias"] == pytest.approx(1.0, abs=1e-6)
    assert m["l0_mean_per_token"] == pytest.approx(4.0)


def _logits(rng, shape):
    return rng.standard_normal(shape).astype(np.float32) * 2


def test_ce_recovered_limits_and_kl_score():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 11, (3, 6))
    orig, zero = _logits(rng, (3, 6, 11)), _logits(rng, (3, 6, 11))
    perfect = lm_metrics(tokens, orig, zero, orig)
    assert perfect["ce_loss_recovered"] == pytest.approx(1.0)
    assert perfect["delta_lm_loss"] == pytest.approx(0.0, abs=1e-6)
    assert perfect["kl_sae"] == pytest.approx(0.0, abs=1e-6) and perfect["kl_score"] == pytest.approx(1.0)
    ablated = lm_metrics(tokens, orig, zero, zero)
    assert ablated["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert ablated["kl_score"] == pytest.approx(0.0, abs=1e-6)
    assert ablated["delta_lm_loss"] == pytest.approx(ablated["ce_zero_ablation"] - ablated["ce_orig"])


def test_ce_and_kl_hand_computed_with_mask():
    tokens = np.array([[0, 1, 2]])
    uniform = np.zeros((1, 3, 3), np.float32)
    peaked = np.zeros((1, 3, 3), np.float32)
    peaked[0, 0, 1] = math.log(2.0)                   # p(next=1 | pos 0) = 2/4
    mask = np.array([[True, True, False]])            # only the pair (0 -> 1) counts
    m = lm_metrics(tokens, uniform, peaked, peaked, mask=mask)
    assert m["n_positions"] == 1
    assert m["ce_orig"] == pytest.approx(math.log(3))
    assert m["ce_sae"] == pytest.approx(-math.log(0.5))
    # KL(uniform || (1/4, 1/2, 1/4)) = sum 1/3 log((1/3)/q)
    kl = sum(1 / 3 * math.log((1 / 3) / q) for q in (0.25, 0.5, 0.25))
    assert m["kl_sae"] == pytest.approx(kl, rel=1e-5)
    c = ce_metrics(2.0, 6.0, 3.0)
    assert c["ce_loss_recovered"] == pytest.approx(0.75) and c["delta_lm_loss"] == pytest.approx(1.0)


def test_evaluate_lm_with_a_run_callable():
    rng = np.random.default_rng(1)
    base = _logits(rng, (2, 5, 7))

    def run(tokens, mask, splice):
        return {None: base, "zero": base * 0, "sae": base * 0.9}[splice]

    batches = [(rng.integers(0, 7, (2, 5)), None) for _ in range(3)]
    m = evaluate_lm(run, batches)
    assert 0.0 < m["ce_loss_recovered"] <= 1.5 and m["n_positions"] == 3 * 2 * 4
    with pytest.raises(ValueError, match="logits_sae"):
        LMStats().update(np.zeros((2, 5), int), base, base, base[:, :4])


def test_port_runner_splices_through_psm_jax(tiny_hf):
    """CE recovered through the model port: 1 for a lossless SAE, 0 for an SAE that outputs zeros."""
    from psm_jax.loading.hf import load_hf_dir
    from sae.metrics import port_runner

    directory, _ = tiny_hf("llama")
    params, config = load_hf_dir(directory)
    d = config.d_model
    eye = np.eye(d, dtype=np.float32)
    cfg = SaeConfig(architecture="relu", d_in=d, d_sae=2 * d, apply_b_dec_to_input=False)
    lossless = {"W_enc": np.concatenate([eye, -eye], 1), "b_enc": np.zeros(2 * d, np.float32),
                "W_dec": np.concatenate([eye, -eye], 0), "b_dec": np.zeros(d, np.float32)}
    silent = dict(lossless, W_dec=np.zeros((2 * d, d), np.float32))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 12))
    mask = np.ones((2, 12), bool)
    mask[0, :3] = False                                # left padding
    m1 = evaluate_lm(port_runner(params, config, lossless, cfg, layer=1), [(tokens, mask)])
    assert m1["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4) and m1["kl_sae"] < 1e-6
    m0 = evaluate_lm(port_runner(params, config, silent, cfg, layer=1), [(tokens, mask)])
    assert m0["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-5) and m0["kl_score"] == pytest.approx(0, abs=1e-5)
    with pytest.raises(ValueError, match="d_model"):
        port_runner(params, config, lossless, cfg.replace(d_in=d + 1, d_sae=2 * d), layer=1)


def test_evaluate_lm_on_corpus_positions_and_errors(tiny_chat_model):
    """positions="all" (the attention mask as the edit mask) equals editing every slot; "trained" leaves the
    first token alone; misfits name the model's and the SAE's values."""
    from sae.metrics import check_lm_fit, corpus_token_batches, evaluate_lm_on_corpus, port_runner

    model = tiny_chat_model
    d = model.config.d_model
    cfg = SaeConfig(architecture="relu", d_in=d, d_sae=2 * d, apply_b_dec_to_input=False)
    rng = np.random.default_rng(0)
    sae = {"W_enc": rng.normal(size=(d, 2 * d)).astype(np.float32), "b_enc": np.zeros(2 * d, np.float32),
           "W_dec": 0.1 * rng.normal(size=(2 * d, d)).astype(np.float32), "b_dec": np.zeros(d, np.float32)}
    docs = [[{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i} " * (3 + i)}] for i in range(3)]
    b_all = corpus_token_batches(model, docs, context_len=24, batch_size=2, positions="all")
    b_tr = corpus_token_batches(model, docs, context_len=24, batch_size=2)
    assert len(b_all) == 2 and all(len(b) == 3 for b in b_all)
    assert all((k <= m).all() and (k.sum(1) < m.sum(1))[:1].all() for _, m, k in b_tr)
    m_all = evaluate_lm_on_corpus(model, sae, cfg, layer=1, batches=b_all)
    every_slot = evaluate_lm(port_runner(model.params, model.config, sae, cfg, layer=1), [(t, m) for t, m, _ in b_all])
    for key in ("ce_sae", "ce_zero_ablation", "kl_sae", "n_positions"):
        assert m_all[key] == pytest.approx(every_slot[key], rel=1e-5)
    m_tr = evaluate_lm_on_corpus(model, sae, cfg, docs, layer=1, context_len=24, batch_size=2)
    assert m_tr["ce_orig"] == pytest.approx(m_all["ce_orig"]) and m_tr["ce_sae"] != pytest.approx(m_all["ce_sae"])
    with pytest.raises(ValueError, match=r"d_in=16 does not match the model's d_model=32"):
        check_lm_fit(model.config, cfg.replace(d_in=16, d_sae=32), 1)
    with pytest.raises(ValueError, match=r"SAE layer 3 is out of range for a model with n_layers=3"):
        evaluate_lm_on_corpus(model, sae, cfg, docs, layer=3)
    with pytest.raises(ValueError, match="empty after filtering"):
        corpus_token_batches(model, [])
    with pytest.raises(ValueError, match="positions='some'"):
        corpus_token_batches(model, docs, positions="some")
