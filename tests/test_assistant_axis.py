"""Assistant Axis computations on tiny inputs and a tiny random chat model (SmolLM2 tokenizer)."""
import dataclasses
import json

import numpy as np
import pytest

from experiments import assistant_axis as AA
from experiments.assistant_axis import report_text as AAR
from psm_jax.chat import Role, encode_chat
from psm_jax.persona.axis import per_turn_projections, response_means, role_and_default_vectors
from psm_jax.persona.directions import (axis_from_vectors, axis_pc1_cosines, group_means, persona_space,
                                        random_cosine_band)
from psm_jax.persona.prompts import sample_questions, select_roles, system_conv
from tests.fixtures_assets import smollm2_tokenizer  # noqa: F401  (session fixture)


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory, smollm2_tokenizer):  # noqa: F811
    import psm_jax
    from tests.tiny_models import save_chat_llama

    d = tmp_path_factory.mktemp("aa_tiny_chat")
    save_chat_llama(d, smollm2_tokenizer, n_layers=3, seed=1)
    return psm_jax.load(d)


def _capture_all(m, conv):
    from psm_jax.model import Capture, jit_forward

    enc = encode_chat(m.tokenizer, conv, chat_template=m.chat_template)
    out = jit_forward(m.params, m.config, enc.tokens[None], capture=Capture(sites=("resid_post",)))
    return enc, np.asarray(out.captured["resid_post"])[:, 0]  # [L, T, D]


# ------------------------------------------------------------------ pure computations

def test_group_means_and_axis_formula():
    means = np.arange(5 * 2 * 3, dtype=float).reshape(5, 2, 3)
    groups = [0, 1, 0, 1, 2]
    keep = [True, True, True, False, True]
    vecs, counts = group_means(means, groups, 4, keep=keep)
    np.testing.assert_array_equal(counts, [2, 1, 1, 0])
    np.testing.assert_allclose(vecs[0], (means[0] + means[2]) / 2)
    np.testing.assert_allclose(vecs[1], means[1])
    np.testing.assert_allclose(vecs[2], means[4])
    assert np.isnan(vecs[3]).all()
    default = np.ones((2, 3))
    axis = axis_from_vectors(default, vecs[:3])
    np.testing.assert_allclose(axis, default - (vecs[0] + vecs[1] + vecs[2]) / 3)
    with pytest.raises(ValueError, match="one per response"):
        group_means(means, [0, 1], 2)
    with pytest.raises(ValueError, match="expected"):
        axis_from_vectors(np.ones(3), np.ones((2, 4)))


def test_persona_space_numbers():
    rng = np.random.default_rng(0)
    e0, e1, e2 = np.eye(4)[:3]
    a = np.array([-3.0, -1.0, 0.5, 1.5, 2.0, 0.0])
    b = np.array([0.4, -0.5, 0.3, -0.2, 0.1, -0.1])
    roles = a[:, None] * e0 + b[:, None] * e1 + 1e-3 * rng.normal(size=(6, 4)) + 5 * e2
    default = -8.0 * e0 + 0.3 * e1 + 5 * e2  # far out along -e0: the Assistant sits at one extreme
    axis = axis_from_vectors(default, roles)
    sp = persona_space(roles, default, axis, fraction=0.7)
    centred = roles - roles.mean(0)
    var = np.linalg.svd(centred, compute_uv=False) ** 2
    np.testing.assert_allclose(sp["explained_ratio"], var / var.sum(), rtol=1e-9)
    assert sp["n_pcs"] == 1 and sp["explained_ratio"][0] > 0.9
    # PC1 ~ -e0, oriented toward the default Assistant
    assert sp["pc1"] @ -e0 > 0.99
    assert sp["default_score"] > 0 and sp["default_beyond_all_roles"] and sp["default_fraction_roles_below"] == 1.0
    np.testing.assert_allclose(sp["default_score"], (default - roles.mean(0)) @ sp["pc1"])
    np.testing.assert_allclose(sp["scores"], centred @ sp["pc1"])
    expect_cos = axis @ sp["pc1"] / np.linalg.norm(axis)
    np.testing.assert_allclose(sp["axis_pc1_cosine"], expect_cos)
    assert sp["axis_pc1_cosine"] > 0.99
    # per layer: layer 0 as above, layer 1 an axis orthogonal to the role spread
    rv = np.stack([roles, roles], axis=1)
    ax = np.stack([axis, np.eye(4)[3]])
    cos = axis_pc1_cosines(rv, ax)
    np.testing.assert_allclose(cos[0], abs(expect_cos), atol=1e-9)
    assert cos[1] < 0.01


