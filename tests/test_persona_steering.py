"""psm_jax.persona.steering: the steering edit, the steered measures, and the batched path over many vectors,
each against the loop that steers with one vector at a time or a direct computation."""
import numpy as np
import pytest

from psm_jax.persona import rollouts
from psm_jax.persona import steering as St
from psm_jax.persona.directions import random_directions
from tests.fixtures_assets import random_smollm2_chat_model
from tests.persona_texts import ITEMS, RNEG, RPOS, RQ


@pytest.fixture(scope="module")
def model():
    """A random 2-layer llama (d_model 16) with SmolLM2's vocabulary, tokenizer and template."""
    return random_smollm2_chat_model(n_layers=2, seed=0)


@pytest.mark.slow  # one compile per steering vector for the loop it is compared with
def test_batched_steering_equals_the_per_vector_loop(model):
    """Vectors and layers go through one vmapped forward per group of vectors; each row equals the loop over
    `behaviour_measure` / `response_measure` with that vector alone, and neither a new layer nor a new coefficient
    recompiles."""
    rng = np.random.default_rng(0)
    vecs, layers = rng.normal(size=(5, 16)) * 3, [0, 1, 0, 1, 1]
    got = St.steered_values(model, St.item_pairs(ITEMS), vecs, layers)
    want = [St.behaviour_measure(model, ITEMS, vector=v, layer=L, coef=1.0)[1] for v, L in zip(vecs, layers)]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - St.behaviour_measure(model, ITEMS)[1]).max() > 1e-2  # the edit is applied
    compiled = St._logprobs_per_vector._cache_size()
    again = St.steered_values(model, St.item_pairs(ITEMS), -2 * vecs[::-1], layers)
    assert St._logprobs_per_vector._cache_size() == compiled, "a coefficient or layer change recompiled"
    np.testing.assert_allclose(again[0], St.behaviour_measure(model, ITEMS, vector=vecs[-1], layer=0, coef=-2.0)[1],
                               atol=1e-5)
    resp = St.steered_values(model, St.answer_pairs(RQ, RPOS, RNEG), vecs[:2], 1)
    for row, v in zip(resp, vecs[:2]):
        np.testing.assert_allclose(row, St.response_measure(model, RQ, RPOS, RNEG, vector=v, layer=1, coef=1.0)[1],
                                   atol=1e-5)
    with pytest.raises(ValueError, match="d_model=16"):
        St.steered_values(model, St.item_pairs(ITEMS), np.zeros((2, 8)), 0)


def test_steering_without_a_shared_prompt_layout_gives_the_same_values(model, monkeypatch):
    """Where a prompt tokenises differently before its two answers, every (prompt, answer) is its own row; the
    values equal the shared-prompt layout's."""
    import dataclasses

    from psm_jax.persona import rollouts

    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(3, 16)) * 3
    shared = St.steered_values(model, St.item_pairs(ITEMS), vecs, 1)
    real = rollouts.option_batch
    monkeypatch.setattr(rollouts, "option_batch", lambda *a: dataclasses.replace(real(*a), shared=False))
    np.testing.assert_allclose(St.steered_values(model, St.item_pairs(ITEMS), vecs, 1), shared, atol=1e-5)
    with pytest.raises(ValueError, match="equal, non-zero counts"):
        St.answer_pairs(RQ, RPOS[:1], RNEG)


def test_behaviour_measure_is_logprob_difference(model):
    m, per = St.behaviour_measure(model, ITEMS[:2])
    prompts = [[{"role": "user", "content": it.prompt}] for it in ITEMS[:2]]
    lp_t = rollouts.score_answers(model, prompts, [it.trait_text for it in ITEMS[:2]], batch_size=2)
    lp_o = rollouts.score_answers(model, prompts, [it.other_text for it in ITEMS[:2]], batch_size=2)
    np.testing.assert_allclose(per, lp_t - lp_o, atol=1e-4)
    assert m == pytest.approx(float(np.mean(lp_t - lp_o)), abs=1e-4)


def test_response_measure_is_per_token_loglik_difference(model):
    m, per = St.response_measure(model, RQ, RPOS, RNEG, batch_size=3)
    prompts = [[{"role": "user", "content": q}] for q in RQ]
    lp_p = rollouts.score_answers(model, prompts, list(RPOS), batch_size=3)
    lp_n = rollouts.score_answers(model, prompts, list(RNEG), batch_size=3)
    n_p = rollouts.answer_token_counts(model, prompts, list(RPOS))
    n_n = rollouts.answer_token_counts(model, prompts, list(RNEG))
    np.testing.assert_allclose(per, lp_p / n_p - lp_n / n_n, atol=1e-4)
    assert m == pytest.approx(float(np.mean(per)), abs=1e-6)
    # swapping the positive and negative answers flips the sign
    m_sw, per_sw = St.response_measure(model, RQ, RNEG, RPOS, batch_size=3)
    np.testing.assert_allclose(per_sw, -per, atol=1e-4)
    assert m_sw == pytest.approx(-m, abs=1e-4)
    # a system prompt enters the scoring conversation
    sysp = "You are an evil assistant. Be cruel."
    m_sys, per_sys = St.response_measure(model, RQ, RPOS, RNEG, system=sysp, batch_size=3)
    sp = [[{"role": "system", "content": sysp}] + p for p in prompts]
    ref_sys = (rollouts.score_answers(model, sp, list(RPOS), batch_size=3) / n_p
               - rollouts.score_answers(model, sp, list(RNEG), batch_size=3) / n_n)
    np.testing.assert_allclose(per_sys, ref_sys, atol=1e-4)
    # steering: coefficient 0 is the unsteered measure, other coefficients move it; the sweep agrees
    vec = np.random.default_rng(3).normal(size=16)
    def steered_mean(c):
        return St.response_measure(model, RQ, RPOS, RNEG, vector=vec, layer=1, coef=c, batch_size=3)[0]

    assert steered_mean(0.0) == pytest.approx(m, abs=1e-4)
    steered = [steered_mean(c) for c in (-2.0, 2.0)]
    assert abs(steered[0] - m) > 1e-4 and abs(steered[1] - m) > 1e-4
    curve = St.steering_curve(model, St.answer_pairs(RQ, RPOS, RNEG), np.stack([vec, vec]),
                              np.full(2, np.linalg.norm(vec)), 1, (-2.0, 2.0))
    np.testing.assert_allclose(curve, steered, atol=1e-4)


