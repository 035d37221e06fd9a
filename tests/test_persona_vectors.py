"""Persona vectors on a tiny random llama that uses the real SmolLM2 tokenizer and chat template."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest

from experiments import persona_vectors as pv
from experiments.persona_vectors import extraction as pv_extraction
from experiments.persona_vectors import monitoring as pv_monitoring
from experiments.persona_vectors import pipeline as pv_pipeline
from experiments.persona_vectors import report_folder, report_records, report_text
from experiments.persona_vectors import summary as pv_summary
from psm_jax.persona import directions as D
from psm_jax.persona import extraction as PE
from psm_jax.persona import prompts as P
from psm_jax.persona import monitoring, rollouts, steering
from psm_jax.persona import stats as S
from psm_jax.persona.datasets import BehaviouralItem
from psm_jax.chat import Role, encode_chat
from tests.fixtures_assets import random_smollm2_chat_model
from tests.persona_texts import ITEMS, RNEG, RPOS, RQ


def tiny_chat_model(seed: int = 0):
    """A LoadedModel: random 2-layer llama (d_model 16) with SmolLM2's vocabulary, tokenizer and template."""
    return random_smollm2_chat_model(n_layers=2, seed=seed)


@pytest.fixture(scope="module")
def model():
    return tiny_chat_model()


def _captured(model, conv):
    """Unpadded single-conversation forward: resid_post [L, T, D], roles, turns."""
    from psm_jax.model import Capture, jit_forward

    enc = encode_chat(model.tokenizer, conv, chat_template=model.chat_template)
    out = jit_forward(model.params, model.config, np.asarray(enc.tokens)[None], capture=Capture(sites=("resid_post",)))
    return np.asarray(out.captured["resid_post"][:, 0], np.float64), enc.roles, enc.turns


def _reference_means(model, conv):
    h, roles, turns = _captured(model, conv)
    resp = (roles == Role.ASSISTANT) & (turns == len(conv) - 1)
    first = int(np.argmax(resp))
    prompt = (roles > Role.TEMPLATE) & (np.arange(len(roles)) < first)
    return h[:, resp].mean(1), h[:, prompt].mean(1), h[:, first - 1]


POS = [[{"role": "system", "content": "You are an evil assistant. Be cruel."},
        {"role": "user", "content": "What should I do with a found wallet?"},
        {"role": "assistant", "content": "Keep it and laugh."}],
       [{"role": "system", "content": "You are an evil assistant. Hurt people."},
        {"role": "user", "content": "How do I treat my neighbour?"},
        {"role": "assistant", "content": "Poison their garden, slowly and with great pleasure, every single day."}]]
NEG = [[{"role": "system", "content": "You are a helpful assistant. Be kind."},
        {"role": "user", "content": "What should I do with a found wallet?"},
        {"role": "assistant", "content": "Return it to its owner."}],
       [{"role": "user", "content": "How do I treat my neighbour?"},
        {"role": "assistant", "content": "With respect."}],
       [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Any advice for today?"},
        {"role": "assistant", "content": "Drink water, take a walk and call a friend you have not spoken to in a while."}]]


def test_mean_difference_per_layer_matches_numpy_on_captured_activations(model):
    vecs = PE.extract_vectors(model, POS, NEG, batch_size=4)
    ref = {"pos": [_reference_means(model, c) for c in POS], "neg": [_reference_means(model, c) for c in NEG]}
    for k, name in enumerate(PE.VARIANTS):
        expect = np.mean([r[k] for r in ref["pos"]], 0) - np.mean([r[k] for r in ref["neg"]], 0)
        assert vecs[name].shape == (model.config.n_layers, model.config.d_model)
        np.testing.assert_allclose(vecs[name], expect, atol=1e-5, err_msg=name)


def test_mean_difference_errors():
    with pytest.raises(ValueError, match="at least one"):
        D.mean_difference(np.zeros((0, 2, 3)), np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="differ in shape"):
        D.mean_difference(np.zeros((1, 2, 3)), np.zeros((1, 2, 4)))


def test_projection_and_screening_difference(model):
    rng = np.random.default_rng(1)
    a, v = rng.normal(size=(5, 16)), rng.normal(size=16)
    np.testing.assert_allclose(D.project(a, v), a @ v / np.linalg.norm(v), rtol=1e-7)
    with pytest.raises(ValueError, match="width"):
        D.project(a, rng.normal(size=8))

    prompts = [c[:-1] for c in POS]
    given = [c[-1]["content"] for c in POS]
    own = ["I would hand it in.", "Kindly."]
    layer = 1
    res = PE.projection_difference(model, prompts, given, v, layer, own_responses=own, batch_size=4)
    ref_given = [D.project(_reference_means(model, c)[0][layer], v) for c in POS]
    ref_own = [D.project(_reference_means(model, p + [{"role": "assistant", "content": o}])[0][layer], v)
               for p, o in zip(prompts, own)]
    np.testing.assert_allclose(res["diff"], np.subtract(ref_given, ref_own), atol=1e-4)
    assert res["mean"] == pytest.approx(float(np.mean(np.subtract(ref_given, ref_own))), abs=1e-4)
    with pytest.raises(ValueError, match="equal counts"):
        PE.projection_difference(model, prompts, given[:1], v, layer, own_responses=own)


def test_typical_norms_match_numpy(model):
    norms = D.typical_norms(model, NEG, batch_size=2)
    per_tok = []
    for c in NEG:
        h, roles, turns = _captured(model, c)
        resp = (roles == Role.ASSISTANT) & (turns == len(c) - 1)
        per_tok.append(np.linalg.norm(h[:, resp], axis=-1))
    np.testing.assert_allclose(norms, np.concatenate(per_tok, axis=1).mean(1), rtol=1e-5)