def test_select_roles_stratified_and_deterministic():
    from psm_jax.persona import datasets

    roles = datasets.load_roles().roles
    a = select_roles(roles, 12, seed=0)
    b = select_roles(roles, 12, seed=0)
    assert [r.name for r in a] == [r.name for r in b] and len(a) == 12
    assert "assistant" not in [r.name for r in a]
    assert len({r.category for r in a}) >= 8  # spread over the categories
    assert len(select_roles(roles, None, 0)) == len(roles) - 1
    q = sample_questions(datasets.load_role_questions(), 5, seed=3)
    assert q == sample_questions(datasets.load_role_questions(), 5, seed=3) and len(set(q)) == 5
    assert system_conv("", "hi") == [{"role": "user", "content": "hi"}]


def test_role_pool_keeps_the_named_categories():
    from psm_jax.persona import datasets

    roleset = datasets.load_roles()
    pool = AA.role_pool(roleset, ("mythic", "animal"))
    assert pool and {r.category for r in pool} == {"mythic", "animal"}
    assert [r.name for r in pool] == [r.name for r in roleset.roles if r.category in ("mythic", "animal")]
    assert AA.role_pool(roleset, ()) == list(roleset.roles)
    with pytest.raises(ValueError, match=r"role_categories=\('mythic', 'elves'\): unknown \['elves'\]"):
        AA.role_pool(roleset, ("mythic", "elves"))


def test_config_errors():
    with pytest.raises(ValueError, match="n_roles=1"):
        AA.Config(n_roles=1)
    with pytest.raises(ValueError, match="judge="):
        AA.Config(judge="gpt")
    with pytest.raises(ValueError, match="variance_fraction"):
        AA.Config(variance_fraction=1.5)
    from experiments import cli

    assert cli.main(["assistant-axis", "n_roles=1", "--out", "unused"]) == 2
    json.dumps(__import__("dataclasses").asdict(AA.Config()))  # JSON-serialisable


# ------------------------------------------------------------------ on a tiny chat model

CONV = [{"role": "system", "content": "You are a pirate captain."},
        {"role": "user", "content": "Where do we sail today?"},
        {"role": "assistant", "content": "East, past the reef, where the spice ships go."}]


def test_role_vector_is_mean_over_assistant_content_tokens_only(tiny_chat):
    m = tiny_chat
    conv2 = [CONV[0], CONV[1], {"role": "assistant", "content": "Nowhere."}]
    means, ntok = response_means(m, [CONV, conv2], batch_size=2)
    for i, conv in enumerate([CONV, conv2]):
        enc, h = _capture_all(m, conv)
        mask = (enc.roles == Role.ASSISTANT) & (enc.turns == 2)
        assert ntok[i] == mask.sum() > 0
        np.testing.assert_allclose(means[i], h[:, mask].mean(axis=1), atol=2e-5)
        # the template / system / user tokens are not in it
        assert not np.allclose(means[i], h[:, enc.roles != Role.TEMPLATE].mean(axis=1), atol=1e-3)
    vecs, counts = group_means(means, [0, 0], 1)
    np.testing.assert_allclose(vecs[0], means.mean(0), atol=1e-6)


def test_role_and_default_vectors_match_manual(tiny_chat):
    from psm_jax.persona import datasets
    from psm_jax.persona.rollouts import generate_responses

    m = tiny_chat
    roles = select_roles(datasets.load_roles().roles, 2, seed=0)
    qs = ["Who are you?", "What do you eat?"]
    defaults = ["", "You are an AI assistant."]
    rv, dv = role_and_default_vectors(m, roles, qs, default_prompts=defaults, batch_size=4, max_new_tokens=3,
                                         temperature=0.0)
    assert rv.shape == (2, 3, 32) and dv.shape == (3, 32)
    convs = [system_conv(r.instructions[0], q) for r in roles for q in qs]
    dconvs = [system_conv(p, q) for p in defaults for q in qs]
    rolls = generate_responses(m, convs + dconvs, max_new_tokens=3, batch_size=4)
    means, ntok = response_means(m, [r.conversation() for r in rolls], batch_size=4)
    assert (ntok > 0).all()
    np.testing.assert_allclose(rv[0], means[:2].mean(0), atol=1e-5)
    np.testing.assert_allclose(rv[1], means[2:4].mean(0), atol=1e-5)
    np.testing.assert_allclose(dv, means[4:].mean(0), atol=1e-5)