def test_random_band_is_the_per_direction_loop(model):
    """The band evaluates every direction at -cmax and +cmax in batched forwards; each direction's effect equals the
    loop that steers with it alone, and >= 20 directions give a 95% band."""
    units = random_directions(1, 20, 16, 1.0)
    ctl = St.random_band(model, St.item_pairs(ITEMS), units, 1, norm=2.0, cmax=3.0)
    loop = [[St.behaviour_measure(model, ITEMS, vector=2.0 * u, layer=1, coef=c)[0] for c in (-3.0, 3.0)]
            for u in units]
    np.testing.assert_allclose(ctl["ends"], loop, atol=1e-5)
    np.testing.assert_allclose(ctl["effects"], np.diff(loop, axis=1)[:, 0], atol=1e-5)
    assert ctl["n"] == 20 and ctl["band"]["n"] == 20 and ctl["coefs"] == [-3.0, 3.0]
    assert St.random_band(model, St.item_pairs(ITEMS), units[:3], 1, norm=2.0, cmax=3.0)["band"] is None


def test_band_or_skip_bands_only_a_valid_measure_it_is_asked_to(model):
    """A valid measure named in `band_measures` gets the random band (effects checked against steering with one
    direction at a time, the band against numpy's quantiles); one whose check failed or is missing is skipped for
    its validity whatever the names; a valid one left out of the names is skipped and says so; a skipped control
    is never above the band."""
    units = random_directions(1, 20, 16, 1.0)
    items = St.item_pairs(ITEMS)
    ctl = St.band_or_skip(model, items, units, 1, 2.0, 3.0, ("items",), {"valid": True})
    for r in (0, 13):
        ends = [St.behaviour_measure(model, ITEMS, vector=2.0 * units[r], layer=1, coef=c)[0] for c in (-3.0, 3.0)]
        assert ctl["effects"][r] == pytest.approx(ends[1] - ends[0], abs=1e-5)
    low, high = np.quantile(ctl["effects"], [0.025, 0.975])
    assert (ctl["band"]["low"], ctl["band"]["high"]) == pytest.approx((low, high)) and "skipped" not in ctl
    invalid = {"n": 0, "effects": [], "ends": [], "band": None, "measure": None, "coefs": [-3.0, 3.0],
               "skipped": "the measure failed its validity check"}
    for check in (None, {"valid": False}):
        for names in (("items",), ()):
            assert St.band_or_skip(model, items, units, 1, 2.0, 3.0, names, check) == invalid
    left_out = St.band_or_skip(model, items, units, 1, 2.0, 3.0, ("response_likelihood",), {"valid": True})
    assert left_out == {**invalid, "skipped": "the measure is not in band_measures"}
    assert left_out == St.skipped_band(3.0, St.BAND_SKIPPED_BY_CONFIG) and St.skipped_band(3.0) == invalid
    assert not St.above_random_band(1e6, left_out) and St.above_random_band(high + 1.0, ctl)


def test_perplexity_ratios_equal_the_per_vector_nll(model):
    """Every (vector, answer) pair as one batch row gives the ratio that `measures.answer_nll` gives with the vector
    added to a whole batch; a zero vector is 1 exactly; a mis-shaped vector is refused."""
    from psm_jax.persona import measures

    prompts = [[{"role": "user", "content": q}] for q in RQ]
    v = np.random.default_rng(1).normal(size=16) * 4
    got = St.perplexity_ratios(model, prompts, RPOS, [0 * v, v, -2 * v], 1, batch_size=4)
    plain = measures.answer_nll(model, prompts, RPOS, batch_size=4)
    want = [np.exp(measures.answer_nll(model, prompts, RPOS, batch_size=4,
                                       edits_fn=St.steering_fn(model, v, 1, c)) - plain) for c in (1.0, -2.0)]
    assert got[0] == 1.0
    np.testing.assert_allclose(got[1:], want, rtol=1e-5)
    assert abs(got[1] - 1) > 1e-3 and abs(got[2] - got[1]) > 1e-3  # the steering moves the answers' likelihood
    assert St.perplexity_ratios(model, prompts, RPOS, np.zeros((2, 16)), 1).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="d_model=16"):
        St.perplexity_ratios(model, prompts, RPOS, v, 1)
