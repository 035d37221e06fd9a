"""Tools over recorded results: the latest-values table of benchmarks/RESULTS.md and the seed-replicate comparison."""
import json

from benchmarks.results_table import latest_rows, row_key


def _line(**fields):
    return {"metric": "m", "value": 1.0, "date": "2026-12-06", **fields}


def test_a_nonzero_seed_gets_its_own_row_and_seed_zero_shares_the_unseeded_one():
    assert row_key(_line(key="evil")) == ("m", "evil")
    assert row_key(_line(key="evil", seed=0)) == ("m", "evil")
    assert row_key(_line(key="evil", seed=1)) == ("m", "evil, seed 1")
    assert row_key(_line(trait="evil", key="evil", measure="items")) == ("m", "evil, items")


def test_a_run_on_another_model_gets_its_own_row():
    from psm_jax.persona import DEFAULT_MODEL

    assert row_key(_line(key="a", model=DEFAULT_MODEL)) == ("m", "a")
    assert row_key(_line(key="a", model="runs/organism/model", seed=1)) == ("m", "a, model runs/organism/model, seed 1")


def test_the_latest_line_of_each_row_wins():
    lines = [_line(key="a", value=1.0), _line(key="a", value=2.0, seed=1), _line(key="a", value=3.0, seed=0)]
    rows = latest_rows("\n".join(json.dumps(ln) for ln in lines) + "\n\n")
    assert {k: r["value"] for k, r in rows.items()} == {("m", "a"): 3.0, ("m", "a, seed 1"): 2.0}


def _report(folder, vectors: dict, layers: dict):
    from experiments.report import write_vectors

    folder.mkdir()
    metrics = {"traits": {t: {"chosen_layer": 0} for t in vectors},
               "specificity": {"traits": list(layers), "layers": list(layers.values())},
               "vector_reliability": {t: {"predicted_by_layer": [0.1, 0.2, 0.3]} for t in vectors}}
    (folder / "config.json").write_text(json.dumps({"n_pairs": 5, "n_questions": 4, "n_samples": 1}))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    for name, v in vectors.items():
        write_vectors(folder, f"vectors_{name}", {"response_avg": v}, {"model": "m"})


def test_seed_cosine_against_a_numpy_reference_and_the_stability_rule(tmp_path):
    import numpy as np

    from benchmarks.persona_vector_replicate import compare

    rng = np.random.default_rng(0)
    a = {t: rng.normal(size=(3, 16)).astype(np.float32) for t in ("evil", "humorous")}
    b = {"evil": a["evil"] + 0.1 * rng.normal(size=(3, 16)).astype(np.float32),   # a close replicate
         "humorous": rng.normal(size=(3, 16)).astype(np.float32)}                  # an unrelated one
    _report(tmp_path / "a", a, {"evil": 2, "humorous": 1})
    _report(tmp_path / "b", b, {"evil": 0, "humorous": 0})
    rows = {r["trait"]: r for r in compare(tmp_path / "a", tmp_path / "b")}
    x, y = a["evil"][2].astype(np.float64), b["evil"][2].astype(np.float64)
    assert rows["evil"]["layer"] == 2 and rows["humorous"]["layer"] == 1  # the first run's layers
    assert (rows["evil"]["predicted_first"], rows["humorous"]["predicted_second"]) == (0.3, 0.2)
    assert np.isclose(rows["evil"]["seed_cosine"], x @ y / np.sqrt((x @ x) * (y @ y)))
    cross = [np.dot(p[1], q[1]) / np.linalg.norm(p[1]) / np.linalg.norm(q[1])
             for p, q in ((a["humorous"], a["evil"]), (b["humorous"], b["evil"]))]
    assert np.isclose(rows["humorous"]["largest_cross_trait_cosine"], max(cross), atol=1e-6)
    assert rows["evil"]["stable"] and rows["evil"]["seed_cosine"] > 0.9
    assert rows["humorous"]["stable"] == (rows["humorous"]["seed_cosine"] > max(cross))
    from_b = {r["trait"]: r["layer"] for r in compare(tmp_path / "a", tmp_path / "b", layers_from=tmp_path / "b")}
    assert from_b == {"evil": 0, "humorous": 0}


def test_replicate_records_are_keyed_by_trait_and_extraction_size(tmp_path, monkeypatch):
    import numpy as np

    from benchmarks import persona_vector_replicate as rep

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        _report(tmp_path / name, {t: rng.normal(size=(3, 8)).astype(np.float32) for t in ("evil", "humorous")},
                {"evil": 1, "humorous": 2})
    results = tmp_path / "results.jsonl"
    monkeypatch.setenv("PSM_RESULTS", str(results))
    rep.main([str(tmp_path / "a"), str(tmp_path / "b"), "--record"])
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert [(x["key"], x["extraction"], x["layer"]) for x in lines] == [("evil/5x4x1", "5x4x1", 1),
                                                                        ("humorous/5x4x1", "5x4x1", 2)]
    assert lines[0]["command"].endswith(f"{tmp_path / 'a'} {tmp_path / 'b'} --record")