def test_per_turn_projections_match_manual(tiny_chat):
    m = tiny_chat
    long = CONV + [{"role": "user", "content": "And then?"},
                   {"role": "assistant", "content": "Then home, with the tide."}]
    direction = np.random.default_rng(0).normal(size=32)
    proj, ntok = per_turn_projections(m, [long, CONV], direction[None], layers=(1,), batch_size=2)
    assert proj.shape == (2, 1, 2) and np.isnan(proj[1, 0, 1]) and ntok[1, 1] == 0
    u = direction / np.linalg.norm(direction)
    for i, conv in enumerate([long, CONV]):
        enc, h = _capture_all(m, conv)
        for k, mi in enumerate([2, 4][: (2 if i == 0 else 1)]):
            mask = (enc.roles == Role.ASSISTANT) & (enc.turns == mi)
            np.testing.assert_allclose(proj[i, 0, k], (h[1, mask] @ u).mean(), atol=1e-4)
            assert ntok[i, k] == mask.sum()


@pytest.mark.slow  # the whole experiment on a tiny model: many compiled shapes
def test_run_end_to_end_tiny(tiny_chat, tmp_path):
    cfg = AA.Config(model="demo-tiny", n_roles=4, instructions_per_role=1, n_questions=2, default_samples=1, min_responses=1,
                    max_new_tokens=3, batch_size=8, drift_sharegpt=1, drift_max_chars=600, drift_batch_size=8)
    from experiments.study import execute

    res = execute(AA, cfg, folder=tmp_path / "aa", model=tiny_chat)["result"]
    L = tiny_chat.config.n_layers
    R = len(res.role_names)  # the adherence filter may drop a role of the random model
    assert 3 <= R <= 4 and res.axis.shape == (L, 32) and res.role_vectors.shape == (R, L, 32)
    np.testing.assert_allclose(res.axis, res.default_vector - res.role_vectors.mean(0), atol=1e-6)
    assert res.target_layer == L // 2 and len(res.cosines) == L
    for f in ("report.md", "metrics.json", "config.json", "axis.safetensors", "axis.json", "role_vectors.safetensors",
              "variance_explained.png", "axis_pc1_cosine.png", "pc1_loadings.png", "drift.png"):
        assert (tmp_path / "aa" / f).is_file(), f
    from experiments.report import load_vectors

    t, meta = load_vectors(tmp_path / "aa" / "axis.safetensors", expect_model="demo-tiny", expect_width=32)
    np.testing.assert_allclose(t["axis"], res.axis, atol=1e-6)
    metrics = json.loads((tmp_path / "aa" / "metrics.json").read_text())
    assert 1 <= metrics["persona_space_pcs_for_70pct"] <= 3
    assert len(metrics["drift_roleplay_per_turn"]) == 4
    # R roles span R - 1 directions; too few roles for bootstrap intervals, which the report says
    assert len(metrics["default_percentile_by_pc"]) == R - 1 and "default_percentile_ci_by_pc" not in metrics
    assert "fewer than 8 roles" in (tmp_path / "aa" / "report.md").read_text()
    assert res.examples and res.d_model == 32
    lines = AA.records(res)
    assert {ln["metric"] for ln in lines} == {"persona_space_pcs_for_70pct", "axis_assistant_pc_percentile",
                                             "axis_assistant_pc_cosine"}
    assert all(ln["null"] for ln in lines)
    restricted = AA.records(dataclasses.replace(res, config=dataclasses.replace(cfg, role_categories=("mythic",
                                                                                                         "animal"))))
    assert [ln["key"] for ln in restricted[:3]] == ["mythic+animal", "mythic+animal/PC1", "mythic+animal/PC1"]
    assert all(ln["key"].startswith("mythic+animal") and ln.get("role_set") == "mythic+animal" for ln in restricted)
    assert len(restricted) == 1 + 2 * (R - 1)  # the whole set only: a restricted run's human subset is not recorded
    cos_null = next(ln["null"] for ln in lines if ln["metric"] == "axis_assistant_pc_cosine")
    assert cos_null == f"random directions in 32 dimensions: |cos| below {random_cosine_band(32, seed=0):.3f} in 95%"
    # the adherence filter ran, with its validity check, and the report says what it dropped
    assert metrics["adherence"] == "likelihood" and metrics["adherence_scored"] >= 1
    assert set(metrics["adherence_validity"]) >= {"effect", "low", "high", "n", "valid"}
    assert "Adherence filter (judge-free likelihood" in (tmp_path / "aa" / "report.md").read_text()
    # the diagnostics: the carrier at every layer, and the split-half over the two questions
    assert [r["layer"] for r in metrics["carrier_by_layer"]] == list(range(L))
    assert set(metrics["split_half"]) == {"n_roles", "reliability", "half_correlation", "halves"}