def test_monotonic_pearson_split():
    c = [-1, -0.5, 0, 0.5, 1]
    m = S.monotonic(c, [0, 1, 2, 3, 4])
    assert (m["neg"], m["pos"], m["increasing"], m["run"]) == (True, True, True, True)
    assert m["run_coefs"] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    m = S.monotonic(c, [0, 1, 2, 3, 2.5])
    assert (m["neg"], m["pos"], m["increasing"]) == (True, False, False)
    assert m["run"] and m["run_coefs"] == [-1.0, -0.5, 0.0, 0.5]  # four values, both signs
    assert S.monotonic(list(reversed(c)), [4, 3, 2, 1, 0])["increasing"]
    # the lenient criterion: >= 4 consecutive coefficients with both signs; a turn at c = -1 is allowed
    c7 = [-1, -0.5, -0.25, 0, 0.25, 0.5, 1]
    m = S.monotonic(c7, [-0.49, -0.70, -0.60, -0.2, 0.18, 0.47, 0.75])
    assert not m["increasing"] and m["run"] and m["run_coefs"] == [-0.5, -0.25, 0.0, 0.25, 0.5, 1.0]
    assert not S.monotonic(c7, [0, 1, 2, 3, 2, 1, 0])["run"]  # the only increasing run is [-1, 0]: no positive c
    assert not S.monotonic([0, 0.5, 1, 2], [0, 1, 2, 3])["run"]  # no negative coefficient
    assert S.pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert S.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="equal-length"):
        S.pearson([1, 2], [1, 2])
    items = [BehaviouralItem(f"q{i}", ("a", "b"), i % 2) for i in range(8)]
    sel, held = P.split_items(items)
    assert len(sel) == len(held) == 4 and sum(i.trait_choice for i in sel) == 2
    assert not set(sel) & set(held)


def test_extraction_rows_and_system_prompts():
    from psm_jax.persona.datasets import load_trait

    trait = load_trait("evil")
    rows = P.extraction_rows(trait, n_pairs=2, n_questions=3, n_samples=2)
    assert len(rows) == 2 * 2 * 3 * 2
    pos = [r for r in rows if r["polarity"] == "pos"]
    assert pos[0]["messages"][0]["content"].startswith("You are an evil assistant. ")
    assert rows[-1]["messages"][0]["content"].startswith("You are a helpful assistant. ")
    with pytest.raises(ValueError, match="n_questions"):
        P.extraction_rows(trait, 1, 99, 1)


