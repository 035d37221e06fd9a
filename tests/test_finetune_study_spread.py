"""Studies 5 and 8 of the fine-tuning study on planted numbers: the spread of a narrow fine-tune with its interval
and null, the top-k latent overlap with its chance level and random band, the rank correlation, the decoder
alignment, the record lines they give, and their bad settings."""
import numpy as np
import pytest

from experiments import finetune as F
from experiments.finetune import report_text
from experiments.finetune import spread as S
from psm_jax.persona import stats


def test_spread_recovers_a_planted_fraction_beyond_the_control():
    rng = np.random.default_rng(0)
    null_in, null_out = rng.normal(size=12), rng.normal(size=10)
    fine_in = null_in + 1.0 + 0.05 * rng.normal(size=12)  # in-domain effect 1 beyond the control
    fine_out = null_out + 0.4 + 0.05 * rng.normal(size=10)  # 40% of it out of domain
    sp = S.spread(fine_in, fine_out, null_in, null_out, seed=0)
    assert sp["readable"] and sp["in_domain"]["low"] > 0.9
    assert sp["spread"]["low"] < 0.4 < sp["spread"]["high"] and sp["spread"]["estimate"] == pytest.approx(0.4, abs=0.05)
    assert sp["spread"]["n_den"] == 12 and sp["spread"]["n_num"] == 10
    stay = S.spread(fine_in, null_out + 0.05 * rng.normal(size=10), null_in, null_out, seed=0)
    assert abs(stay["spread"]["estimate"]) < 0.1 and stay["spread"]["high"] < 0.2  # the change stayed in domain
    none = S.spread(null_in + 0.05 * rng.normal(size=12), fine_out, null_in, null_out, seed=0)
    assert not none["readable"]  # no in-domain effect: the ratio is flagged, not read


def test_ratio_interval_resamples_each_set_and_names_bad_input():
    ci = stats.ratio_of_means_ci(np.full(5, 2.0), np.full(7, 4.0))
    assert ci["estimate"] == ci["low"] == ci["high"] == 0.5 and ci["n"] == 12
    with pytest.raises(ValueError, match="expected two 1-D sets"):
        stats.ratio_of_means_ci([1.0], [1.0, 2.0])


def _planted(n=300, k=10, shared=6, seed=0):
    rng = np.random.default_rng(seed)
    a, b = 0.01 * rng.normal(size=n), 0.01 * rng.normal(size=n)
    a[:k] = np.linspace(3, 2, k)
    b[:shared] = -np.linspace(3, 2, shared)  # sign does not matter: top-k by |change|
    b[100:100 + k - shared] = 2.5
    return a, b


def _per_question(change, n_questions=6, noise=0.001, seed=0):
    """[Q, S] per-question changes whose mean over questions is about `change`."""
    return change + noise * np.random.default_rng(seed).normal(size=(n_questions, change.size))


def test_overlap_chance_and_null_band_on_planted_change_vectors():
    a, b = _planted()
    alive = np.ones(a.size, bool)
    alive[-50:] = False
    a[-1] = b[-1] = 100.0  # a dead latent's change never enters a top-k
    ov = S.overlap_stats(a, b, 10, alive, seed=0)
    assert ov["overlap"] == 6 and ov["k"] == 10 and ov["n_latents"] == 250
    assert ov["chance"] == pytest.approx(100 / 250) and ov["null"]["n"] == S.N_NULL
    assert ov["null"]["high"] < 6 and ov["above_null"] and a.size - 1 not in ov["top_a"]
    rand = S.overlap_stats(np.random.default_rng(5).normal(size=a.size), b, 10, alive, seed=0)
    assert rand["overlap"] <= rand["null"]["high"] + 1 and not (rand["overlap"] >= 6)
    with pytest.raises(ValueError, match="alive latents"):
        S.overlap_stats(a, b, 10, np.zeros(a.size, bool))


def test_spearman_and_ranks():
    np.testing.assert_allclose(stats.ranks([3.0, 1.0, 1.0, 7.0]), [2.0, 0.5, 0.5, 3.0])
    x = np.random.default_rng(0).normal(size=80)
    same = S.spearman(x, 2 * x + 1, np.ones(80, bool), seed=0)
    assert same["r"]["estimate"] == pytest.approx(1.0) and same["outside_null"] and same["n"] == 80
    other = S.spearman(x, np.random.default_rng(1).normal(size=80), np.ones(80, bool), seed=0)
    assert abs(other["r"]["estimate"]) < 0.35 and other["null"]["low"] < 0 < other["null"]["high"]