# ------------------------------------------------------------------ adherence filter and the carrying component

def test_adherence_scores_match_manual_likelihoods(tiny_chat):
    from psm_jax.model import jit_forward
    from psm_jax.persona.axis import adherence_scores

    m = tiny_chat
    systems = ["You are a pirate captain.", "You are a cat."]
    questions = ["Where do we sail?", "What do you eat?"]
    answers = ["East, past the reef.", ""]
    got = adherence_scores(m, systems, questions, answers, "You are a helpful AI assistant.", batch_size=2)

    def per_token_lp(system, q, a):
        conv = system_conv(system, q) + [{"role": "assistant", "content": a}]
        enc = encode_chat(m.tokenizer, conv, chat_template=m.chat_template)
        logits = np.asarray(jit_forward(m.params, m.config, enc.tokens[None]).logits[0], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        mask = (enc.roles == Role.ASSISTANT) & (enc.turns == len(conv) - 1)
        idx = np.flatnonzero(mask)
        return np.mean([logp[i - 1, enc.tokens[i]] for i in idx])

    expect = per_token_lp(systems[0], questions[0], answers[0]) - per_token_lp(
        "You are a helpful AI assistant.", questions[0], answers[0])
    np.testing.assert_allclose(got[0], expect, atol=1e-4)
    assert np.isnan(got[1])  # an empty answer has nothing to score
    with pytest.raises(ValueError, match="2 systems, 1 questions and 2 answers"):
        adherence_scores(m, systems, questions[:1], answers, "You are an AI assistant.")


def test_space_summary_names_the_carrying_component():
    rng = np.random.default_rng(0)
    D, R = 6, 30
    e = np.eye(D)
    # roles spread mostly along e0 (PC1), then e1 (PC2); the default Assistant sits far out along e1 only
    roles = (3.0 * rng.normal(size=R))[:, None] * e[0] + (1.0 * rng.normal(size=R))[:, None] * e[1] \
        + 0.05 * rng.normal(size=(R, D))
    default = 6.0 * e[1]
    s = AA.space_summary(roles, default, 0.7, seed=0)
    assert s["carrier"] == 1 and s["percentile"] == 1.0 and abs(s["cosine"]) > 0.9 and s["target_met"]
    lo, hi = s["percentile_ci"]
    assert lo <= s["percentile"] <= hi
    c = {k: v for k, v in s.items() if k not in ("space", "ci")}
    text = AAR.carrier_text("All roles", dict(c, pc="PC2"))
    assert "PC2 carries the Assistant" in text and "met." in text and "not met" not in text
    # the default inside the role cloud: the target fails, and the text says which number falls short
    s2 = AA.space_summary(roles, roles.mean(0) + 0.1 * e[1], 0.7, seed=0)
    c2 = {k: v for k, v in s2.items() if k not in ("space", "ci")}
    text2 = AAR.carrier_text("All roles", dict(c2, pc=f"PC{s2['carrier'] + 1}"))
    assert not s2["target_met"] and "Target not met: the default is above only" in text2
    assert s["roles_below_default_on_axis"] == 1.0 and 0 <= s2["top3_cosine"] <= 1


def test_adherence_config_errors():
    with pytest.raises(ValueError, match="adherence='judge'"):
        AA.Config(adherence="judge")
    with pytest.raises(ValueError, match="adherence_check_roles=1"):
        AA.Config(adherence_check_roles=1)


def test_split_half_reliability_falls_with_sampling_noise():
    """Role vectors from even vs odd questions agree when each response carries its role's signal, and not when
    per-response noise swamps it; with little noise each half still shows the planted carrier."""
    rng = np.random.default_rng(1)
    D, R, Q = 8, 24, 6
    e = np.eye(D)
    role_mean = (3.0 * rng.normal(size=R))[:, None] * e[0] + (1.0 * rng.normal(size=R))[:, None] * e[1]
    groups = np.repeat(np.arange(R), Q)
    qids = np.tile(np.arange(Q), R)
    keep = np.ones(R * Q, bool)
    default = 6.0 * e[1]
    out = {}
    for noise in (0.05, 20.0):
        means = role_mean[groups] + noise * rng.normal(size=(R * Q, D))
        out[noise] = AA.split_half(means, groups, keep, qids, R, default, 0.7, seed=0)
    quiet, loud = out[0.05], out[20.0]
    assert quiet["n_roles"] == R and quiet["reliability"] > 0.99 and loud["reliability"] < 0.5
    assert [h["pc"] for h in quiet["halves"]] == ["PC2", "PC2"] and all(h["target_met"] for h in quiet["halves"])
    # a role with no response in one half is left out of both
    keep[(groups == 0) & (qids % 2 == 1)] = False
    assert AA.split_half(role_mean[groups], groups, keep, qids, R, default, 0.7, seed=0)["n_roles"] == R - 1


def test_carrier_by_layer_finds_the_layer_where_the_assistant_separates():
    rng = np.random.default_rng(2)
    D, R, L = 6, 20, 3
    e = np.eye(D)
    roles = rng.normal(size=(R, L, D))
    default = np.zeros((L, D))
    default[2] = 30.0 * e[3]  # only the last layer puts the default far outside the role cloud
    rows = AA.carrier_by_layer(roles, default, 0.7, 0, range(L))
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert rows[2]["percentile"] == 1.0 and not rows[0]["target_met"] and not rows[1]["target_met"]


def test_the_human_subset_is_analysed_only_when_it_is_a_proper_subset():
    """A run over human archetypes only has no separate human subset (it would repeat the whole set); a mixed run has
    one, with its own PCA over exactly the human roles."""
    import types

    rng = np.random.default_rng(0)
    cats = ["profession"] * 5 + ["mythic"] * 5
    roles = [types.SimpleNamespace(name=f"r{i}", category=c) for i, c in enumerate(cats)]
    vecs = rng.normal(size=(10, 2, 6))
    cfg = AA.Config(n_roles=None)
    mixed = AA.Vectors(vecs, roles, np.ones(10, bool), rng.normal(size=(2, 6)), np.ones(3, bool), None)
    subsets, human = AA.space_subsets(cfg, mixed, 1)
    assert set(subsets) == {"all", "human"} and human == [0, 1, 2, 3, 4]
    assert subsets["human"]["n_roles"] == 5 and subsets["all"]["n_roles"] == 10
    only_human = mixed._replace(role_vecs=vecs[:5], kept_roles=roles[:5])
    subsets, human = AA.space_subsets(cfg, only_human, 1)
    assert set(subsets) == {"all"} and human == [0, 1, 2, 3, 4]


class _RubricJudge:
    """A stand-in judge: `score(question, answer)` for each pair, whatever the rubric."""

    def __init__(self, score):
        self.score = score

    def rubric_score_many(self, pairs, rubric, max_score):
        assert "{role}" not in rubric and max_score == 3
        return [self.score(q, a) for q, a in pairs]


@pytest.mark.parametrize("kind", ["tells_apart", "scores_nothing", "scores_all_alike"])
def test_judge_filter_applies_only_where_its_check_passes(kind, monkeypatch):
    """The judge filter keeps responses scored >= judge_min_score only when the judge scores the roles' own answers
    above default answers under the same rubric (paired over roles); a judge that scores nothing or cannot tell
    them apart drops nothing, and says what it would have dropped."""
    import psm_jax.persona.judge as J
    from experiments.assistant_axis import filters

    cfg = AA.Config(n_roles=4, n_questions=3, judge="local", judge_min_score=2, adherence="none")
    pr = AA.prompts(cfg)
    n = len(pr.convs)
    answers = [f"in role {i}" for i in range(n)]
    answers[1] = "in role but weak"
    by_q = {q: f"default answer to {q}" for q in pr.questions}
    scores = {"tells_apart": lambda q, a: 0 if a.startswith("default") else (1 if "weak" in a else 3),
              "scores_nothing": lambda q, a: None,
              "scores_all_alike": lambda q, a: 1 if "weak" in a else 3}[kind]
    monkeypatch.setattr(J, "make_judge", lambda name, model=None, **kw: _RubricJudge(scores))
    keep, info = filters._judge_filter(None, cfg, pr, answers, by_q)
    assert info["judge_validity"]["n"] == (0 if kind == "scores_nothing" else len(set(pr.groups.tolist())))
    if kind == "tells_apart":
        assert info["judge_applied"] and info["judge_validity"]["low"] > 0
        assert keep.tolist() == [i != 1 for i in range(n)] and info["judge_dropped"] == 1
    else:
        assert not info["judge_applied"] and keep.all() and info["judge_dropped"] == 0
        assert info["judge_would_drop"] == (n if kind == "scores_nothing" else 1)
    cfg_text = AAR._judge_text(cfg, info)
    assert ("applied: 1 role responses dropped" in cfg_text) == (kind == "tells_apart")
