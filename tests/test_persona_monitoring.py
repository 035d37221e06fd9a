"""Monitoring in the method library (`psm_jax.persona.monitoring`): the graded prompts, which units each prompt
scores, and the statistics checked against direct numpy computations."""
from __future__ import annotations

import numpy as np
import pytest

from psm_jax.persona import monitoring
from psm_jax.persona.datasets import load_trait
from psm_jax.persona.prompts import load_traits

def test_monitor_prompts_are_graded_and_validity_uses_the_full_instructions():
    """Monitoring runs over the graded prompts (levels -3..+3, few-shot variants included); the validity contrast
    keeps only the five full positive and five full negative instructions."""
    systems = monitoring.graded_prompts(load_traits(["evil"])[0])
    assert len(systems) == 15 and sorted({s.level for s in systems}) == [-3, -2, -1, 0, 1, 2, 3]
    assert [s.pair for s in systems if s.level == 2] == [0, 1, 2, 3, 4]
    assert {s.pair for s in systems if abs(s.level) == 3} == {0} and {s.pair for s in systems if abs(s.level) < 2} == {-1}
    assert [s.system for s in systems if s.kind == "default"] == [None]
    assert all("Example. User:" in s.system for s in systems if abs(s.level) == 3)
    kinds = monitoring.validity_kinds(systems)
    assert (kinds == "pos").sum() == 5 and (kinds == "neg").sum() == 5 and (kinds == "other").sum() == 5


def test_measure_per_prompt_never_scores_a_prompts_own_answers(monkeypatch):
    """A prompt that uses instruction pair p (full or few-shot) skips the units whose answers pair p generated; the
    mild and default prompts score every unit."""
    seen = {}

    def fake_measure(model, questions, pos, neg, *, system=None, batch_size=16):
        seen[system] = list(questions)
        return 0.0, np.arange(len(questions), dtype=float)

    monkeypatch.setattr(monitoring, "response_measure", fake_measure)
    held = [{"question": f"q{p}", "pos": "a", "neg": "b", "pair": p} for p in (0, 1, 2)]
    systems = [monitoring.MonitorPrompt("pos", 0, "full0", 2), monitoring.MonitorPrompt("pos", 0, "fewshot0", 3),
               monitoring.MonitorPrompt("pos", -1, "mild", 1), monitoring.MonitorPrompt("neg", 2, "full2", -2)]
    per_unit, n_used = monitoring.measure_per_prompt(None, held, systems, 4)
    assert seen == {"full0": ["q1", "q2"], "fewshot0": ["q1", "q2"], "mild": ["q0", "q1", "q2"], "full2": ["q0", "q1"]}
    assert n_used == [2, 2, 3, 2] and np.isnan(per_unit[0, 0]) and np.isnan(per_unit[3, 2])


def test_holdout_prompts_use_no_instruction_pair_and_take_polarity_from_the_level():
    trait = load_trait("evil")
    held = monitoring.holdout_prompts(trait)
    assert len(held) == len(trait.monitor_holdout) >= 8
    assert [p.level for p in held] == [g.level for g in trait.monitor_holdout]
    assert all(p.pair == -1 and p.kind == ("pos" if p.level > 0 else "neg") for p in held)
    assert monitoring.holdout_prompts(load_trait("apathetic")) == []