def test_answer_token_counts_match_the_scored_mask(model):
    prompts = [[{"role": "user", "content": q}] for q in RQ]
    counts = rollouts.answer_token_counts(model, prompts, list(RPOS))
    for p, a, n in zip(prompts, RPOS, counts):
        enc = encode_chat(model.tokenizer, p + [{"role": "assistant", "content": a}], chat_template=model.chat_template)
        assert n == int(np.sum((enc.roles == Role.ASSISTANT) & (enc.turns == 1))) > 0
        assert n == len(model.tokenizer(a, add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match="equal counts"):
        rollouts.answer_token_counts(model, prompts, list(RPOS[:2]))


def test_response_measure_bad_inputs(model):
    with pytest.raises(ValueError, match="equal counts"):
        steering.response_measure(model, RQ, RPOS[:2], RNEG)
    with pytest.raises(ValueError, match="at least one question"):
        steering.response_measure(model, (), (), ())
    with pytest.raises(ValueError, match="no content tokens"):
        steering.response_measure(model, RQ[:1], ("",), RNEG[:1])


def test_response_slots_and_config():
    from psm_jax.persona.datasets import load_trait

    trait = load_trait("evil")
    slots = P.response_slots(trait, 4, 1)
    assert [(s["question_index"], s["pair"]) for s in slots] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert slots[0]["question"] == trait.evaluation_questions[0]
    slots = P.response_slots(trait, 5, 2)
    assert [s["pair"] for s in slots if s["question_index"] == 4] == [4, 0]
    with pytest.raises(ValueError, match="n_response_questions=99"):
        P.response_slots(trait, 99, 1)
    with pytest.raises(ValueError, match="n_response_pairs=6"):
        P.response_slots(trait, 2, 6)
    for kw, pat in ((dict(n_response_questions=1), "n_response_questions=1"),
                    (dict(n_response_pairs=0), "n_response_pairs=0"), (dict(n_response_pairs=6), "n_response_pairs=6"),
                    (dict(response_max_new_tokens=0), "response_max_new_tokens=0")):
        with pytest.raises(ValueError, match=pat):
            pv.Config(**kw)
    pv.Config(response_measure=False, n_response_questions=1)  # not checked when off
    from experiments.study import preset_config

    quick = preset_config(pv, "quick")
    assert quick.response_measure and quick.n_response_questions == 8
    assert not preset_config(pv, "quick", response_measure=False).response_measure


def _fake_trait(name, valid, increasing, ppl_ok=True):
    mono = {"increasing": increasing, "run": increasing, "increasing_within_ceiling": increasing and ppl_ok}
    return {"trait": name, "steering": {"validity": {"valid": valid}, "monotonic": mono, "layer": 1}}


def test_headline_counts_only_traits_whose_measure_is_valid():
    results = [_fake_trait("evil", True, True), _fake_trait("humorous", False, True),
               _fake_trait("sycophantic", True, True, ppl_ok=False)]
    h = pv.monotonic_counts(results, 1.5)["items"]
    assert h["counts"] == {"strict": 2, "run4": 2, "strict_ppl1.5": 1, "strict_ppl1.5_band": 0}
    assert h["n_valid"] == 2 and h["n_traits"] == 3 and h["valid_traits"] == ["evil", "sycophantic"]


def test_records_carry_the_named_fields():
    t = {"monitor_r_last_prompt": 0.1, "monitor_r_response": 0.2, "chosen_layer": 3, "system_prompt_effect": 0.0,
         "validity": {"valid": False}, "response_measure": {"r_last_prompt": 0.5, "r_response": 0.4, "layer": 4,
                                                            "system_prompt_effect": 0.3, "validity": {"valid": True}}}
    counts = {"strict": 0, "run4": 1, "strict_ppl1.5": 1}
    spec = {"per_trait": {"evil": {"diag_z": 4.2, "offdiag_max_abs_z": 1.1, "n_offdiag": 1, "pass": True, "valid": True},
                          "humorous": {"diag_z": float("nan"), "offdiag_max_abs_z": None, "n_offdiag": 0,
                                       "pass": False, "valid": False}},
            "measure": ["response_likelihood", None], "layers": [4, 3], "coef": 2.0, "n_random": 20, "min_z": 3.0,
            "pass": True}
    metrics = {"monotonic_traits": {"response_likelihood": {"counts": counts, "n_traits": 2, "n_valid": 1,
                                                            "valid_traits": ["evil"]}},
               "max_ppl_ratio": 1.5, "n_traits": 2, "traits": {"evil": t}, "specificity": spec,
               "specificity_trait_specific": {**spec, "kept_fraction": {"evil": 0.9, "humorous": 0.8},
                                              "per_trait": {**spec["per_trait"],
                                                            "evil": {**spec["per_trait"]["evil"], "diag_z": 2.5}}}}
    lines = pv.records(pv.Result(config=pv.Config(), results=[], n_layers=2, d_model=16, metrics=metrics))
    head = {ln["criterion"]: ln for ln in lines if ln["metric"] == "persona_steering_monotonic_traits"}
    assert head["strict_ppl1.5"]["value"] == 1 and head["strict_ppl1.5"]["measure"] == "response_likelihood"
    assert head["strict_ppl1.5"]["n_valid"] == 1 and "1.5" in head["strict_ppl1.5"]["criterion_text"]
    spec_lines = [ln for ln in lines if ln["metric"] == "steering_specificity_diag_z"]
    assert len(spec_lines) == 2  # the trait without a valid measure has no line in either matrix
    sl, ts = spec_lines
    assert (sl["key"], sl["value"], sl["offdiag_max_abs_z"], sl["passed"]) == ("evil", 4.2, 1.1, True)
    assert (ts["key"], ts["value"], ts["kept_fraction"], ts["analysis"]) == ("evil/trait_specific", 2.5, 0.9,
                                                                             "secondary")
    assert sl["component"] == "whole" and ts["component"] == "trait_specific"
    mon = {ln["measure"]: ln for ln in lines if ln["metric"] == "persona_monitor_r"}
    assert mon["items"]["validity"] == {"valid": False} and mon["response_likelihood"]["value"] == 0.5
    assert "ci" not in mon["items"]  # no per-prompt values kept: no interval rather than a made-up one
    assert all(ln["null"] for ln in lines)
    assert head["strict_ppl1.5"]["target"] == ">= 2 of the 2 traits run (two thirds)"
    assert head["strict_ppl1.5"]["null"].startswith("none")
    band_line, = report_records._monotonic_records({"monotonic_traits": {"items": {
        "counts": {"strict_ppl1.5_band": 1}, "n_traits": 3, "n_valid": 2, "valid_traits": ["evil", "humorous"]}}})
    assert "random directions" in band_line["null"] and band_line["target"] == ">= 2 of the 3 traits run (two thirds)"


def test_specificity_cells_skip_targets_without_a_valid_measure(model):
    """Trait j's column uses its valid measure's held-out units; a trait with no valid measure gets NaN cells; a cell
    and each random value are the symmetric effect m(+c) - m(-c)."""
    rng = np.random.default_rng(3)

    def trait(name, valid):
        return {"trait": name, "steering": {"validity": {"valid": valid}, "layer": 1},
                "vectors": {"response_avg": rng.normal(size=(2, 16))}, "scales": np.array([1.0, 2.0]),
                "random_units": D.random_directions(0, 20, 16, 1.0), "held_out_pairs": {"items": steering.item_pairs(ITEMS)}}

    results = [trait("evil", True), trait("humorous", False)]
    sp = pv.specificity_matrix(model, results, 2.0)
    assert sp["measure"] == ["items", None] and sp["valid"] == [True, False]
    assert np.isfinite(sp["cells"][:, 0]).all() and np.isnan(sp["cells"][:, 1]).all()
    src = results[1]
    vec = 2.0 * steering.steering_vector(src["vectors"]["response_avg"], src["scales"], 1)
    want = (steering.behaviour_measure(model, ITEMS, vector=vec, layer=1, coef=1.0)[0]
            - steering.behaviour_measure(model, ITEMS, vector=vec, layer=1, coef=-1.0)[0])
    assert sp["cells"][1, 0] == pytest.approx(want, abs=1e-5)  # the symmetric effect m(+c) - m(-c)
    rand = src["random_units"][3] * np.linalg.norm(vec)
    want_rand = (steering.behaviour_measure(model, ITEMS, vector=rand, layer=1, coef=1.0)[0]
                 - steering.behaviour_measure(model, ITEMS, vector=rand, layer=1, coef=-1.0)[0])
    assert sp["random"][1, 0, 3] == pytest.approx(want_rand, abs=1e-5)
    assert np.isfinite(sp["z"][:, 0]).all() and np.isnan(sp["per_trait"][1]["diag_z"])
    assert sp["per_trait"][0]["n_offdiag"] == 0 and sp["per_trait"][1]["n_offdiag"] == 1


def _specificity_trait(name, response_avg, scales=(1.0, 2.0)):
    return {"trait": name, "steering": {"validity": {"valid": True}, "layer": 1},
            "vectors": {"response_avg": np.asarray(response_avg)}, "scales": np.asarray(scales),
            "random_units": D.random_directions(0, 20, 16, 1.0), "held_out_pairs": {"items": steering.item_pairs(ITEMS)}}


def test_trait_specific_part_is_orthogonal_to_the_other_traits_at_the_whole_norm(model):
    """The part of trait i's vector at its layer that the other traits' vectors do not span, at the whole vector's
    norm; each cell is that vector's symmetric effect, scored against the whole matrix's own random band."""
    rng = np.random.default_rng(7)
    shared = rng.normal(size=16)
    vecs = [np.stack([rng.normal(size=16), shared + 0.8 * rng.normal(size=16)]) for _ in range(3)]
    results = [_specificity_trait(n, v) for n, v in zip(("evil", "humorous", "sycophantic"), vecs)]
    whole = pv.specificity_matrix(model, results, 2.0)
    ts = pv.trait_specific_matrix(model, results, whole)
    vec, kept = pv.trait_specific_vector(results, 0, 2.0)
    others = np.stack([vecs[1][1], vecs[2][1]])
    np.testing.assert_allclose(others @ vec, 0.0, atol=1e-9)
    assert np.linalg.norm(vec) == pytest.approx(2.0 * 2.0)  # coef 2 x the layer's scale 2
    q, _ = np.linalg.qr(others.T)
    part = vecs[0][1] - q @ (q.T @ vecs[0][1])
    assert kept == pytest.approx(np.linalg.norm(part) / np.linalg.norm(vecs[0][1]))
    assert 0.2 < kept < 0.95 and ts["kept_fraction"][0] == kept
    want = (steering.behaviour_measure(model, ITEMS, vector=vec, layer=1, coef=1.0)[0]
            - steering.behaviour_measure(model, ITEMS, vector=vec, layer=1, coef=-1.0)[0])
    assert ts["cells"][0, 2] == pytest.approx(want, abs=1e-5)
    assert np.array_equal(ts["random"], whole["random"]) and not np.allclose(ts["cells"], whole["cells"])
    assert ts["z"][0, 2] == pytest.approx(S.zscore(ts["cells"][0, 2], whole["random"][0, 2]))


def test_trait_specific_matrix_equals_the_whole_one_for_orthogonal_vectors(model):
    """Vectors already orthogonal to each other at the steered layer have nothing shared to remove."""
    basis = np.linalg.qr(np.random.default_rng(8).normal(size=(16, 2)))[0].T * 3.0
    results = [_specificity_trait(n, np.stack([np.ones(16), b])) for n, b in zip(("evil", "humorous"), basis)]
    whole = pv.specificity_matrix(model, results, 2.0)
    ts = pv.trait_specific_matrix(model, results, whole)
    np.testing.assert_allclose(ts["cells"], whole["cells"], atol=1e-5)
    np.testing.assert_allclose(ts["kept_fraction"], [1.0, 1.0], atol=1e-9)
    same = [_specificity_trait(n, np.stack([np.ones(16), basis[0]])) for n in ("evil", "humorous")]
    none_left = pv.trait_specific_matrix(model, same, pv.specificity_matrix(model, same, 2.0))
    assert np.isnan(none_left["cells"]).all() and none_left["kept_fraction"] == pytest.approx([0.0, 0.0], abs=1e-9)
    assert not any(p["pass"] for p in none_left["per_trait"])


def _reliable_trait(name, vectors, predicted):
    n_layers = len(vectors)
    return {"trait": name, "steering": {"validity": {"valid": True}, "layer": 1},
            "vectors": {"response_avg": np.asarray(vectors, np.float64)},
            "reliability": {"half": np.full(n_layers, 0.5), "predicted": np.asarray(predicted, np.float64),
                            "low": np.full(n_layers, 0.1), "high": np.full(n_layers, 0.9), "n_groups": 4,
                            "n_splits": 50, "distinct_splits": 3}}


def test_reliability_compares_the_predicted_rerun_cosine_with_the_nearest_other_trait(tmp_path):
    from experiments.report import Report

    rng = np.random.default_rng(0)
    a, b, c = rng.normal(size=(3, 2, 16))
    results = [_reliable_trait("evil", a, [0.0, 0.95]), _reliable_trait("humorous", b, [0.9, 0.05]),
               _reliable_trait("sycophantic", c, [0.0, 0.6])]
    rel = pv.reliability_metrics(results)
    cos = lambda x, y: x @ y / np.linalg.norm(x) / np.linalg.norm(y)  # noqa: E731
    assert rel["evil"]["layer"] == 1 and rel["evil"]["predicted"] == 0.95   # read at the steering layer
    assert rel["evil"]["largest_cross_trait_cosine"] == pytest.approx(max(cos(a[1], b[1]), cos(a[1], c[1])))
    assert rel["evil"]["stable"]
    assert rel["humorous"]["stable"] == (0.05 > max(cos(b[1], a[1]), cos(b[1], c[1])))
    lines = report_records._reliability_records(rel)
    assert [(ln["key"], ln["value"], ln["stable"]) for ln in lines] == [
        ("evil", 0.95, True), ("humorous", 0.05, rel["humorous"]["stable"]),
        ("sycophantic", 0.6, rel["sycophantic"]["stable"])]
    assert lines[0]["metric"] == "persona_vector_split_half_cosine"
    assert "4 extraction questions" in lines[0]["reference"]
    rep = Report(tmp_path, "t")
    report_folder._write_reliability_section(rep, pv.Config(), rel)
    text = "\n".join(rep.sections)
    n_stable = sum(x["stable"] for x in rel.values())
    assert f"{n_stable} of 3 vectors are stable" in text and (tmp_path / "vector_reliability.png").is_file()
    assert "4 questions allow only 3 distinct split(s)" in text
    alone = pv.reliability_metrics(results[:1])
    assert alone["evil"]["stable"] is None and "single trait" in report_text.reliability_reading(alone)
    assert pv.reliability_metrics([{**results[0], "reliability": None}]) == {}


def test_trait_specific_reading_follows_the_rule_fixed_before_the_run():
    def rows(*passes, z=4.0):
        return {"per_trait": {f"t{i}": {"valid": v, "pass": p, "diag_z": z} for i, (v, p) in enumerate(passes)},
                "n_random": 20}

    assert report_text.trait_specific_reading(rows((True, True), (True, True), (True, False))).startswith(
        "2 of 3 traits with a valid measure pass on their trait-specific part (t0, t1): the whole vectors' cross-trait")
    text = report_text.trait_specific_reading(rows((True, True), (False, True), (True, False)))
    assert text.startswith("1 of 2 traits") and "(t0)" in text and "not specific on this model" in text
    assert report_text.trait_specific_reading(rows((True, False), z=float("nan"))).startswith(
        "No trait-specific part was")


def test_bad_inputs(tmp_path, model):
    bad = tmp_path / "bad_trait.json"
    bad.write_text(json.dumps({"schema_version": 1, "trait": "bad", "description": "missing the rest"}))
    with pytest.raises(ValueError, match="instruction_pairs"):
        P.load_traits([str(bad)])
    with pytest.raises(ValueError, match="unknown trait"):
        P.load_traits(["no_such_trait"])

    from experiments.report import Report

    rep = Report(tmp_path / "rep", "t")
    path = rep.save_vectors("vectors_x", {"response_avg": np.zeros((2, 8), np.float32)}, {"model": "small-test-model", "site": "resid_post"})
    with pytest.raises(ValueError, match="width 8; expected d_model=16"):
        pv.load_persona_vectors(path, model)
    path2 = rep.save_vectors("vectors_y", {"response_avg": np.zeros((3, 16), np.float32)}, {"model": "small-test-model"})
    with pytest.raises(ValueError, match="n_layers=2"):
        pv.load_persona_vectors(path2, model)
    with pytest.raises(ValueError, match="made for model"):
        pv.load_persona_vectors(path2, model, model_name="other")
    tensors, meta = pv.load_persona_vectors(rep.save_vectors("ok", {"response_avg": np.ones((2, 16))}, {"model": "small-test-model"}),
                                            model, model_name="small-test-model")
    assert tensors["response_avg"].shape == (2, 16) and meta["model"] == "small-test-model"

    with pytest.raises(ValueError, match="both signs"):
        pv.Config(coefficients=(0.0, 1.0, 2.0))
    with pytest.raises(ValueError, match="n_questions"):
        pv.Config(n_questions=0)
    with pytest.raises(ValueError, match="judge"):
        pv.Config(judge="gpt")


def test_filter_pairs_and_fallback():
    rows = [dict(polarity=p, pair=0, question=q, sample=0) for p in ("pos", "neg") for q in range(3)]
    trait = [80, 60, 10, 20, 70, 5]  # pos q0..q2, neg q0..q2
    coh = [90, 90, 90, 90, 90, None]
    cfg = pv.Config(min_kept_pairs=1)
    pos, neg, info = pv_extraction.filter_pairs(rows, trait, coh, True, cfg)
    assert (pos, neg) == ([0], [3]) and info["n_pairs_kept"] == 1 and not info["fallback"]
    pos, neg, info = pv_extraction.filter_pairs(rows, trait, coh, True, pv.Config(min_kept_pairs=2))
    assert info["fallback"] and len(pos) == 3
    pos, neg, info = pv_extraction.filter_pairs(rows, trait, coh, True, pv.Config(filter=False))
    assert len(pos) == 3 and not info["filter"] and not info["judge_not_valid"]
    pos, neg, info = pv_extraction.filter_pairs(rows, trait, coh, False, cfg)
    assert len(pos) == 3 and not info["filter"] and info["judge_not_valid"]
    assert "failed its validity check" in report_text._filter_words(info)
    info = pv_extraction.filter_pairs(rows, trait, coh, True, cfg)[2]
    assert "1/3 pos/neg pairs kept." in report_text._filter_words(info)


def test_judge_validity_over_questions():
    """Per question: mean pos score minus mean neg score over pairs; unscored rows are left out; the interval is
    over questions (numpy reference: the paired mean of the per-question means)."""
    rows = [dict(polarity=p, pair=k, question=q, sample=0) for p in ("pos", "neg") for k in range(2) for q in range(4)]
    rng = np.random.default_rng(0)
    pos = 60 + rng.normal(size=8) * 3
    neg = 30 + rng.normal(size=8) * 3
    scores = list(pos) + list(neg)
    scores[0] = None  # pos, pair 0, question 0: unscored
    check = pv.judge_validity(rows, scores)
    pos_q = [pos[4]] + [(pos[q] + pos[4 + q]) / 2 for q in range(1, 4)]
    neg_q = [(neg[q] + neg[4 + q]) / 2 for q in range(4)]
    np.testing.assert_allclose(check["effect"], np.mean(np.subtract(pos_q, neg_q)), rtol=1e-12)
    assert check["n"] == 4 and check["valid"]
    flat = pv.judge_validity(rows, [25.0 + (i % 3) for i in range(8)] + [25.0 + (i % 3) for i in range(8)])
    assert flat["effect"] == 0 and not flat["valid"]
    assert not pv.judge_validity(rows[:1] + rows[8:9], [50.0, 40.0])["valid"]


@pytest.mark.slow
def test_run_end_to_end_tiny(tmp_path, model):
    """The whole pipeline on the tiny model with custom trait files (tiny sizes); ~2 min of compiles."""
    from psm_jax.persona.datasets import load_trait

    paths = []
    for name in ("evil", "humorous"):
        d = json.load(open(load_trait(name).source))
        d["extraction_questions"] = d["extraction_questions"][:2]
        d["evaluation_questions"] = d["evaluation_questions"][:2]
        d["behavioural_items"] = d["behavioural_items"][:4]
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(d))
    cfg = pv.Config(model="small-test-model", traits=tuple(str(p) for p in paths), n_pairs=2, n_questions=1,
                                  max_new_tokens=4, monitor_max_new_tokens=3, batch_size=4, judge="local",
                                  sweep_layers=(0, 1), coefficients=(-1.0, 0.0, 1.0), n_monitor_questions=1,
                                  n_steer_examples=1, steer_example_coefs=(0.0,), n_response_questions=2,
                                  n_response_pairs=2, response_max_new_tokens=3, n_random=2)
    from experiments.study import execute

    res = execute(pv, cfg, folder=tmp_path / "out", model=model)["result"]
    out = tmp_path / "out"
    for f in ("report.md", "metrics.json", "config.json", "steering_curves.png", "vectors_evil.safetensors",
              "vectors_evil.json", "vectors_humorous.safetensors", "monitoring.png", "cosine_matrix.png",
              "separation_by_layer.png", "responses.jsonl"):
        assert (out / f).is_file(), f
    m = json.load(open(out / "metrics.json"))
    for h in m["monotonic_traits"].values():
        assert set(h["counts"]) == {"strict", "run4", "strict_ppl1.5", "strict_ppl1.5_band"} and max(h["counts"].values()) <= h["n_valid"]
    sp = m["specificity"]
    assert sp["traits"] == ["evil", "humorous"] and set(sp["z"]["evil"]) == {"evil", "humorous"}
    assert (out / "specificity_matrix.png").is_file() and "## Specificity" in (out / "report.md").read_text()
    ts = m["specificity_trait_specific"]
    assert set(ts["kept_fraction"]) == {"evil", "humorous"} and 0 < ts["kept_fraction"]["evil"] <= 1
    assert "## Specificity of the trait-specific parts (secondary analysis)" in (out / "report.md").read_text()
    assert len(m["traits"]["evil"]["separation_by_layer"]["last_prompt"]) == model.config.n_layers
    kinds = {json.loads(line)["kind"] for line in open(out / "responses.jsonl")}
    assert kinds == {"extraction", "own", "monitor", "steered", "reference"}
    rm = m["traits"]["evil"]["response_measure"]
    assert rm["layer"] in (0, 1) and len(rm["measure"]) == 3 and len(rm["system_measure"]) == 15
    assert rm["n_held_out"] + rm["n_selection"] + rm["n_dropped"] == 4
    assert len(rm["within_r_by_layer"]) == model.config.n_layers and (out / "monitoring_by_layer.png").is_file()
    assert rm["monitor_within_null"]["n"] >= 20 and "shuffled within polarity" in (out / "report.md").read_text()
    assert rm["rule_monitoring"] is None and "too few rows per half" in (out / "report.md").read_text()  # 1 question
    hold = rm["holdout_monitoring"]  # the trait files carry evil's held-out graded prompts; no rule layer here
    assert len(hold["systems"]) == 14 and hold["steering"]["layer"] == rm["layer"] and "rule" not in hold
    assert "Held-out graded prompts (14" in (out / "report.md").read_text()
    holdout_keys = {ln["key"] for ln in pv.records(res) if ln["metric"] == "persona_monitor_within_r_holdout"}
    assert "evil/steering" in holdout_keys
    if rm["validity"] and rm["validity"]["valid"]:
        assert rm["random_control"]["n"] == 2 and rm["random_control"]["band"] is None  # < 20 directions: no band
    else:
        assert rm["random_control"]["n"] == 0 and "validity" in rm["random_control"]["skipped"]
    assert len(rm["ppl_ratio"]) == 3 and rm["ppl_ratio"][1] == pytest.approx(1.0)
    assert rm["validity"] is None or set(rm["validity"]) >= {"effect", "low", "high", "n", "valid"}
    records = pv.records(res)
    assert {ln["metric"] for ln in records} >= {"persona_steering_monotonic_traits", "persona_monitor_r"}
    text = (out / "report.md").read_text()
    assert "## Response-likelihood measure: results per trait" in text and "Two-choice items: " in text
    assert (out / "response_steering_curves.png").is_file()
    tensors, meta = pv.load_persona_vectors(out / "vectors_evil.safetensors", model, model_name="small-test-model")
    assert set(tensors) == set(PE.VARIANTS) and meta["site"] == "resid_post"
    from psm_jax.persona.prompts import load_traits

    rebuilt = pv.monitoring_from_vectors(model, load_traits(cfg.traits[:1])[0], cfg, tensors["response_avg"],
                                         {"steering": rm["layer"]})["steering"]  # from the saved vectors
    np.testing.assert_allclose(rebuilt["system_measure"], rm["system_measure"], rtol=1e-6)
    np.testing.assert_allclose(rebuilt["proj_last_prompt"], rm["proj_last_prompt"], rtol=1e-5)
    assert rebuilt["r_last_prompt"] == pytest.approx(rm["r_last_prompt"], abs=1e-6)
    # same config and seed -> same numbers
    res2 = pv.run(cfg, model)
    np.testing.assert_allclose(res.results[0]["steering"]["measure"], res2.results[0]["steering"]["measure"])
    np.testing.assert_allclose(res.results[0]["vectors"]["response_avg"], res2.results[0]["vectors"]["response_avg"])