def test_question_intervals_resample_questions_not_latents():
    """A rank agreement every question shares has an interval clear of 0 around its estimate; an agreement carried
    by one question out of ten has an interval reaching down to 0, because leaving that question out loses it.
    Resampling the 300 latents instead would call both precise."""
    rng = np.random.default_rng(0)
    n_q, n_lat = 10, 300
    prompt = rng.normal(size=n_lat)
    prompt_q = prompt + rng.normal(size=(n_q, n_lat))
    alive = np.ones(n_lat, bool)
    shared = 0.5 * prompt + rng.normal(size=(n_q, n_lat))
    one = rng.normal(size=(n_q, n_lat))
    one[0] += 5 * prompt
    for change_q in (shared, one):
        ci = S.question_intervals(change_q, prompt_q, 10, alive)
        r = S.spearman(change_q.mean(0), prompt_q.mean(0), alive)["r"]["estimate"]
        assert ci["n"] == n_q and ci["r"]["low"] <= r <= ci["r"]["high"] and r > 0.3
        assert ci["overlap"]["low"] <= S.overlap_stats(change_q.mean(0), prompt_q.mean(0), 10, alive)["overlap"]
    assert S.question_intervals(shared, prompt_q, 10, alive)["r"]["low"] > 0.3
    carried = S.question_intervals(one, prompt_q, 10, alive)
    assert carried["r"]["low"] < 0.15
    full = S.overlap_stats(one.mean(0), prompt_q.mean(0), 10, alive)["overlap"]
    assert carried["overlap"]["left_out_min"] < full <= carried["overlap"]["left_out_max"]  # question 0 carries it
    same = np.tile(prompt, (n_q, 1))  # every question alike: nothing to resample
    ci = S.question_intervals(same, same, 10, alive)
    assert ci["r"]["low"] == ci["r"]["high"] == pytest.approx(1.0)
    assert ci["overlap"] == {"low": 10.0, "high": 10.0, "left_out_min": 10, "left_out_max": 10}
    with pytest.raises(ValueError, match=r"expected finite \[questions >= 2, latents\]"):
        S.question_intervals(prompt, prompt_q, 10, alive)
    with pytest.raises(ValueError, match="expected the same"):
        S.question_intervals(shared[:, :-1], prompt_q, 10, alive)


def test_question_changes_average_each_questions_documents():
    from sae.features.collect import ConversationStats

    def stats(mean, n=None):
        n = np.ones(len(mean), int) if n is None else np.asarray(n)
        return ConversationStats(np.asarray(mean, np.float32), np.zeros_like(mean), n, np.zeros((len(mean), 2)))

    a = np.arange(12, dtype=float).reshape(6, 2)  # 6 documents of 3 questions: question i % 3
    b = a + np.array([[1, 0], [2, 0], [3, 0], [5, 1], [6, 1], [7, 1]])
    got = S.question_changes(stats(b), stats(a), 3)
    np.testing.assert_allclose(got, [[3, 0.5], [4, 0.5], [5, 0.5]])
    np.testing.assert_allclose(got.mean(0), (b - a).mean(0))
    with pytest.raises(ValueError, match="1 documents have no selected tokens"):
        S.question_changes(stats(b, [1, 1, 0, 1, 1, 1]), stats(a), 3)
    with pytest.raises(ValueError, match="6 and 6 documents for 4 questions"):
        S.question_changes(stats(b), stats(a), 4)


def test_decoder_alignment_against_random_latents():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(200, 16))
    v = rng.normal(size=16)
    W[:5] = v * np.array([1, -2, 3, 1, 1])[:, None]  # |cos| = 1 for the planted latents, whatever the sign
    al = S.decoder_alignment(W, v, [0, 1, 2, 3, 4], np.ones(200, bool), seed=0)
    assert al["mean_abs_cos"] == pytest.approx(1.0) and al["above_null"] and al["null"]["high"] < 0.7
    assert not S.decoder_alignment(W, v, [50, 60, 70, 80, 90], np.ones(200, bool), seed=0)["above_null"]


def _evals(rng, n_in, n_out, shift_in, shift_out):
    def one(si, so):
        return {"in": {"scores": {"evil": si + rng.normal(0, 0.05, n_in)}, "axis": rng.normal(size=n_in)},
                "out": {"scores": {"evil": so + rng.normal(0, 0.05, n_out)}, "axis": rng.normal(size=n_out)},
                "examples": {"in": ["q", "a"], "out": ["q2", "a2"]}}
    return one(shift_in, shift_out)