def test_monitor_at_layer_matches_numpy_statistics():
    """Projections of prompt-major rows onto a layer's unit direction, averaged per prompt: the overall r, the
    within-polarity r (each polarity's mean removed from both series) and the validity contrast, against numpy; a
    prompt with no finite unit is left out of the correlations."""
    rng = np.random.default_rng(3)
    prompts = [monitoring.MonitorPrompt(k, i, f"{k}{i}", lvl) for k, lvl in (("pos", 2), ("neg", -2)) for i in range(5)]
    prompts += [monitoring.MonitorPrompt("pos", -1, "mild", 1), monitoring.MonitorPrompt("default", -1, None, 0)]
    n_p, n_q, n_layers, d = len(prompts), 4, 3, 5
    acts = {"last_prompt": rng.normal(size=(n_p * n_q, n_layers, d)),
            "response_mean": rng.normal(size=(n_p * n_q, n_layers, d))}
    direction = rng.normal(size=(n_layers, d))
    per_unit = rng.normal(size=(n_p, 6))
    per_unit[-1] = np.nan
    mon = monitoring.monitor_at_layer(per_unit, prompts, acts, direction, 1, seed=0)

    u = direction[1] / np.linalg.norm(direction[1])
    p_last = (acts["last_prompt"][:, 1] @ u).reshape(n_p, n_q).mean(1)
    p_resp = (acts["response_mean"][:, 1] @ u).reshape(n_p, n_q).mean(1)
    m = per_unit.mean(1)
    ok = np.isfinite(m)
    np.testing.assert_allclose(mon["proj_last_prompt"], p_last, rtol=1e-6)
    np.testing.assert_allclose(mon["proj_response"], p_resp, rtol=1e-6)
    assert mon["r_last_prompt"] == pytest.approx(np.corrcoef(p_last[ok], m[ok])[0, 1])
    assert mon["r_response"] == pytest.approx(np.corrcoef(p_resp[ok], m[ok])[0, 1])
    kinds = np.asarray([p.kind for p in prompts])[ok]
    pc, mc = p_last[ok].copy(), m[ok].copy()
    for g in np.unique(kinds):
        pc[kinds == g] -= pc[kinds == g].mean()
        mc[kinds == g] -= mc[kinds == g].mean()
    within = mon["monitor_within_polarity"]["pooled_within"]
    assert within["estimate"] == pytest.approx(np.corrcoef(pc, mc)[0, 1])
    assert within["low"] <= within["estimate"] <= within["high"]
    assert mon["system_prompt_effect"] == pytest.approx(m[:5].mean() - m[5:10].mean())


def test_separation_by_layer_is_cohens_d_of_the_full_instructions_rows():
    """At every layer, Cohen's d (pooled sd, ddof 1) of the rows' projections onto the layer's unit direction, the
    full positive instructions' rows against the full negative ones' (the mild and default prompts' rows left out),
    for both activation kinds, against numpy; a shift planted along layer 1's direction shows there."""
    rng = np.random.default_rng(5)
    prompts = [monitoring.MonitorPrompt(k, i, f"{k}{i}", lvl) for k, lvl in (("pos", 2), ("neg", -2)) for i in range(3)]
    prompts += [monitoring.MonitorPrompt("pos", -1, "mild", 1), monitoring.MonitorPrompt("default", -1, None, 0)]
    n_q, n_layers, d = 2, 3, 5
    direction = rng.normal(size=(n_layers, d))
    acts = {key: rng.normal(size=(len(prompts) * n_q, n_layers, d)) for key in ("last_prompt", "response_mean")}
    acts["last_prompt"][:3 * n_q, 1] += 3.0 * direction[1] / np.linalg.norm(direction[1])
    acts["last_prompt"][6 * n_q:, 1] += 100.0  # the extras' rows would swamp d if they were counted
    sep = monitoring.separation_by_layer(acts, direction, prompts)
    for name, key in (("last_prompt", "last_prompt"), ("response", "response_mean")):
        assert sep[name].shape == (n_layers,)
        for layer in range(n_layers):
            proj = acts[key][:, layer] @ direction[layer] / np.linalg.norm(direction[layer])
            pos, neg = proj[:3 * n_q], proj[3 * n_q:6 * n_q]
            pooled = np.sqrt((pos.var(ddof=1) + neg.var(ddof=1)) / 2)  # equal group sizes
            assert sep[name][layer] == pytest.approx((pos.mean() - neg.mean()) / pooled, rel=1e-9)
    assert sep["last_prompt"][1] > 2 and abs(sep["response"][1]) < 2
    with pytest.raises(ValueError, match="rows of"):
        monitoring.separation_by_layer({k: v[:-1] for k, v in acts.items()}, direction, prompts)


def test_too_few_measured_prompts_give_no_correlation():
    prompts = [monitoring.MonitorPrompt(k, 0, k, lvl) for k, lvl in (("pos", 2), ("neg", -2), ("default", 0))]
    per_unit = np.array([[1.0, 2.0], [np.nan, np.nan], [0.5, 0.5]])
    q = np.ones((3, 2))
    mon = monitoring.monitor_statistics(per_unit, prompts, q, q, seed=0)
    assert np.isnan(mon["r_last_prompt"]) and mon["monitor_within_polarity"] is None
    assert np.isnan(mon["system_prompt_effect"])
    assert monitoring.within_r_by_layer({"last_prompt": np.ones((6, 2, 3)), "response_mean": np.ones((6, 2, 3))},
                                        np.ones((2, 3)), monitoring.prompt_means(per_unit),
                                        monitoring.polarity_kinds(prompts)) is None