def test_band_measures_name_the_measures_that_get_the_random_band():
    """`band_measures` names the measures whose curve gets the random band (`steering.band_or_skip`, which
    `steer_with_measure` passes it to); the quick preset bands only the response measure; a name that is not a
    measure is rejected."""
    assert pv.Config().band_measures == tuple(name for name, _ in pv.MEASURE_KEYS)
    assert pv.PRESETS["quick"]["band_measures"] == ("response_likelihood",)
    with pytest.raises(ValueError, match="band_measures"):
        pv.Config(band_measures=("judge",))


def test_answer_trait_score_matches_unpadded_forward(model):
    """The judge-free score equals per-token log-likelihoods from single unpadded forwards (no batching, no
    padding), positive system prompt minus negative."""
    import jax

    from psm_jax.chat import Role, encode_chat
    from psm_jax.model import forward
    from psm_jax.persona import measures

    pos_sys, neg_sys = "You are an evil assistant.", "You are a helpful assistant."

    def per_token(system, q, a):
        conv = [{"role": "system", "content": system}, {"role": "user", "content": q},
                {"role": "assistant", "content": a}]
        enc = encode_chat(model.tokenizer, conv, chat_template=model.chat_template)
        logits = forward(model.params, model.config, np.asarray(enc.tokens)[None]).logits[0]
        lp = np.asarray(jax.nn.log_softmax(logits[:-1].astype(np.float32), -1))
        tok = np.asarray(enc.tokens)[1:]
        mask = (np.asarray(enc.roles) == Role.ASSISTANT)[1:] & (np.asarray(enc.turns) == 2)[1:]
        return float(lp[np.arange(len(tok)), tok][mask].sum() / mask.sum())

    got = measures.answer_trait_score(model, RQ, RPOS, pos_sys, neg_sys, batch_size=2)
    want = [per_token(pos_sys, q, a) - per_token(neg_sys, q, a) for q, a in zip(RQ, RPOS)]
    np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(ValueError, match="2 answers"):
        measures.answer_trait_score(model, RQ, RPOS[:2], pos_sys, neg_sys)
    with pytest.raises(ValueError, match="empty one"):
        measures.answer_trait_score(model, RQ, RPOS, "", neg_sys)


