"""psm_jax.persona.stats and the array parts of directions/measures, on constructed data with known answers."""
import numpy as np
import pytest

from psm_jax.persona import directions as D
from psm_jax.persona import measures as M
from psm_jax.persona import stats as S


def test_bootstrap_ci_covers_the_true_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(60):
        x = rng.normal(loc=3.0, scale=2.0, size=40)
        ci = S.bootstrap_ci(x, n_resamples=400, seed=trial)
        assert ci["low"] < ci["estimate"] < ci["high"] and ci["n"] == 40
        covered += ci["low"] <= 3.0 <= ci["high"]
    assert covered >= 50  # 95% nominal; 60 trials
    # width shrinks like 1/sqrt(n)
    wide = S.bootstrap_ci(rng.normal(size=25), n_resamples=500)
    narrow = S.bootstrap_ci(rng.normal(size=2500), n_resamples=500)
    assert (narrow["high"] - narrow["low"]) < 0.25 * (wide["high"] - wide["low"])


def test_bootstrap_and_band_reject_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        S.bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="1-D"):
        S.bootstrap_ci(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="level=1.5"):
        S.bootstrap_ci([1.0, 2.0], level=1.5)
    with pytest.raises(ValueError, match="at least 20 draws.*got 5"):
        S.null_band(np.arange(5.0))
    with pytest.raises(ValueError, match="paired"):
        S.paired_effect([1.0, 2.0], [1.0])


def test_jackknife_of_a_mean_is_the_textbook_standard_error():
    """For the mean, the jackknife's standard error is exactly sd / sqrt(n) (ddof 1); for several statistics at
    once each gets its own; one unit too few is refused."""
    x = np.random.default_rng(0).normal(2.0, 3.0, size=25)
    ci = S.jackknife_ci(lambda idx: [x[idx].mean(), 2 * x[idx].mean() + 1], x.size)
    se = x.std(ddof=1) / np.sqrt(x.size)
    np.testing.assert_allclose(ci["se"], [se, 2 * se], rtol=1e-10)
    np.testing.assert_allclose(ci["estimate"], [x.mean(), 2 * x.mean() + 1])
    np.testing.assert_allclose(ci["low"][0], x.mean() - 1.959963985 * se, rtol=1e-8)
    assert ci["n"] == 25 and ci["high"][1] > ci["estimate"][1]
    np.testing.assert_allclose(ci["left_out"][3, 0], np.delete(x, 3).mean())  # row i: unit i left out
    with pytest.raises(ValueError, match="needs >= 2 units; got 1"):
        S.jackknife_ci(lambda idx: [0.0], 1)


def test_t_critical_matches_scipy_and_the_printed_table():
    from scipy import stats as sp

    for df in (1, 2, 3, 4, 5, 7, 9, 30, 200):
        for level in (0.9, 0.95, 0.99):
            assert S.t_critical(level, df) == pytest.approx(sp.t.ppf(0.5 + level / 2, df), rel=1e-9), (df, level)
    assert S.t_critical(0.95, 7) == pytest.approx(2.3646, abs=1e-4)  # the printed table
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="df="):
            S.t_critical(0.95, bad)


