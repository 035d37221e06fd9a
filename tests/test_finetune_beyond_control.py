"""The fine-tuning study's measures beyond the control fine-tune, on constructed rows: the shared drift of every
fine-tune cancels, the correlations run on the mix fine-tunes only, and prevention is judged against the control."""
import dataclasses

import numpy as np
import pytest

from experiments import finetune as F
from experiments.finetune import report_records, report_text
from experiments.finetune import summary as ft_summary


def _row(kind, name, shift_q, score, screening=0.0, mix=None, coef=0.0, ppl_nll=None):
    shift_q, score = np.asarray(shift_q, float), np.asarray(score, float)
    row = {"variant": F.Variant(name, kind, (), mix=mix, coef=coef, screening=screening),
           "shift": {"per_question": shift_q, "ci": {"estimate": float(shift_q.mean()), "low": 0.0, "high": 0.0}},
           "score": score, "score_change": {"estimate": float(score.mean())}}
    if ppl_nll is not None:
        row["ppl_nll"], row["ppl"] = ppl_nll, {"ratio": 1.0, "low": 1.0, "high": 1.0}
    return row


def _trait(name, drift, noise_seed):
    """Mixes whose shift and score beyond the control grow with the mix, on top of a trait-specific drift that the
    control shares; the raw shifts (drift included) differ between traits."""
    rng = np.random.default_rng(noise_seed)
    n = 6
    ctrl_shift, ctrl_score = drift + rng.normal(0, 0.1, n), rng.normal(0, 0.01, n)
    rows = [_row("control", "control", ctrl_shift, ctrl_score)]
    for p in (0.0, 0.5, 1.0):
        rows.append(_row("mix", f"mix {p:.2f}", ctrl_shift + 2.0 * p + rng.normal(0, 0.05, n),
                         ctrl_score + 0.3 * p + rng.normal(0, 0.01, n), screening=5.0 * p, mix=p))
    return {"trait": name, "rows": rows}


def test_correlations_are_taken_beyond_each_traits_control():
    cfg = F.Config(traits=("a", "b"), mixes=(0.0, 0.5, 1.0))
    results = [_trait("a", -6.0, 0), _trait("b", 9.0, 1)]
    m = ft_summary._correlations(results, cfg)
    assert m["relative_to_control"] and m["shift_behaviour"]["n"] == 6  # mixes only: the control is 0 by construction
    assert m["shift_behaviour"]["r"]["estimate"] > 0.95 and m["screening_shift"]["r"]["estimate"] > 0.95
    # raw: the drift differs between traits, which breaks the unstandardised pooled relation between screening and
    # shift; standardising inside each trait removes the drift's offset
    raw = m["screening_shift_raw"]
    assert raw["n"] == 8 and raw["unstandardised"]["r"]["estimate"] < 0.5 and raw["r"]["estimate"] > 0.8
    rel = {(b["trait"], b["name"]): b for b in m["beyond_control"]}
    assert rel[("b", "mix 1.00")]["shift"]["estimate"] == pytest.approx(2.0, abs=0.1)
    assert rel[("a", "mix 0.00")]["score_change"]["estimate"] == pytest.approx(0.0, abs=0.02)


def test_without_a_control_the_raw_correlations_are_the_headline():
    cfg = F.Config(traits=("a",), mixes=(0.0, 0.5, 1.0), control=False, narrow=False)
    results = [{"trait": "a", "rows": _trait("a", -6.0, 0)["rows"][1:]}]
    m = ft_summary._correlations(results, cfg)
    assert not m["relative_to_control"] and m["shift_behaviour"] is m["shift_behaviour_raw"]
    assert m["shift_behaviour"]["n"] == 3


def test_prevention_is_judged_beyond_the_control_with_cost_over_the_plain_fine_tune():
    cfg = F.Config(traits=("a",), mixes=(1.0,))
    counts = np.full(4, 100.0)
    base = np.full(4, 200.0)
    control = _row("control", "control", [-6.0, -6.2, -5.8, -6.0], np.zeros(4))
    plain = _row("mix", "mix 1.00", [-4.0, -4.2, -3.8, -4.0], np.full(4, 0.3), mix=1.0, ppl_nll=(base, counts))
    # steered: the shift beyond the control is 0.5 of plain's 2.0 -> a 75% cut; NLL +0.01 per token over plain
    steered = _row("prevent", "preventative c=1", [-5.5, -5.7, -5.3, -5.5], np.full(4, 0.1), mix=1.0, coef=1.0,
                   ppl_nll=(base + 1.0, counts))
    p = ft_summary._prevention(steered, plain, control, cfg)
    assert p["relative_to_control"] and p["plain_toward_trait"]
    assert p["reduction"]["estimate"] == pytest.approx(0.75) and p["reduction_raw"]["estimate"] < 0
    assert p["ppl_vs_plain"]["ratio"] == pytest.approx(np.exp(0.01))
    assert F.prevention_target(p)
    costly = _row("prevent", "c=4", steered["shift"]["per_question"], np.zeros(4), coef=4.0,
                  ppl_nll=(base + 10.0, counts))
    assert not F.prevention_target(ft_summary._prevention(costly, plain, control, cfg))  # exp(0.1) > 1.05
    weak = _row("prevent", "c=0.1", [-4.1, -4.3, -3.9, -4.1], np.zeros(4), coef=0.1, ppl_nll=(base, counts))
    assert not F.prevention_target(ft_summary._prevention(weak, plain, control, cfg))  # a 5% cut