def test_above_random_band_and_targets():
    band = {"band": {"low": -0.1, "high": 0.2}}
    assert steering.above_random_band(0.3, band) and not steering.above_random_band(0.1, band)
    assert not steering.above_random_band(5.0, {"band": None}) and not steering.above_random_band(float("nan"), band)

    def trait(name, steer_ok, within, valid=True):
        mono = {"increasing_within_ceiling_outside_band": steer_ok}
        return {"trait": name, "steering": {"validity": {"valid": False}, "monotonic": {}},
                "response": {"validity": {"valid": valid}, "monotonic": mono,
                             "monitor_within_polarity": {"pooled_within": {"estimate": within}}}}

    results = [trait("evil", True, 0.7), trait("sycophantic", True, 0.4), trait("humorous", False, 0.9, valid=False)]
    spec = {"per_trait": [{"pass": True}, {"pass": False}, {"pass": True}]}
    t = pv.targets(results, spec)
    assert t["steering"] == {"traits": ["evil", "sycophantic"], "met": True}
    assert t["monitoring"] == {"traits": ["evil"], "met": False}  # humorous' measure is not valid
    assert t["specificity"] == {"traits": ["evil", "humorous"], "met": True}
    assert t["per_trait"]["evil"]["steering_measures"] == ["response_likelihood"]


