"""sae.features.discovery: the discovery / validation contrast, its shuffled-label null, trait-specific ranking,
specificity, unit-level effects and the decoder-cosine band, each checked against numpy written out here."""
from __future__ import annotations

import numpy as np
import pytest

from sae.features import discovery as D
from sae.features.collect import ConversationStats

S = 9  # latents


def _d(a, b):
    """Cohen's d per column by hand: mean difference over the pooled sd (ddof 1)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    pooled = np.sqrt(((len(a) - 1) * a.var(0, ddof=1) + (len(b) - 1) * b.var(0, ddof=1)) / (len(a) + len(b) - 2))
    with np.errstate(invalid="ignore"):  # a dead latent: 0 / 0
        return (a.mean(0) - b.mean(0)) / pooled


def _labelled(seed: int = 0):
    """30 conversations: pos / neg x 3 questions per split x 2 samples + 6 of a third group; latent 2 is planted
    for pos on both splits, latent 4 on discovery only, latent 7 never fires; conversations 1 and 20 have no
    selected tokens."""
    rng = np.random.default_rng(seed)
    groups, splits, questions = [], [], []
    for g in ("pos", "neg"):
        for q in range(6):
            for _ in range(2):
                groups.append(g)
                splits.append(D.DISCOVERY if q < 3 else D.VALIDATION)
                questions.append(q)
    for q in range(6):
        groups.append("other")
        splits.append(D.DISCOVERY if q < 3 else D.VALIDATION)
        questions.append(q)
    g, s = np.array(groups), np.array(splits)
    mean = np.abs(rng.normal(0, 1, (len(groups), S)))
    mean[g == "pos", 2] += 3.0
    mean[(g == "pos") & (s == D.DISCOVERY), 4] += 3.0
    mean[:, 7] = 0.0
    n = rng.integers(1, 10, len(groups))
    n[[1, 20]] = 0
    fire = (mean > 0) * rng.uniform(0.1, 1.0, mean.shape)
    stats = ConversationStats(mean, fire, n, rng.normal(0, 1, (len(groups), 5)))
    return stats, groups, splits, questions


def _sel(groups, splits, n, group, split=None):
    return [i for i in range(len(groups)) if groups[i] == group and (split is None or splits[i] == split) and n[i] > 0]


def test_take_keeps_the_rows_in_the_given_order():
    stats, *_ = _labelled()
    sub = stats.take([5, 0, 5])
    for field in ("mean", "fire", "n", "resid_mean"):
        np.testing.assert_array_equal(getattr(sub, field), getattr(stats, field)[[5, 0, 5]])


def test_split_contrast_ranks_on_discovery_and_checks_on_validation():
    stats, groups, splits, _ = _labelled()
    res = D.split_contrast(stats, groups, splits, "pos", "neg", n_candidates=3, d_discover=0.8, d_replicate=0.5)
    m = stats.mean
    sel = lambda grp, split=None: m[_sel(groups, splits, stats.n, grp, split)]  # noqa: E731
    d_disc = _d(sel("pos", D.DISCOVERY), sel("neg", D.DISCOVERY))
    d_val = _d(sel("pos", D.VALIDATION), sel("neg", D.VALIDATION))
    d_all = _d(sel("pos"), sel("neg"))
    finite = np.isfinite(d_disc)
    np.testing.assert_allclose(res["d_discovery"][finite], d_disc[finite], rtol=1e-9)
    np.testing.assert_allclose(res["d_validation"][finite], d_val[finite], rtol=1e-9)
    assert res["d_discovery"][7] == 0  # a dead latent: d 0, not NaN
    top = np.argsort(-np.where(finite, d_disc, 0.0), kind="stable")[:3]
    assert [c["latent"] for c in res["candidates"]] == list(top) and top[0] in (2, 4)
    # latent 4 separates the discovery conversations only: ranked, but not found; latent 2 replicates
    expect = [int(lat) for lat in top if d_disc[lat] >= 0.8 and d_val[lat] >= 0.5]
    assert res["found"] == expect and 2 in expect and 4 not in expect and res["n_found"] == len(expect)
    c2 = next(c for c in res["candidates"] if c["latent"] == 2)
    assert c2["d_all"] == pytest.approx(d_all[2]) and c2["mean_a"] == pytest.approx(sel("pos")[:, 2].mean())
    assert c2["mean_b"] == pytest.approx(sel("neg")[:, 2].mean()) and c2["found"]
    pos = _sel(groups, splits, stats.n, "pos")
    fire_a = (stats.fire[pos, 2] * stats.n[pos]).sum() / stats.n[pos].sum()
    assert c2["fire_a"] == pytest.approx(fire_a)
    live = np.arange(S) != 7
    r = np.corrcoef(np.nan_to_num(d_disc[live]), np.nan_to_num(d_val[live]))[0, 1]
    assert res["halves_correlation"] == pytest.approx(r)
    # the "other" group is in no count; conversation 1 (pos, discovery) has no tokens but is still counted as a row
    assert res["n"] == {D.DISCOVERY: {"pos": 6, "neg": 6}, D.VALIDATION: {"pos": 6, "neg": 6}}
    with pytest.raises(ValueError, match="splits has 2 labels for 30 conversations"):
        D.split_contrast(stats, groups, splits[:2], "pos", "neg", n_candidates=3, d_discover=0.8, d_replicate=0.5)


def test_shuffled_contrasts_permute_labels_within_each_split_in_seed_order():
    stats, groups, splits, _ = _labelled(1)
    kw = dict(n_candidates=3, d_discover=0.8, d_replicate=0.5)
    null = D.shuffled_contrasts(stats, groups, splits, "pos", "neg", seed=5, n_rep=3, **kw)
    rng = np.random.default_rng(5)
    for rep in null:
        shuffled = list(groups)
        for split in (D.DISCOVERY, D.VALIDATION):
            ids = [i for i in range(len(groups)) if splits[i] == split and groups[i] in ("pos", "neg")]
            for i, g in zip(ids, rng.permutation([groups[i] for i in ids])):
                shuffled[i] = str(g)
        assert shuffled[24:] == ["other"] * 6
        for split, key in ((D.DISCOVERY, "d_discovery"), (D.VALIDATION, "d_validation")):
            d = _d(stats.mean[_sel(shuffled, splits, stats.n, "pos", split)],
                   stats.mean[_sel(shuffled, splits, stats.n, "neg", split)])
            ok = np.isfinite(d)
            np.testing.assert_allclose(rep[key][ok], d[ok], rtol=1e-9)
    # a different seed gives different shuffles; the same seed the same ones
    again = D.shuffled_contrasts(stats, groups, splits, "pos", "neg", seed=5, n_rep=3, **kw)
    assert all(np.array_equal(a["d_discovery"], b["d_discovery"]) for a, b in zip(null, again))
    other = D.shuffled_contrasts(stats, groups, splits, "pos", "neg", seed=6, n_rep=1, **kw)
    assert not np.array_equal(other[0]["d_discovery"], null[0]["d_discovery"])


def test_trait_specific_ranking_finds_the_latent_a_trait_does_not_share():
    """Planted d arrays: latent 0 separates every trait's prompts (a persona-prompt latent), latent 1 only evil's,
    latent 3 evil's too weakly, latent 4 only humorous's, latent 2 never fires. The margin ranking finds latent 1 for
    evil and 4 for humorous, and none of them for sycophantic."""
    nan = float("nan")
    d_disc = {"evil": np.array([1.5, 1.0, nan, 0.5, 0.1]), "humorous": np.array([1.4, 0.1, nan, 0.0, 1.2]),
              "sycophantic": np.array([1.3, 0.1, nan, 0.0, 0.2])}
    d_val = {"evil": np.array([1.0, 0.8, nan, 0.6, 0.0]), "humorous": np.array([1.2, 0.2, nan, 0.0, 0.9]),
             "sycophantic": np.array([1.1, 0.2, nan, 0.0, 0.1])}
    kw = dict(n_candidates=3, d_discover=0.8, d_replicate=0.5)
    evil = D.specific_contrast(d_disc, d_val, "evil", **kw)
    assert [c["latent"] for c in evil["candidates"]] == [1, 3, 0]
    assert evil["found"] == [1] and evil["best"] == 1
    assert evil["candidates"][0]["margin_discovery"] == pytest.approx(1.0 - 0.1)
    assert evil["candidates"][0]["margin_validation"] == pytest.approx(0.8 - 0.2)
    assert evil["candidates"][2]["margin_validation"] == pytest.approx(1.0 - 1.2)  # latent 0: shared, not found
    assert evil["candidates"][0]["d_validation_other_traits"] == {"humorous": 0.2, "sycophantic": 0.2}
    assert D.specific_contrast(d_disc, d_val, "humorous", **kw)["found"] == [4]
    syc = D.specific_contrast(d_disc, d_val, "sycophantic", **kw)
    assert syc["found"] == [] and syc["best"] == syc["candidates"][0]["latent"]
    with pytest.raises(ValueError, match="at least two traits"):
        D.specific_contrast({"evil": d_disc["evil"]}, {"evil": d_val["evil"]}, "evil", **kw)


def test_trait_specific_margins_match_numpy_on_random_d():
    rng = np.random.default_rng(3)
    traits = ("a", "b", "c")
    d_disc = {t: rng.normal(0, 1, 40) for t in traits}
    d_val = {t: rng.normal(0, 1, 40) for t in traits}
    d_disc["a"][[3, 9]] = [2.5, 2.0]
    d_val["a"][[3, 9]] = [1.5, 0.1]
    res = D.specific_contrast(d_disc, d_val, "a", n_candidates=5, d_discover=0.8, d_replicate=0.5)
    margin_disc = d_disc["a"] - np.maximum(d_disc["b"], d_disc["c"])
    margin_val = d_val["a"] - np.maximum(d_val["b"], d_val["c"])
    order = sorted(range(40), key=lambda i: -margin_disc[i])[:5]
    assert [c["latent"] for c in res["candidates"]] == order
    for c in res["candidates"]:
        i = c["latent"]
        assert c["margin_discovery"] == pytest.approx(margin_disc[i])
        assert c["margin_validation"] == pytest.approx(margin_val[i])
        assert c["found"] == bool(d_disc["a"][i] >= 0.8 and margin_disc[i] > 0 and d_val["a"][i] >= 0.5
                                  and margin_val[i] > 0)
    assert 3 in res["found"] and 9 not in res["found"]


def test_latent_specificity_names_latents_shared_between_traits():
    d = {"evil": np.array([0.9, 0.1, 0.6]), "humorous": np.array([0.2, 1.0, 0.7]),
         "sycophantic": np.array([0.1, 0.2, 0.8]), "role-vs-default": np.array([0.0, 0.3, 1.2])}
    best = {"evil": 0, "humorous": 1, "sycophantic": 2, "role-vs-default": 2}
    traits = ["evil", "humorous", "sycophantic"]
    spec = D.latent_specificity(d, best, traits, d_replicate=0.5)
    assert spec["evil"] == {"d_validation_other_traits": {"humorous": 0.2, "sycophantic": 0.1}, "shared_with": [],
                            "specific": True}
    assert spec["humorous"]["specific"] and spec["humorous"]["shared_with"] == []
    # latent 2 fires for sycophantic (0.8) but also for evil (0.6) and humorous (0.7): shared, still the top
    assert spec["sycophantic"]["shared_with"] == ["evil", "humorous"] and spec["sycophantic"]["specific"]
    assert spec["role-vs-default"]["specific"] is None
    assert spec["role-vs-default"]["shared_with"] == ["evil", "humorous", "sycophantic"]
    d["evil"][1] = 1.1  # now latent 1 separates evil better than humorous: not humorous-specific
    spec = D.latent_specificity(d, best, traits, 0.5)
    assert spec["humorous"]["specific"] is False and spec["humorous"]["shared_with"] == ["evil"]


def test_unit_effect_averages_inside_a_question_and_bootstraps_over_questions():
    mean = np.zeros((8, 4))
    mean[:, 2] = [3, 1, 0, 0, 5, 3, 1, 1]  # question 0: pos 3, 1 -> 2; neg 0; question 1: pos 4, neg 1
    groups = ["pos", "pos", "neg", "neg"] * 2
    questions = [0] * 4 + [1] * 4
    stats = ConversationStats(mean, mean > 0, np.ones(8, int), np.zeros((8, 3)))
    eff = D.unit_effect(stats, groups, [D.VALIDATION] * 8, questions, 2, "pos", "neg", split=D.VALIDATION, seed=0)
    assert eff["n"] == 2 and eff["n_conversations"] == 8 and eff["estimate"] == pytest.approx(2.5)
    assert (eff["low"], eff["high"]) == (pytest.approx(2.0), pytest.approx(3.0)) and eff["excludes_zero"]
    none = D.unit_effect(stats, groups, [D.VALIDATION] * 8, questions, 2, "pos", "neg", split=D.DISCOVERY, seed=0)
    assert none["n"] == 0 and np.isnan(none["estimate"]) and not none["excludes_zero"]


def test_unit_effect_matches_a_bootstrap_written_out():
    stats, groups, splits, questions = _labelled(2)
    eff = D.unit_effect(stats, groups, splits, questions, 2, "pos", "neg", split=D.DISCOVERY, seed=4)
    diffs, n_conv = [], 0
    for q in range(3):
        a = [i for i in range(len(groups)) if questions[i] == q and groups[i] == "pos" and stats.n[i] > 0]
        b = [i for i in range(len(groups)) if questions[i] == q and groups[i] == "neg" and stats.n[i] > 0]
        diffs.append(stats.mean[a, 2].mean() - stats.mean[b, 2].mean())
        n_conv += len(a) + len(b)
    diffs = np.asarray(diffs)
    boot = diffs[np.random.default_rng(4).integers(0, 3, size=(2000, 3))].mean(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    assert eff["estimate"] == pytest.approx(diffs.mean()) and eff["n"] == 3
    assert eff["n_conversations"] == n_conv == 11  # conversation 1 has no selected tokens
    assert (eff["low"], eff["high"]) == (pytest.approx(lo), pytest.approx(hi))


def test_cosine_band_is_the_random_directions_band():
    rng = np.random.default_rng(0)
    W = rng.normal(0, 1, (6, 16))
    v = rng.normal(0, 1, 16)
    W[0] = 2 * v
    cb = D.cosine_band(W, v, [0, 3], n_random=200, seed=7)
    r = np.random.default_rng(7).normal(size=(200, 16))
    null = (r / np.linalg.norm(r, axis=1, keepdims=True)) @ (v / np.linalg.norm(v))
    lo, hi = np.quantile(null, [0.025, 0.975])
    assert (cb["band"]["low"], cb["band"]["high"]) == (pytest.approx(lo, rel=1e-5), pytest.approx(hi, rel=1e-5))
    cos3 = W[3] @ v / (np.linalg.norm(W[3]) * np.linalg.norm(v))
    assert cb["cosines"] == {0: pytest.approx(1.0), 3: pytest.approx(cos3)}
    assert cb["z"][3] == pytest.approx((cos3 - null.mean()) / null.std(ddof=1), rel=1e-4)
    assert cb["outside"] == 1 + int(not lo <= cos3 <= hi) and cb["n"] == 2
    empty = D.cosine_band(W, v, [], n_random=200, seed=7)
    assert empty["n"] == 0 and empty["outside"] == 0 and empty["cosines"] == {}


def test_mean_resid_norm_skips_conversations_without_tokens():
    stats, *_ = _labelled()
    keep = stats.n > 0
    assert D.mean_resid_norm(stats) == pytest.approx(np.sqrt((stats.resid_mean[keep] ** 2).sum(1)).mean())