def test_within_trait_null_shuffles_inside_traits_only():
    groups = ["a"] * 4 + ["b"] * 4
    x = np.array([0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0])
    y = np.array([0.0, 1.1, 1.9, 3.2, -20.0, -19.0, -18.1, -16.9])  # related inside each trait, offset between them
    c = F.correlation(x, y, groups, seed=0)
    assert c["unstandardised"]["r"]["estimate"] < 0 and c["within_trait"]["estimate"] > 0.95
    band = c["within_trait_null"]
    assert band["n"] >= 20 and band["high"] < 0.95 and c["within_trait_outside_null"]
    # y constant inside each trait: no within-trait r, so no band either, and the headline falls back to the
    # unstandardised pooled r (named as such)
    flat = F.correlation(x, np.repeat([1.0, 5.0], 4), groups, seed=0)
    assert flat["r"]["estimate"] > 0.9 and "within_trait_null" not in flat and flat["statistic"] == F.RAW_STATISTIC


def test_headline_correlation_is_the_pre_registered_standardised_pooled_r():
    """Traits on different scales with the same relation inside each: the headline is the pooled r of per-trait
    standardised values (near 1, outside its within-trait null), while the unstandardised pooled r is not."""
    t = np.arange(5.0)
    groups = ["a"] * 5 + ["b"] * 5 + ["c"] * 5
    x = np.r_[t, 40.0 + 0.1 * t, -3.0 + 2.0 * t]
    y = np.r_[t + 0.1 * np.sin(t), -8.0 + 30.0 * t, 100.0 + 0.5 * t]
    c = F.correlation(x, y, groups, seed=0)
    assert c["statistic"] == F.HEADLINE_STATISTIC and "pre-registered before the seed-1 run" in c["statistic"]
    assert c["r"]["estimate"] > 0.99 and c["outside_null"] and c["null_kind"] == "pairs shuffled inside each trait"
    assert set(c["per_trait"]) == {"a", "b", "c"} and all(p["n"] == 5 and "low" in p for p in c["per_trait"].values())
    assert c["unstandardised"]["r"]["estimate"] < 0.5
    text = report_text.corr_text(c, "Shift vs behaviour")
    assert "pre-registered" in text and "per trait: a r = " in text and "unstandardised pooled r = " in text


def test_a_correlation_between_traits_only_is_reported_with_its_caveat_and_not_recorded():
    """One fine-tune per trait: the pooled r compares the traits, so the report says so and no line is written."""
    groups = ["a", "a", "b", "b", "c", "c"]
    c = F.correlation([0.0, 1.0, 5.0, 6.0, 2.0, 3.0], [1.0, 0.5, 4.0, 3.0, 2.0, 2.5], groups, seed=0)
    assert c["statistic"] == F.RAW_STATISTIC and "within_trait" in c
    assert "compares the traits with each other" in report_text.corr_text(c, "Shift vs behaviour")
    cfg = F.Config(traits=("evil", "humorous", "sycophantic"), mixes=(1.0,), caft=False, inoculation=False,
                   persona_switch=False, narrow=False, model_diff=False)
    metrics = {"shift_behaviour": c, "screening_shift": c, "shift_behaviour_raw": None, "screening_shift_raw": None,
               "relative_to_control": True, "traits": {}}
    result = F.Result(cfg, [], metrics, "psm-tiny", 2, 8, 0.0)
    assert report_records.result_records(result) == []
    one_trait = F.Result(dataclasses.replace(cfg, traits=("evil",)), [], metrics, "psm-tiny", 2, 8, 0.0)
    assert {ln["metric"] for ln in report_records.result_records(one_trait)} == {"finetune_shift_behaviour_r",
                                                                                 "finetune_screening_r"}