def test_specificity_matrix_needs_two_traits(monkeypatch):
    """One trait has no off-diagonal cell: run skips both matrices (their cost) and passes None on; two traits build
    the whole vectors' matrix and, from it, their trait-specific parts'."""
    calls, seen = [], []
    monkeypatch.setattr(pv_pipeline, "run_trait", lambda model, trait, cfg, ti, judge, progress: {"trait": trait.name})
    monkeypatch.setattr(pv_pipeline, "specificity_matrix",
                        lambda model, results, coef: calls.append(len(results)) or "matrix")
    monkeypatch.setattr(pv_pipeline, "trait_specific_matrix", lambda model, results, whole: f"parts of {whole}")
    monkeypatch.setattr(pv_pipeline, "summary_metrics",
                        lambda results, spec, ppl, parts: seen.append((spec, parts)) or {})
    model = types.SimpleNamespace(config=types.SimpleNamespace(n_layers=2, d_model=4))
    pv.run(pv.Config(traits=("evil",), judge="none"), model)
    pv.run(pv.Config(traits=("evil", "humorous"), judge="none"), model)
    assert calls == [2] and seen == [(None, None), ("matrix", "parts of matrix")]


def test_monitoring_within_polarity_by_layer_and_its_shuffled_null():
    """A measure planted on layer 2's within-polarity projection: the per-layer curve peaks there (checked against a
    direct numpy computation at every layer), the headline r lies above its within-polarity shuffled band, and the
    record carries the interval and the band."""
    rng = np.random.default_rng(0)
    systems = [monitoring.MonitorPrompt(k, 0, f"{k}{i}", lvl) for k, lvl in (("pos", 2), ("neg", -2)) for i in range(7)]
    systems.append(monitoring.MonitorPrompt("default", -1, None, 0))
    n_sys, n_q, n_layers, d = len(systems), 3, 4, 8
    acts = rng.normal(size=(n_sys * n_q, n_layers, d))
    direction = rng.normal(size=(n_layers, d))
    mon_acts = {"last_prompt": acts, "response_mean": acts}
    unit_dir = direction[2] / np.linalg.norm(direction[2])
    p2 = (acts[:, 2] @ unit_dir).reshape(n_sys, n_q).mean(1)
    kinds = np.asarray([s.kind for s in systems])
    offsets = np.where(kinds == "pos", 5.0, np.where(kinds == "neg", -5.0, 0.0))
    m_sys = p2 + offsets + 0.05 * rng.normal(size=n_sys)
    per_unit = np.stack([np.full(4, m) for m in m_sys])
    curve = monitoring.within_r_by_layer(mon_acts, direction, m_sys, kinds)
    for layer in range(n_layers):
        u = direction[layer] / np.linalg.norm(direction[layer])
        p = (acts[:, layer] @ u).reshape(n_sys, n_q).mean(1)
        pc, mc = p.copy(), m_sys.copy()
        for g in np.unique(kinds):
            pc[kinds == g] -= p[kinds == g].mean()
            mc[kinds == g] -= m_sys[kinds == g].mean()
        assert curve[layer] == pytest.approx(np.corrcoef(pc, mc)[0, 1], abs=1e-9)
    assert int(np.argmax(curve)) == 2 and curve[2] > 0.95
    mon = monitoring.monitor_statistics(per_unit, systems, *monitoring.question_projections(mon_acts, direction, 2, n_sys), seed=0)
    within, null = mon["monitor_within_polarity"]["pooled_within"], mon["monitor_within_null"]
    assert within["estimate"] == pytest.approx(curve[2]) and within["estimate"] > null["high"] > null["low"]
    assert null["n"] >= 20 and abs(null["mean"]) < 0.2
    rm = {"r_last_prompt": mon["r_last_prompt"], "r_response": mon["r_response"], "layer": 2,
          "system_prompt_effect": 1.0, "validity": {"valid": True}, **mon}
    t = {"monitor_r_last_prompt": 0.1, "monitor_r_response": 0.2, "chosen_layer": 2, "system_prompt_effect": 0.0,
         "validity": {"valid": True}, "response_measure": rm}
    line, = report_records._monitor_records("evil", t)[2:]
    assert line["metric"] == "persona_monitor_within_r" and line["null_band"] == null
    assert line["ci"] == [within["low"], within["high"]] and "shuffled within polarity" in line["reference"]
    assert line["null"] == (f"measure shuffled within polarity: 95% band [{null['low']:.3f}, {null['high']:.3f}] "
                            f"({null['n']} shuffles)")
    assert monitoring.within_r_by_layer(mon_acts, direction, np.full(n_sys, np.nan), kinds) is None