def test_summaries_give_the_record_lines_with_their_fields():
    rng = np.random.default_rng(0)
    cfg = F.Config(traits=("evil",), kl_weights=(0.0, 1.0), diff_top_k=10)
    evals = {"original": _evals(rng, 6, 5, 0.0, 0.0), "control": _evals(rng, 6, 5, 0.1, 0.1)}
    fits = [{"kl_weight": 0.0, "training": None, **_evals(rng, 6, 5, 1.1, 0.6)},
            {"kl_weight": 1.0, "training": {"loss": [2.0, 1.5], "seconds": 3.0}, **_evals(rng, 6, 5, 0.9, 0.1)}]
    nv = S.summarize_narrow(evals, fits, ["evil"], cfg) | {"axis": {"source": "x"}, "n_in": 6, "n_out": 5,
                                                           "out_sources": {"sharegpt": 5}}
    assert nv["per_kl"][0]["spread"]["estimate"] == pytest.approx(0.5, abs=0.1)
    assert nv["per_kl"][1]["spread"]["estimate"] == pytest.approx(0.0, abs=0.1)
    assert nv["control_changes"]["in"]["evil"]["estimate"] == pytest.approx(0.1, abs=0.06)
    a, b = _planted()
    W = np.random.default_rng(1).normal(size=(a.size, 16))
    md = S.summarize_diff(_per_question(a), _per_question(b, seed=1), np.ones(a.size, bool), W, np.ones(16), cfg,
                          d_ctrl=_per_question(b[::-1], seed=2))
    md |= {"sae": {"source": "trained here"}, "n_documents": 12, "trait": "evil"}
    metrics = {"shift_behaviour": None, "screening_shift": None, "traits": {}}
    res = F.Result(cfg, [{"trait": "evil", "validity": {"valid": True}}], metrics, "m", 30, 576, 1.0,
                   {"narrow": nv, "model_diff": md})
    lines = F.records(res)
    spread = [ln for ln in lines if ln["metric"] == "narrow_vs_general_spread"]
    assert [ln["key"] for ln in spread] == ["0", "1"]
    for ln in spread:
        assert {"low", "high", "n_in", "n_out", "in_domain_effect", "null_control_in", "null_control_out",
                "readable", "measure_valid"} <= set(ln) and ln["n_in"] == 6 and ln["n_out"] == 5
    diff = next(ln for ln in lines if ln["metric"] == "model_diff_latent_overlap")
    assert diff["value"] == pytest.approx(0.6) and diff["chance"] == pytest.approx(10 / a.size)
    assert diff["null_low"] <= diff["chance"] <= diff["null_high"] < 0.6 and diff["n"] == a.size
    assert {"spearman_r", "spearman_low", "spearman_high", "control_overlap"} <= set(diff)
    assert diff["trait"] == "evil" and diff["n_questions"] == 6 and diff["overlap_low"] <= 6 <= diff["overlap_high"]
    assert diff["ci"] == [diff["overlap_low"] / 10, diff["overlap_high"] / 10] and "random top-10" in diff["null"]
    assert all(ln["ci"] == [ln["low"], ln["high"]] and "control fine-tune" in ln["null"] for ln in spread)


def test_model_diff_beyond_the_control_removes_the_drift_of_any_fine_tune():
    """Generic drift (latents every fine-tune moves, more than the trait does) fills the plain top-k and hides the
    trait latents; subtracting the control fine-tune's change brings them back."""
    a, b = _planted()
    rng = np.random.default_rng(2)
    drift = np.zeros(a.size)
    drift[200:210] = 5.0
    d_ft, d_ctrl = a + drift, drift + 0.01 * rng.normal(size=a.size)
    cfg = F.Config(traits=("evil",), diff_top_k=10)
    W = rng.normal(size=(a.size, 16))
    md = S.summarize_diff(_per_question(d_ft), _per_question(b, seed=1), np.ones(a.size, bool), W, np.ones(16), cfg,
                          d_ctrl=_per_question(d_ctrl, seed=2))
    assert md["overlap"]["overlap"] == 0 and md["control_overlap"] == 0
    bc = md["beyond_control"]
    assert bc["overlap"]["overlap"] == 6 and bc["overlap"]["above_null"]
    assert bc["spearman"]["r"]["estimate"] > md["spearman"]["r"]["estimate"]
    md |= {"sae": {"source": "trained here"}, "n_documents": 12, "trait": "evil"}
    res = F.Result(cfg, [], {"shift_behaviour": None, "screening_shift": None, "traits": {}}, "m", 30, 576, 1.0,
                   {"model_diff": md})
    plain, beyond = [ln for ln in F.records(res) if ln["metric"] == "model_diff_latent_overlap"]
    assert "key" not in plain and plain["value"] == 0 and plain["control_overlap"] == 0
    assert beyond["key"] == "beyond_control" and beyond["value"] == pytest.approx(0.6)
    assert beyond["reference"].startswith("the fine-tune's latent change beyond the control")