def test_finetune_vector_blocks_compare_disjoint_questions():
    """Blocks of consecutive question indices: the measured cosines are those of the blocks' own mean differences
    (numpy reference), and a block whose questions point along distinct axes is predicted and measured apart."""
    import itertools

    import numpy as np
    import pytest

    from benchmarks.finetune_vector_reliability import block_comparison, largest_cross_trait

    rng = np.random.default_rng(0)
    question = np.tile(np.arange(8), 3)  # 3 instruction pairs x 8 questions
    truth = np.zeros(12)
    truth[0] = 1.0
    pos = truth + 0.3 * rng.normal(size=(24, 12))
    neg = 0.3 * rng.normal(size=(24, 12))
    got = block_comparison(pos, neg, question, 4)
    vecs = [pos[question // 4 == b].mean(0) - neg[question // 4 == b].mean(0) for b in range(2)]
    want = vecs[0] @ vecs[1] / np.linalg.norm(vecs[0]) / np.linalg.norm(vecs[1])
    assert got["n_blocks"] == 2 and got["measured"] == pytest.approx(want) == got["measured_min"]
    assert 0 < got["predicted"] <= 1 and got["predicted_all"] > got["predicted"] - 0.2
    np.testing.assert_allclose(got["vector_all"], pos.mean(0) - neg.mean(0))
    apart = np.eye(12)[question]  # every question its own axis: nothing shared between blocks
    spread = block_comparison(apart, np.zeros_like(apart), question, 2)
    assert spread["n_blocks"] == 4 and spread["measured"] == pytest.approx(0.0, abs=1e-12)
    assert spread["predicted"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="block=5"):
        block_comparison(pos, neg, question, 5)
    results = {"a": {"vector_all": np.array([1.0, 0.0])}, "b": {"vector_all": np.array([1.0, 1.0])},
               "c": {"vector_all": np.array([0.0, -1.0])}}
    cross = largest_cross_trait(results)
    assert cross["a"] == pytest.approx(2 ** -0.5) and cross["c"] == pytest.approx(0.0)
    assert list(itertools.islice(largest_cross_trait({"a": results["a"]}).values(), 1)) == [None]


def test_monitoring_ceiling_reads_the_run_layers_and_refuses_a_rebuild_that_differs():
    import pytest

    from benchmarks.monitoring_ceiling import check_rebuild, monitoring_layers, reported_within_r

    within = {"monitor_within_polarity": {"pooled_within": {"estimate": 0.25}}}
    tm = {"response_measure": {"layer": 14, **within,
                               "rule_monitoring": {"layer": 28, "monitor_within_polarity": {"pooled_within":
                                                                                           {"estimate": 0.7}}}}}
    assert monitoring_layers(tm) == {"steering": 14, "rule": 28}
    assert reported_within_r(tm, "steering") == 0.25 and reported_within_r(tm, "rule") == 0.7
    assert monitoring_layers({"response_measure": {"layer": 3, "rule_monitoring": None}}) == {"steering": 3}
    with pytest.raises(ValueError, match="response_measure=true"):
        monitoring_layers({"response_measure": None})
    check_rebuild("evil", "steering", 0.25 + 1e-9, 0.25)
    with pytest.raises(RuntimeError, match="differs from the report"):
        check_rebuild("evil", "steering", 0.26, 0.25)


def test_judge_validity_reads_one_traits_extraction_answers_grouped_by_question():
    import pytest

    from benchmarks.judge_validity import extraction_rows
    from experiments.persona_vectors import judge_validity

    lines = [{"trait": "evil", "kind": "extraction", "polarity": pol, "question": f"q{q}", "response": f"{pol}{q}{k}"}
             for q in range(4) for pol in ("pos", "neg") for k in range(2)]
    lines += [{"trait": "humorous", "kind": "extraction", "polarity": "pos", "question": "q0", "response": "x"},
              {"trait": "evil", "kind": "own", "question": "q0", "response": "y"}]
    rows = extraction_rows(lines, "evil")
    assert len(rows) == 16 and {r["question"] for r in rows} == {"q0", "q1", "q2", "q3"}
    scores = [80.0 + q if r["polarity"] == "pos" else 20.0 for q, r in ((int(r["question"][1]), r) for r in rows)]
    check = judge_validity(rows, scores)
    assert check["n"] == 4 and check["effect"] == pytest.approx(61.5) and check["valid"]
    with pytest.raises(ValueError, match="no extraction answers of trait 'sycophantic'"):
        extraction_rows(lines, "sycophantic")