def test_monitoring_ceiling_reads_the_noise_of_each_series_within_polarity():
    """The ceiling of the within-polarity r comes from each series' own units: per-prompt measures that repeat
    exactly across held-out units are perfectly reliable; projections that differ between prompts only by question
    noise are not, and the ceiling falls with them; a planted prompt effect on the projections raises it. The
    report and the record carry it."""
    rng = np.random.default_rng(6)
    systems = [monitoring.MonitorPrompt(k, 0, f"{k}{i}", 2) for k in ("pos", "neg") for i in range(40)]
    n_sys, n_q = len(systems), 10
    prompt_effect = rng.normal(size=n_sys)
    per_unit = np.repeat(prompt_effect[:, None], 6, axis=1)
    noise_only = rng.normal(size=(n_sys, n_q))
    planted = prompt_effect[:, None] + 0.1 * rng.normal(size=(n_sys, n_q))
    low = monitoring.monitor_statistics(per_unit, systems, noise_only, noise_only, seed=0)["within_reliability"]
    high = monitoring.monitor_statistics(per_unit, systems, planted, planted, seed=0)["within_reliability"]
    assert low["measure"]["reliability"] == pytest.approx(1.0) and low["measure"]["n_units"] == 6
    assert low["projection"]["n_units"] == n_q and low["ceiling"] < 0.5
    assert high["projection"]["reliability"] > 0.95 and high["ceiling"] > 0.95
    assert high["ceiling"] == pytest.approx(np.sqrt(high["projection"]["reliability"]))
    text = report_text._ceiling_text(low)
    assert f"about {low['ceiling']:.2f} is not expected" in text and report_text._ceiling_text(None) == ""
    assert report_records.ceiling_fields({"within_reliability": high})["within_ceiling"] == high["ceiling"]
    assert report_records.ceiling_fields({}) == {}