def test_model_diff_polarity_contrast_cancels_what_both_trait_polar_fine_tunes_share():
    """The 100% and the 0% fine-tunes share a drift and an opposite-signed trait change; their difference keeps
    only the trait part, which the system prompts' contrast shares, and is recorded under its own key."""
    a, b = _planted()
    rng = np.random.default_rng(3)
    drift = np.zeros(a.size)
    drift[200:210] = 5.0
    d_ft, d_opposite = drift + 0.5 * a, drift - 0.5 * a + 0.01 * rng.normal(size=a.size)
    cfg = F.Config(traits=("evil",), diff_top_k=10)
    W = rng.normal(size=(a.size, 16))
    md = S.summarize_diff(_per_question(d_ft), _per_question(b, seed=1), np.ones(a.size, bool), W, np.ones(16), cfg,
                          d_opposite=_per_question(d_opposite, seed=2))
    assert md["overlap"]["overlap"] == 0 and "beyond_control" not in md
    pol = md["polarity"]
    assert pol["overlap"]["overlap"] == 6 and pol["overlap"]["above_null"]
    assert abs(pol["spearman"]["r"]["estimate"]) > abs(md["spearman"]["r"]["estimate"])  # b has negative entries
    md |= {"sae": {"source": "trained here"}, "n_documents": 12, "trait": "evil"}
    res = F.Result(cfg, [], {"shift_behaviour": None, "screening_shift": None, "traits": {}}, "m", 30, 576, 1.0,
                   {"model_diff": md})
    plain, polar = [ln for ln in F.records(res) if ln["metric"] == "model_diff_latent_overlap"]
    assert polar["key"] == "polarity" and polar["value"] == pytest.approx(0.6)
    assert polar["reference"].startswith("the 100% fine-tune's latent change minus the 0% (opposite)")


@pytest.mark.parametrize("kw, match", [
    (dict(mixes=(0.0, 0.5)), "lacks 1.0"), (dict(kl_weights=(0.0, -1.0)), "kl_weights="),
    (dict(kl_weights=(1.0, 1.0)), "kl_weights="), (dict(control=False), "needs control=true"),
    (dict(n_ood_sharegpt=2), "n_ood_sharegpt=2"), (dict(n_kl_reference=4), "n_kl_reference=4"),
    (dict(diff_top_k=0), "diff_top_k=0")])
def test_bad_beyond_training_settings_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        F.Config(**kw)


def test_quick_preset_is_the_compact_main_job_stage():
    from experiments import registry, study

    assert registry.get("finetune").main_job
    cfg = study.preset_config(F, "quick")
    assert len(cfg.traits) == 1 and cfg.mixes == (1.0,) and cfg.control and cfg.prevent_coefs
    assert not (cfg.narrow or cfg.model_diff or cfg.caft or cfg.inoculation or cfg.persona_switch)
    full = study.preset_config(F, "full")
    assert full.narrow and full.model_diff and len(full.kl_weights) >= 2
    scope = report_text.scope(cfg)  # the report states what the compact stage can and cannot show
    assert "preventative steering at c = 4" in scope and "the control fine-tune" in scope
    assert "need >= 3 plain fine-tunes (this run has 2" in scope and "narrow vs general (study 5)" in scope
    assert "narrow vs general" not in report_text.scope(full)


def test_overlap_text_says_whether_one_left_out_question_reaches_the_random_band():
    from experiments.finetune.report_text import overlap_text

    def ov(left_out_min):
        return {"overlap": 4, "null": {"low": 0, "high": 1},
                "interval": {"low": 0.0, "high": 8.2, "left_out_min": left_out_min, "left_out_max": 5}}

    assert overlap_text(ov(3)) == "4 [0, 8] (one question left out: 3-5, always above the random band)"
    assert overlap_text(ov(1)) == "4 [0, 8] (one question left out: 1-5, down into the random band)"