def test_mean_t_ci_is_the_textbook_interval_and_covers_at_the_nominal_rate():
    ci = S.mean_t_ci([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305 * np.std([1, 2, 3, 4], ddof=1) / 2
    assert ci["estimate"] == 2.5 and ci["df"] == 3 and ci["n"] == 4
    assert ci["low"] == pytest.approx(2.5 - half) and ci["high"] == pytest.approx(2.5 + half)
    assert S.mean_t_ci([0.7])["low"] == S.mean_t_ci([0.7])["high"] == 0.7
    rng = np.random.default_rng(0)  # 5 runs per draw: the t interval keeps its rate where a bootstrap's falls short
    t_hits = boot_hits = 0
    for i in range(400):
        x = rng.normal(1.0, 2.0, 5)
        t = S.mean_t_ci(x)
        b = S.bootstrap_ci(x, n_resamples=400, seed=i)
        t_hits += t["low"] <= 1.0 <= t["high"]
        boot_hits += b["low"] <= 1.0 <= b["high"]
    assert 0.92 <= t_hits / 400 <= 0.98 and boot_hits < t_hits
    with pytest.raises(ValueError, match="at least one"):
        S.mean_t_ci([])


def test_jackknife_with_student_t_of_a_mean_is_the_t_interval():
    x = np.array([0.3, 1.9, 1.1, 2.4, 0.8, 1.5])
    jk = S.jackknife_ci(lambda idx: [x[idx].mean()], x.size, student_t=True)
    t = S.mean_t_ci(x)
    assert jk["low"][0] == pytest.approx(t["low"]) and jk["high"][0] == pytest.approx(t["high"])
    assert S.jackknife_ci(lambda idx: [x[idx].mean()], x.size)["low"][0] > t["low"]  # z is narrower


def test_paired_effect_and_validity():
    rng = np.random.default_rng(0)
    base = rng.normal(size=30)
    shifted = base + 0.5 + 0.05 * rng.normal(size=30)
    eff = S.paired_effect(shifted, base)
    assert eff["excludes_zero"] and eff["low"] > 0.4 and eff["high"] < 0.6
    check = M.validity(shifted, base)
    assert check["valid"] and check["n"] == 30 and "valid" in M.validity_text(check)
    null = M.validity(base + 0.01 * rng.normal(size=30), base)
    assert not null["valid"] and M.validity_text(null).startswith("NOT valid")
    empty = M.validity([], [])
    assert empty["n"] == 0 and not empty["valid"] and np.isnan(empty["effect"])


def test_validity_verdict_does_not_depend_on_a_resampling_key():
    """The check resamples with a fixed key and enough draws that another key moves the interval's ends by a small
    fraction of the standard error: a measure on its validity line gets one verdict, not one per run seed."""
    rng = np.random.default_rng(3)
    diff = rng.normal(size=24)
    diff += 2.0 * diff.std() / np.sqrt(24) - diff.mean()  # interval's low end about 0.04 standard errors above 0
    check = M.validity(diff, np.zeros(24))
    se = diff.std(ddof=1) / np.sqrt(24)
    for key in range(1, 6):
        other = S.paired_effect(diff, np.zeros(24), n_resamples=M.VALIDITY_RESAMPLES, seed=key)
        assert abs(other["low"] - check["low"]) < 0.1 * se and abs(other["high"] - check["high"]) < 0.1 * se
    assert M.validity(diff, np.zeros(24)) == check


def test_null_band_zscore_and_outside():
    null = np.random.default_rng(0).normal(size=400)
    band = S.null_band(null)
    assert band["low"] == pytest.approx(-1.96, abs=0.25) and band["high"] == pytest.approx(1.96, abs=0.25)
    assert S.outside_band(3.0, band) and not S.outside_band(0.0, band)
    assert S.zscore(5.0, null) == pytest.approx(5.0, abs=0.5)
    assert S.zscore(1.0, np.ones(20)) == 0.0  # constant null: defined, no division by zero
    assert S.zscore(2.0, np.ones(20)) == np.inf


def test_shuffled_label_null_centres_on_zero_for_a_mean_difference():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, size=(30, 3)), rng.normal(0.0, 1.0, size=(30, 3))
    stat = lambda x, y: float(x[:, 0].mean() - y[:, 0].mean())  # noqa: E731
    null = S.shuffled_label_null(stat, a, b, n_shuffles=200)
    assert abs(null.mean()) < 0.1 and stat(a, b) > np.quantile(null, 0.99)


def test_monotonic_strict_and_under_a_perplexity_ceiling():
    c = [0.0, 1.0, 2.0, 3.0]
    assert S.monotonic(c, [0.0, 0.1, 0.3, 0.7])["strict"]
    assert S.monotonic(c[::-1], [0.7, 0.3, 0.1, 0.0])["increasing"]  # order of points does not matter
    assert S.monotonic(c, [3, 2, 1, 0])["decreasing"]
    flat = S.monotonic(c, [0.0, 0.1, 0.1, 0.7])
    assert not flat["strict"]
    res = S.monotonic(c, [0.0, 0.1, 0.3, 0.2], [1.0, 1.1, 1.3, 2.5], max_ppl_ratio=1.5)
    assert not res["strict"] and not res["fluent"] and res["strict_within_ceiling"] and res["n_within_ceiling"] == 3
    ok = S.monotonic(c, [0, 1, 2, 3], [1.0, 1.1, 1.2, 1.4], max_ppl_ratio=1.5)
    assert ok["strict_fluent"]
    # the headline criterion: increasing over the fluent points only, which must span both signs
    sweep = [-2, -1, 0, 1, 2]
    capped = S.monotonic(sweep, [0, 1, 2, 3, 1], [1.2, 1.0, 1.0, 1.1, 3.0], max_ppl_ratio=1.5)
    assert capped["increasing_within_ceiling"] and not capped["increasing"]
    assert not S.monotonic(sweep, [0, 1, 2, 3, 4], [3.0, 3.0, 1.0, 1.1, 1.2], max_ppl_ratio=1.5)[
        "increasing_within_ceiling"]  # the fluent points lie on one side of 0
    assert not S.monotonic(sweep, [0, 1, 2, 1.5, 4], [1.0] * 5, max_ppl_ratio=1.5)["increasing_within_ceiling"]
    with pytest.raises(ValueError, match="one perplexity ratio per coefficient"):
        S.monotonic(c, [0, 1, 2, 3], max_ppl_ratio=1.5)
    with pytest.raises(ValueError, match="repeat"):
        S.monotonic([0, 0, 1], [1, 2, 3])


def test_count_monotonic_counts_the_sweeps_that_meet_a_criterion():
    """Counted over `monotonic` results whose verdicts are known by construction; a field the caller added counts
    like the others, and a sweep without the field does not meet it."""
    c = [-1, 0, 1, 2]
    sweeps = [S.monotonic(c, v) for v in ([0, 1, 2, 3], [0, 1, 0.5, 3], [3, 2, 1, 0], [-1, 0, 1, 0.5])]
    # increasing: only the first; decreasing: only the third; run (>= 4 rising points of both signs): the first
    assert [S.count_monotonic(sweeps, k) for k in ("increasing", "decreasing", "strict", "run")] == [1, 1, 2, 1]
    banded = [{**sweeps[0], "outside_band": True}, {**sweeps[2], "outside_band": False}, sweeps[1]]
    assert S.count_monotonic(banded, "outside_band") == 1 and S.count_monotonic(banded, "no_such_field") == 0
    assert S.count_monotonic([], "increasing") == 0


def test_within_polarity_r_exposes_a_two_cluster_correlation():
    """Two clusters far apart along both x and y, with no association inside either: r overall is high,
    within polarity it is about 0."""
    rng = np.random.default_rng(0)
    n = 40
    groups = np.array(["pos"] * n + ["neg"] * n)
    x = np.concatenate([rng.normal(5, 1, n), rng.normal(-5, 1, n)])
    y = np.concatenate([rng.normal(5, 1, n), rng.normal(-5, 1, n)])
    res = S.within_groups_r(x, y, groups, n_resamples=300)
    assert res["overall"]["estimate"] > 0.9
    assert abs(res["pooled_within"]["estimate"]) < 0.3
    assert res["pooled_within"]["low"] < 0 < res["pooled_within"]["high"]
    # a real within-cluster association is kept
    y2 = np.concatenate([x[:n] + 0.3 * rng.normal(size=n), x[n:] + 0.3 * rng.normal(size=n)])
    res2 = S.within_groups_r(x, y2, groups, n_resamples=300)
    assert res2["pooled_within"]["low"] > 0.8 and res2["per_group"]["pos"] > 0.8


def test_pearson_matches_numpy():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert S.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    with pytest.raises(ValueError, match=">= 3"):
        S.pearson([1, 2], [1, 2])


def test_persona_space_axis_on_second_component():
    """Roles spread mostly along e0 (a topic factor) and less along e1; the default sits far out on e1:
    the axis lines up with PC2, not PC1, and the default's PC2 percentile is 1."""
    rng = np.random.default_rng(0)
    d = 8
    roles = np.zeros((50, d))
    roles[:, 0] = rng.normal(0, 5, 50)
    roles[:, 1] = rng.normal(0, 1, 50)
    roles[:, 2:] = 0.05 * rng.normal(size=(50, d - 2))
    default = np.zeros(d)
    default[1] = 10.0
    axis = D.axis_from_vectors(default, roles)
    ps = D.persona_space(roles, default, axis)
    assert abs(ps["pc_cosines"][1]) > 0.9 and abs(ps["pc_cosines"][0]) < 0.3
    assert ps["pc_percentiles"][1] == 1.0
    assert ps["top3_cosine"] > 0.95
    assert S.percentile_rank(default @ ps["components"][1], (roles - ps["mean"]) @ ps["components"][1]) == 1.0


def test_random_cosine_band_matches_the_large_width_limit():
    """cos(random unit vector, fixed vector) in d dimensions is about N(0, 1/d): |cos| has its 95% point near
    1.96 / sqrt(d). Brute force against a different fixed vector than the function's own."""
    d = 576
    band = D.random_cosine_band(d, n=20000, seed=1)
    assert band == pytest.approx(1.96 / np.sqrt(d), rel=0.05)
    fixed = D.unit(np.random.default_rng(9).normal(size=d))
    brute = np.abs(D.unit(np.random.default_rng(3).normal(size=(20000, d))) @ fixed)
    assert band == pytest.approx(np.quantile(brute, 0.95), rel=0.05)
    assert D.random_cosine_band(8, seed=0) > D.random_cosine_band(512, seed=0)
    with pytest.raises(ValueError, match="level=1.5"):
        D.random_cosine_band(8, level=1.5)


def test_random_directions_have_matched_norm_and_differ():
    r = D.random_directions(0, 20, 16, 3.0)
    assert r.shape == (20, 16) and np.allclose(np.linalg.norm(r, axis=1), 3.0, atol=1e-5)
    assert abs(D.cosine(r[0], r[1])) < 0.9
    with pytest.raises(ValueError, match="n=0"):
        D.random_directions(0, 0, 16, 1.0)


def test_orthogonal_component_recovers_a_planted_part():
    """v = (a mix of the others) + w with w orthogonal to them: the component is w, also when the others repeat a
    direction (a rank-deficient basis); no others leave v as it is; bad shapes are named."""
    rng = np.random.default_rng(4)
    others = rng.normal(size=(2, 8))
    q, _ = np.linalg.qr(others.T)
    w = rng.normal(size=8)
    w -= q @ (q.T @ w)
    v = 1.5 * others[0] - 0.7 * others[1] + w
    np.testing.assert_allclose(D.orthogonal_component(v, others), w, atol=1e-10)
    np.testing.assert_allclose(D.orthogonal_component(v, np.concatenate([others, 2 * others[:1]])), w, atol=1e-10)
    np.testing.assert_allclose(D.orthogonal_component(v, np.zeros((0, 8))), v)
    assert np.linalg.norm(D.orthogonal_component(others[0], others)) < 1e-10
    with pytest.raises(ValueError, match=r"expected \[k, D=8\]"):
        D.orthogonal_component(v, rng.normal(size=(2, 7)))
    with pytest.raises(ValueError, match="NaN"):
        D.orthogonal_component(v, np.full((1, 8), np.nan))


def _noisy_rows(rng, truth, n_groups: int, per_group: int, noise: float):
    """Positive rows truth + noise and negative rows noise, `per_group` of each per group: [N, D] twice, groups."""
    groups = np.repeat(np.arange(n_groups), per_group)
    pos = truth + noise * rng.normal(size=(len(groups), truth.shape[-1]))
    neg = noise * rng.normal(size=(len(groups), truth.shape[-1]))
    return pos, neg, groups


def test_split_half_cosine_of_two_groups_is_the_cosine_of_their_two_directions():
    rng = np.random.default_rng(0)
    pos, neg, groups = _noisy_rows(rng, rng.normal(size=12), 2, 3, 1.0)
    a = pos[groups == 0].mean(0) - neg[groups == 0].mean(0)
    b = pos[groups == 1].mean(0) - neg[groups == 1].mean(0)
    c = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    got = D.split_half_cosine(pos, neg, groups, groups, n_splits=3)
    assert np.isclose(got["half"], c) and np.isclose(got["predicted"], 2 * c / (1 + abs(c)))
    assert got["n_groups"] == 2 and np.isclose(got["low"], got["high"])
    layered = D.split_half_cosine(np.stack([pos, -pos], 1), np.stack([neg, -neg], 1), groups, groups, n_splits=3)
    np.testing.assert_allclose(layered["half"], [c, c])     # one cosine per leading index


def test_split_half_prediction_matches_the_cosine_of_independent_full_size_replicates():
    rng = np.random.default_rng(1)
    truth = rng.normal(size=64) * 0.25
    replicate = []
    for _ in range(200):
        (p1, n1, g), (p2, n2, _) = (_noisy_rows(rng, truth, 20, 1, 1.0) for _ in range(2))
        replicate.append(D.cosine(p1.mean(0) - n1.mean(0), p2.mean(0) - n2.mean(0)))
    predicted = np.mean([D.split_half_cosine(*_noisy_rows(rng, truth, 20, 1, 1.0)[:2], g, g, seed=s)["predicted"]
                         for s in range(200)])
    assert 0.2 < np.mean(replicate) < 0.9                    # a noisy regime, where the step-up matters
    assert abs(predicted - np.mean(replicate)) < 0.05


def test_distinct_half_splits_counts_the_unordered_splits():
    """Enumerated: the sets of two halves {first, rest} over every choice of n // 2 units, mirror images merged."""
    import itertools

    for n in range(2, 9):
        units = set(range(n))
        splits = {frozenset([frozenset(c), frozenset(units - set(c))]) for c in itertools.combinations(units, n // 2)}
        assert D.distinct_half_splits(n) == len(splits), n
    assert D.split_half_cosine(*[np.ones((4, 3))] * 2, [0, 0, 1, 1], [0, 0, 1, 1])["distinct_splits"] == 1


def test_split_half_cosine_needs_two_groups_with_both_polarities_and_matching_groups():
    pos, neg = np.ones((4, 3)), np.zeros((4, 3))
    assert D.split_half_cosine(pos, neg, [0, 0, 1, 1], [0, 0, 2, 2]) is None   # only group 0 has both
    assert D.split_half_cosine(pos, neg, [0, 0, 1, 1], [0, 0, 1, 1])["predicted"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one group per row"):
        D.split_half_cosine(pos, neg, [0, 1], [0, 1])
    with pytest.raises(ValueError, match="n_splits=0"):
        D.split_half_cosine(pos, neg, [0, 0, 1, 1], [0, 0, 1, 1], n_splits=0)


def test_persona_space_intervals_cover_the_estimate_and_need_enough_roles():
    rng = np.random.default_rng(1)
    roles = np.zeros((30, 6))
    roles[:, 0] = rng.normal(0, 5, 30)
    roles[:, 1] = rng.normal(0, 1, 30)
    roles[:, 2:] = 0.1 * rng.normal(size=(30, 4))
    default = np.zeros(6)
    default[1] = 6.0
    ps = D.persona_space(roles, default, D.axis_from_vectors(default, roles))
    ci = D.persona_space_intervals(roles, default, D.axis_from_vectors(default, roles), n_resamples=100)
    lo, hi = ci["pc_abs_cosine_ci"][1]
    assert lo <= abs(ps["pc_cosines"][1]) <= hi and lo > 0.8
    assert ci["pc_percentile_ci"][1][0] > 0.9 and len(ci["pc_percentile_ci"]) == 5
    with pytest.raises(ValueError, match="needs >= 8 roles; got 4"):
        D.persona_space_intervals(roles[:4], default, default)
    assert len(D.persona_space(roles[:4], default, default)["pc_cosines"]) == 3  # 4 roles span 3 directions


def test_centre_within_groups_gives_group_means_of_zero_and_checks_shapes():
    values = np.array([1.0, 2.0, 3.0, 10.0, 30.0])
    groups = np.array(["a", "a", "a", "b", "b"])
    c = S.centre_within_groups(values, groups)
    assert c[groups == "a"].mean() == pytest.approx(0) and c[groups == "b"].mean() == pytest.approx(0)
    np.testing.assert_allclose(c, [-1.0, 0.0, 1.0, -10.0, 10.0])
    with pytest.raises(ValueError, match="one group label per unit"):
        S.centre_within_groups(values, groups[:4])


def test_within_groups_null_ignores_a_between_group_difference():
    """Two groups far apart on x and y with no association inside either: the raw r is high and outside the plain
    shuffled null (centred near 0); the within-group r sits inside the within-group null, which contains 0."""
    rng = np.random.default_rng(5)
    n = 12
    groups = np.array(["a"] * n + ["b"] * n)
    x = np.concatenate([rng.normal(0, 1, n), rng.normal(10, 1, n)])
    y = np.concatenate([rng.normal(0, 1, n), rng.normal(10, 1, n)])
    r = S.pearson(x, y)
    plain = S.permutation_r_null(x, y, seed=0)
    assert r > 0.9 and abs(plain["mean"]) < 0.15 and S.outside_band(r, plain)
    within = S.within_groups_null(x, y, groups, seed=0)
    assert within["low"] < 0 < within["high"] and within["n"] >= S.MIN_NULL_DRAWS
    pooled_within = S.pearson(S.centre_within_groups(x, groups), S.centre_within_groups(y, groups))
    assert not S.outside_band(pooled_within, within)
    # the band is a function of the seed
    assert S.within_groups_null(x, y, groups, seed=0) == within
    assert S.permutation_r_null(x, y, seed=0) == plain
    assert S.within_groups_null(x, y, groups, seed=1) != within


def _two_offset_lines():
    """Two groups with y = x inside each, offset so that the between-group difference cancels the within-group
    relation in the raw pooled r (offset sqrt(8) over x = 0..4 gives raw r = 0 exactly)."""
    t, c = np.arange(5.0), np.sqrt(8.0)
    return np.r_[t, t + c], np.r_[t + c, t], np.array(["a"] * 5 + ["b"] * 5)


def test_standardised_pooled_r_finds_per_group_correlation_the_raw_pooled_r_misses():
    x, y, groups = _two_offset_lines()
    assert S.pearson(x, y) == pytest.approx(0.0, abs=1e-12)
    res = S.standardised_pooled_r(x, y, groups, n_resamples=400, seed=0)
    assert res["r"]["estimate"] == pytest.approx(1.0) and res["n"] == 10 and res["n_groups"] == 2
    assert res["null"]["high"] < 1.0 and res["outside_null"]
    assert res["per_group"]["a"]["estimate"] == pytest.approx(1.0) and res["per_group"]["a"]["n"] == 5
    assert "low" in res["per_group"]["a"]  # n >= 4: an interval is given
    assert res["statistic"] == S.STANDARDISED_POOLED_R


def test_standardised_pooled_r_is_invariant_to_per_group_affine_rescaling():
    rng = np.random.default_rng(2)
    groups = np.repeat(["a", "b", "c"], 6)
    x = rng.normal(size=18)
    y = 0.6 * x + rng.normal(0, 0.8, 18)
    base = S.standardised_pooled_r(x, y, groups, n_resamples=300, seed=4)
    x2, y2 = x.copy(), y.copy()
    x2[groups == "b"] = 7.0 * x[groups == "b"] + 3.0
    y2[groups == "c"] = 0.01 * y[groups == "c"] - 5.0
    moved = S.standardised_pooled_r(x2, y2, groups, n_resamples=300, seed=4)
    for key in ("estimate", "low", "high"):
        assert moved["r"][key] == pytest.approx(base["r"][key], abs=1e-9)
    assert moved["null"]["low"] == pytest.approx(base["null"]["low"], abs=1e-9)
    assert moved["null"]["high"] == pytest.approx(base["null"]["high"], abs=1e-9)
    # the unstandardised pooled r is not invariant: that is why it is not the headline
    assert abs(S.pearson(x2, y2) - S.pearson(x, y)) > 0.05
    # same seed, same interval; a different seed resamples differently
    assert S.standardised_pooled_r(x, y, groups, n_resamples=300, seed=4) == base
    assert S.standardised_pooled_r(x, y, groups, n_resamples=300, seed=5)["r"]["low"] != base["r"]["low"]


def test_standardised_pooled_r_leaves_out_groups_without_a_relation_to_measure():
    x, y, groups = _two_offset_lines()
    x3, y3, g3 = np.r_[x, 1.0, 2.0], np.r_[y, 5.0, 4.0], np.concatenate([groups, ["c", "c"]])  # c: two units only
    res = S.standardised_pooled_r(x3, y3, g3, n_resamples=200)
    assert res["dropped_groups"] == ["c"] and res["n"] == 10 and res["r"]["estimate"] == pytest.approx(1.0)
    assert S.standardised_pooled_r([1.0, 2.0, 3.0], [4.0, 4.0, 4.0], ["a"] * 3) is None
    with pytest.raises(ValueError, match="no spread"):
        S.standardise_within_groups([1.0, 1.0, 2.0, 3.0], ["a", "a", "b", "b"])


def test_standardised_pooled_r_skips_resamples_of_one_repeated_float():
    """A resample that draws one unit n times has no spread, even where float rounding makes its std() about 1e-17
    (copies of 0.1): such resamples are skipped, not standardised."""
    assert np.full(6, 0.1).std() > 0 and S.centre_within_groups(np.full(6, 0.1), ["a"] * 6).std() == 0
    x = np.array([0.1, 0.2, 0.4, 0.1, 0.3, 0.5] * 2)
    y = np.array([0.7, 0.1, 2.2, 0.7, 1.5, 3.0] * 2)
    groups = np.repeat(["a", "b"], 6)
    res = S.standardised_pooled_r(x, y, groups, n_resamples=4000, seed=0)
    assert 0 < res["n_valid_resamples"] < 4000 and np.isfinite(res["r"]["low"])
    with pytest.raises(ValueError, match="no spread"):
        S.standardise_within_groups(np.r_[np.full(3, 0.1), 1.0, 2.0, 3.0], ["a"] * 3 + ["b"] * 3)


def test_cohens_d_of_two_groups_against_the_textbook_formula():
    import statistics

    pos, neg = [3.0, 5.0, 4.0, 6.5], [1.0, 2.0, 0.0]
    pooled = ((3 * statistics.variance(pos) + 2 * statistics.variance(neg)) / 5) ** 0.5
    expected = (statistics.mean(pos) - statistics.mean(neg)) / pooled
    assert float(S.cohens_d(pos, neg)) == pytest.approx(expected)
    assert float(S.cohens_d(neg, pos)) == pytest.approx(-expected)
    cols = S.cohens_d(np.stack([pos[:3], pos[:3]], 1), np.stack([neg, neg], 1))
    assert cols.shape == (2,) and cols[0] == pytest.approx(3.0)  # pooled sd 1
    with pytest.raises(ValueError, match="at least 2 values"):
        S.cohens_d([1.0], [1.0, 2.0])


def _rows_of_units(true_rows, noise_sd, n_units, rng):
    """[rows, units]: each row's true value plus independent unit noise."""
    return true_rows[:, None] + rng.normal(0, noise_sd, (true_rows.size, n_units))


def test_within_groups_reliability_matches_classical_test_theory_and_ignores_group_means():
    rng = np.random.default_rng(3)
    n_rows, n_units = 600, 20
    true_rows = rng.normal(0, 1, n_rows)
    groups = np.repeat(["pos", "neg"], n_rows // 2)
    values = _rows_of_units(true_rows, np.sqrt(n_units), n_units, rng)  # noise of a row's mean: variance 1
    res = S.within_groups_reliability(values, groups, n_splits=100, seed=0)
    assert res["reliability"] == pytest.approx(0.5, abs=0.07)  # var(true) / (var(true) + var(noise of the mean))
    assert res["low"] <= res["reliability"] <= res["high"] and res["n_units"] == n_units
    shifted = values + np.where(groups == "pos", 50.0, -50.0)[:, None]  # a between-group difference only
    assert S.within_groups_reliability(shifted, groups, n_splits=100, seed=0)["reliability"] == pytest.approx(
        res["reliability"], abs=1e-9)
    pooled = S.within_groups_reliability(shifted, np.zeros(n_rows, int), n_splits=100, seed=0)
    assert pooled["reliability"] > 0.99  # the same rows with the groups' difference left in look perfectly reliable


def test_within_groups_reliability_skips_missing_units_and_rejects_bad_shapes():
    rng = np.random.default_rng(4)
    values = _rows_of_units(rng.normal(0, 1, 12), 0.1, 6, rng)
    values[0, :] = np.nan  # a row never measured
    values[1, :3] = np.nan  # a row measured on half its units
    res = S.within_groups_reliability(values, np.repeat([0, 1], 6), n_splits=50, seed=0)
    assert res["reliability"] > 0.95 and res["n_splits"] >= 1
    assert S.within_groups_reliability(values[:, :1], np.repeat([0, 1], 6)) is None
    with pytest.raises(ValueError, match="one group label per row"):
        S.within_groups_reliability(values, [0, 1])
    with pytest.raises(ValueError, match=r"\[rows, units\]"):
        S.within_groups_reliability(values[0], np.repeat([0, 1], 6))


def test_attenuation_ceiling_predicts_the_r_of_two_noisy_measures_of_one_quantity():
    rng = np.random.default_rng(5)
    n_rows, n_units = 3000, 10
    true_rows = rng.normal(0, 1, n_rows)
    groups = np.zeros(n_rows, int)
    x = _rows_of_units(true_rows, np.sqrt(n_units * 1.0), n_units, rng)  # reliability 0.5
    y = _rows_of_units(true_rows, np.sqrt(n_units * 0.25), n_units, rng)  # reliability 0.8
    ceiling = S.attenuation_ceiling(S.within_groups_reliability(x, groups, n_splits=40)["reliability"],
                                    S.within_groups_reliability(y, groups, n_splits=40)["reliability"])
    assert ceiling == pytest.approx(np.sqrt(0.4), abs=0.05)
    assert S.pearson(x.mean(1), y.mean(1)) == pytest.approx(ceiling, abs=0.05)
    assert S.attenuation_ceiling(0.64, 0.25) == pytest.approx(0.4) and S.attenuation_ceiling(-0.2, 0.9) == 0.0


def test_spearman_brown_steps_a_half_size_agreement_up_and_mirrors_below_zero():
    np.testing.assert_allclose(S.spearman_brown([0.5, 0.0, 1.0, -0.5]), [2 / 3, 0.0, 1.0, -2 / 3])
    assert float(S.spearman_brown(0.25)) == pytest.approx(0.4)  # 2 x 0.25 / 1.25


def _quantile_by_hand(values, q):
    """numpy's default (linear) quantile, written out: the value at position q * (n - 1) of the sorted values."""
    s = sorted(values)
    h = q * (len(s) - 1)
    lo = int(h)
    return s[lo] if lo + 1 == len(s) else s[lo] + (h - lo) * (s[lo + 1] - s[lo])


def _mean(values):
    return sum(values) / len(values)


def test_reduction_ci_is_one_minus_a_ratio_of_means_resampling_the_pairs_jointly():
    treated = [0.4, 1.1, -0.2, 0.9, 0.3, 0.7, 0.0]
    reference = [1.0, 2.5, 0.5, 2.0, 1.2, 1.9, 0.8]
    ci = S.reduction_ci(np.array(treated), np.array(reference), n_resamples=300, seed=5)
    assert ci["estimate"] == pytest.approx(1 - sum(treated) / sum(reference), rel=1e-12) and ci["n"] == 7
    # the same draws of units (the function's seeded generator), each resample's statistic computed by hand
    draws = np.random.default_rng(5).integers(0, 7, size=(300, 7)).tolist()
    stats = [1 - _mean([treated[i] for i in row]) / _mean([reference[i] for i in row]) for row in draws]
    assert ci["low"] == pytest.approx(_quantile_by_hand(stats, 0.025), rel=1e-12)
    assert ci["high"] == pytest.approx(_quantile_by_hand(stats, 0.975), rel=1e-12)
    # pairs kept together: a treatment that removes three quarters of every unit's effect has no spread at all
    plain = np.array([1.0, 2.0, 3.0, 2.0])
    exact = S.reduction_ci(0.25 * plain, plain, seed=0)
    assert exact["estimate"] == pytest.approx(0.75) and exact["low"] == pytest.approx(0.75)
    assert exact["high"] == pytest.approx(0.75)
    assert S.reduction_ci(np.array([0.5]), np.array([2.0]))["low"] == 0.75  # one unit: the point
    with pytest.raises(ValueError, match="paired units"):
        S.reduction_ci(np.zeros(3), np.ones(4))


def test_reduction_jackknife_ci_leaves_one_unit_out_at_student_t_values():
    treated = [0.4, 0.1, 0.6, 0.2, 0.5]
    reference = [2.0, 1.5, 2.5, 1.0, 2.2]
    ci = S.reduction_jackknife_ci(treated, reference)
    n = len(treated)
    est = 1 - _mean(treated) / _mean(reference)
    loo = [1 - _mean(treated[:i] + treated[i + 1:]) / _mean(reference[:i] + reference[i + 1:]) for i in range(n)]
    se = ((n - 1) / n * sum((v - _mean(loo)) ** 2 for v in loo)) ** 0.5
    t4 = 2.7764451051977987  # Student's t, 4 degrees of freedom, 97.5% quantile (printed table: 2.776)
    assert ci["estimate"] == pytest.approx(est, rel=1e-12) and ci["n"] == 5
    assert ci["se"] == pytest.approx(se, rel=1e-10)
    assert ci["low"] == pytest.approx(est - t4 * se, rel=1e-9) and ci["high"] == pytest.approx(est + t4 * se, rel=1e-9)
    # a unit whose reference barely moves: the mean of per-unit ratios is thrown far off, the ratio of means is not
    near_zero = S.reduction_jackknife_ci(treated[:4] + [0.3], reference[:4] + [0.001])
    assert _mean([1 - t / r for t, r in zip(treated[:4] + [0.3], reference[:4] + [0.001])]) < -50
    assert near_zero["estimate"] == pytest.approx(1 - 1.6 / 7.001, rel=1e-12) and 0 < near_zero["estimate"] < 1
    one = S.reduction_jackknife_ci([0.5], [2.0])
    assert one == {"estimate": 0.75, "low": 0.75, "high": 0.75, "n": 1}  # one unit: the point, no se


def test_perplexity_ratio_ci_exponentiates_the_mean_per_token_nll_change_per_conversation():
    base_nll, counts = np.array([10.0, 20.0, 30.0]), np.array([10, 10, 10])
    cost = S.perplexity_ratio_ci(base_nll, counts, base_nll + 0.5 * counts, counts)
    assert cost["ratio"] == pytest.approx(2.718281828459045 ** 0.5) and cost["n"] == 3
    assert cost["low"] == pytest.approx(cost["ratio"]) and cost["high"] == pytest.approx(cost["ratio"])
    # conversations weigh the same whatever their length; one without tokens counts as no change
    base = [12.0, 3.0, 40.0, 0.0, 9.0]
    tuned = [13.5, 2.4, 46.0, 0.0, 9.9]
    c0, c1 = [6, 2, 20, 0, 3], [6, 2, 20, 0, 3]
    ci = S.perplexity_ratio_ci(np.array(base), np.array(c0), np.array(tuned), np.array(c1), n_resamples=250, seed=2)
    change = [t / max(k1, 1) - b / max(k0, 1) for b, t, k0, k1 in zip(base, tuned, c0, c1)]
    e = 2.718281828459045
    assert ci["ratio"] == pytest.approx(e ** _mean(change), rel=1e-12) and ci["n"] == 5
    draws = np.random.default_rng(2).integers(0, 5, size=(250, 5)).tolist()
    means = [_mean([change[i] for i in row]) for row in draws]
    assert ci["low"] == pytest.approx(e ** _quantile_by_hand(means, 0.025), rel=1e-12)
    assert ci["high"] == pytest.approx(e ** _quantile_by_hand(means, 0.975), rel=1e-12)


def test_auroc_by_hand():
    assert S.auroc([1, 1, 0, 0], [3, 2, 1, 0]) == 1.0
    assert S.auroc([1, 1, 0, 0], [0, 1, 2, 3]) == 0.0
    assert S.auroc([1, 0], [1, 1]) == 0.5  # ties count 1/2
    assert S.auroc([1, 1, 0, 0], [3, 1, 2, 0]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="both classes"):
        S.auroc([1, 1], [0.2, 0.1])


def test_auroc_ci_resamples_units():
    """The interval holds the estimate, narrows with more units, and matches a bootstrap written here."""
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2 == 0
    s = y * 1.0 + rng.normal(size=40)
    ci = S.auroc_ci(y, s, n_resamples=300, seed=3)
    assert ci["low"] <= ci["estimate"] <= ci["high"] and ci["n"] == 40 and ci["n_pos"] == 20
    idx = np.random.default_rng(3).integers(0, 40, size=(300, 40))
    by_hand = [S.auroc(y[i], s[i]) for i in idx if 0 < y[i].sum() < 40]
    assert ci["low"] == pytest.approx(np.quantile(by_hand, 0.025))
    y4, s4 = np.tile(y, 4), np.tile(s, 4) + rng.normal(scale=1e-6, size=160)
    wide = S.auroc_ci(y4, s4, n_resamples=300, seed=3)
    assert wide["high"] - wide["low"] < ci["high"] - ci["low"]
    with pytest.raises(ValueError, match="equal 1-d shapes"):
        S.auroc_ci([1, 0], [0.5])