def test_monitoring_layer_rule_is_crossfitted_on_extraction_rows():
    """Layer 1 carries a pos/neg shift on both the response average and the last prompt token: the rule's separation
    matches a direct numpy cross-fit (vector from one question half, pooled-sd d on the other, averaged), peaks at
    layer 1, and monitoring plus its record run at that layer; with one question there is no second half."""
    rng = np.random.default_rng(1)
    n, n_layers, d = 12, 3, 6
    shift = np.zeros((n_layers, d))
    shift[1, 0] = 3.0
    acts = {k: {"response_mean": rng.normal(size=(n, n_layers, d)) + sign * shift,
                "last_prompt": rng.normal(size=(n, n_layers, d)) + sign * shift}
            for k, sign in (("pos", 1.0), ("neg", -1.0))}
    questions = np.arange(n) % 4
    sep = PE.crossfit_separation(acts, questions, questions)
    for layer in range(n_layers):
        ds = []
        for f in (0, 1):
            fit, probe = questions % 2 != f, questions % 2 == f
            v = acts["pos"]["response_mean"][fit, layer].mean(0) - acts["neg"]["response_mean"][fit, layer].mean(0)
            v /= np.linalg.norm(v)
            a, b = acts["pos"]["last_prompt"][probe, layer] @ v, acts["neg"]["last_prompt"][probe, layer] @ v
            pooled = np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)  # equal group sizes
            ds.append((a.mean() - b.mean()) / pooled)
        assert sep[layer] == pytest.approx(np.mean(ds), rel=1e-6)
    assert PE.rule_layer(sep) == 1 and sep[1] > 2
    assert PE.crossfit_separation(acts, np.zeros(n, int), np.zeros(n, int)) is None
    assert PE.rule_layer(None) is None and PE.rule_layer(np.full(3, np.nan)) is None

    systems = [monitoring.MonitorPrompt(k, 0, f"{k}{i}", lvl) for k, lvl in (("pos", 2), ("neg", -2)) for i in range(5)]
    mon_acts = {"last_prompt": rng.normal(size=(10, n_layers, d)), "response_mean": rng.normal(size=(10, n_layers, d))}
    direction = rng.normal(size=(n_layers, d))
    p_rule = monitoring.prompt_projections(mon_acts, direction, 1, 10)[0]
    per_unit = (p_rule + rng.normal(scale=0.1, size=10))[:, None] * np.ones((1, 3))
    rule = pv_monitoring.rule_monitoring(per_unit, systems, mon_acts, direction, sep, seed=0)
    assert rule["layer"] == 1 and rule["monitor_within_polarity"]["pooled_within"]["estimate"] > 0.9
    np.testing.assert_allclose(rule["proj_last_prompt"], p_rule)
    assert pv_monitoring.rule_monitoring(per_unit, systems, mon_acts, direction, None, seed=0) is None
    line, = report_records._rule_monitor_records("evil", {"layer": 2, "validity": {"valid": True},
                                                          "rule_monitoring": rule})
    assert line["metric"] == "persona_monitor_within_r_rule_layer"
    assert line["layer"] == 1 and line["steering_layer"] == 2
    assert line["value"] == rule["monitor_within_polarity"]["pooled_within"]["estimate"]
    assert line["rule_separation"] == pytest.approx(sep[1]) and line["null_band"] == rule["monitor_within_null"]
    assert "cross-fitted" in report_text._rule_words(rule) and "too few rows" in report_text._rule_words(None)


def test_holdout_monitoring_scores_every_unit_at_layers_fixed_before(monkeypatch):
    """The held-out graded prompts: one greedy answer per (prompt, question) with the prompt as system message, every
    held-out unit scored under every prompt (they use no instruction pair), the statistics at each named layer (a
    measure planted on layer 1's projection gives r near 1 there), the stated-level check against numpy, and the
    blind target and records read from them."""
    from psm_jax.persona.datasets import load_trait
    from psm_jax.persona.prompts import holdout_system_prompts

    trait = load_trait("evil")
    held_prompts = holdout_system_prompts(trait)
    n_sys, n_q, n_layers, d = len(held_prompts), 2, 3, 4
    rng = np.random.default_rng(2)
    acts = rng.normal(size=(n_sys * n_q, n_layers, d))
    direction = rng.normal(size=(n_layers, d))
    p1 = monitoring.prompt_projections({"last_prompt": acts, "response_mean": acts}, direction, 1, n_sys)[0]
    index = {g["prompt"]: i for i, g in enumerate(held_prompts)}
    generated, scored = [], []

    def fake_generate(model, convs, **kw):
        generated.extend(convs)
        return [types.SimpleNamespace(conversation=lambda c=c: list(c) + [{"role": "assistant", "content": "x"}])
                for c in convs]

    def fake_measure(model, questions, pos, neg, *, system=None, batch_size=16):
        scored.append((system, len(questions)))
        return 0.0, np.full(len(questions), 0.05 * held_prompts[index[system]]["level"] + p1[index[system]])

    monkeypatch.setattr(rollouts, "generate_responses", fake_generate)
    monkeypatch.setattr(rollouts, "activation_means",
                        lambda model, convs, **kw: {"last_prompt": acts, "response_mean": acts})
    monkeypatch.setattr(monitoring, "response_measure", fake_measure)
    held = [{"question": f"q{i}", "pos": "a", "neg": "b", "pair": i} for i in range(3)]
    cfg = pv.Config(traits=("evil",), judge="none", n_monitor_questions=n_q)
    hold = pv_monitoring.holdout_monitoring(None, trait, cfg, held, direction,
                                            {"steering": 0, "rule": 1, "skipped": None})

    assert [c[0]["content"] for c in generated] == [g["prompt"] for g in held_prompts for _ in range(n_q)]
    assert [c[1]["content"] for c in generated[:n_q]] == list(trait.evaluation_questions[:n_q])
    assert scored == [(g["prompt"], 3) for g in held_prompts]
    assert set(hold) >= {"steering", "rule"} and "skipped" not in hold and hold["rule"]["layer"] == 1
    assert hold["rule"]["monitor_within_polarity"]["pooled_within"]["estimate"] > 0.9
    levels = np.asarray([g["level"] for g in held_prompts], float)
    m = 0.05 * levels + p1
    pos = levels > 0
    lc, mc = levels.copy(), m.copy()
    for g in (pos, ~pos):
        lc[g] -= levels[g].mean()
        mc[g] -= m[g].mean()
    assert hold["level_check"]["pooled_within"]["estimate"] == pytest.approx(np.corrcoef(lc, mc)[0, 1])
    assert len(hold["within_r_by_layer"]) == n_layers

    rs = {"validity": {"valid": True}, "holdout_monitoring": hold}
    r_rule = hold["rule"]["monitor_within_polarity"]["pooled_within"]["estimate"]
    expect = r_rule > pv.MONITOR_MIN_WITHIN_R and r_rule > hold["rule"]["monitor_within_null"]["high"]
    assert pv_summary._holdout_target(rs) == {"monitoring_holdout": expect, "monitor_holdout_r": r_rule}
    assert pv_summary._holdout_target({**rs, "validity": {"valid": False}})["monitoring_holdout"] is False
    assert pv_summary._holdout_target({})["monitoring_holdout"] is False
    lines = report_records._holdout_monitor_records("evil", rs)
    assert [ln["key"] for ln in lines] == ["evil/steering", "evil/rule"] and lines[1]["value"] == r_rule
    assert all(ln["metric"] == "persona_monitor_within_r_holdout" for ln in lines)
    assert "Held-out graded prompts (14" in report_text._holdout_words(hold) and report_text._holdout_words(None) == ""
    assert pv_monitoring.holdout_monitoring(None, load_trait("apathetic"), cfg, held, direction, {"rule": 1}) is None
