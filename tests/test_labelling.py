"""sae.features.label: JSONL schema round trip, detection-scoring math, explainers (local tiny model and a
fake OpenAI-compatible transport: no network), SAELens export with labels."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sae import features as F
from sae.features import label as L
from tests.test_features import convs, random_sae, synthetic_table, tiny_chat_model


def records():
    t = synthetic_table()
    return F.build_records(t, [2, 5], extra={2: {"found_by": ["contrast"], "cohens_d": 1.25}})


# ------------------------------------------------------------------------------------------ metrics


def test_balanced_accuracy_by_hand():
    y = [1, 1, 1, 1, 0, 0]
    p = [1, 1, 1, 0, 1, 0]  # TPR 3/4, TNR 1/2
    assert L.balanced_accuracy(y, p) == pytest.approx(0.625)
    assert L.balanced_accuracy(y, y) == 1.0
    assert L.balanced_accuracy(y, [1] * 6) == 0.5  # always "yes": chance, whatever the class balance
    assert L.balanced_accuracy(y, [not v for v in y]) == 0.0
    with pytest.raises(ValueError, match="both classes"):
        L.balanced_accuracy([1, 1], [1, 0])
    with pytest.raises(ValueError, match="equal shapes"):
        L.balanced_accuracy([1, 0], [1])


def test_detection_metrics_by_hand():
    m = L.detection_metrics([1, 1, 0, 0, 0], [0.5, -1, -2, 0.1, -0.1])
    assert m["tpr"] == 0.5 and m["tnr"] == pytest.approx(2 / 3) and m["balanced_accuracy"] == pytest.approx(7 / 12)
    assert m["n_pos"] == 2 and m["n_neg"] == 3 and m["threshold"] == 0.0


class OracleScorer:
    """Says 'yes' exactly on windows that contain an activating token (reads the hidden acts)."""

    name = "oracle"

    def __init__(self, lookup, flip=False, const=None):
        self.lookup, self.flip, self.const = lookup, flip, const

    def scores(self, label, texts):
        if self.const is not None:
            return np.full(len(texts), self.const)
        s = np.asarray([1.0 if self.lookup[t] else -1.0 for t in texts])
        return -s if self.flip else s


def test_detection_score_with_oracle_and_chance_scorers():
    rec = records()[0]
    pos, neg = L.detection_set(rec)
    assert pos and neg and all(e["split"] == "score" for e in pos)
    lookup = {L.example_text(e, highlight=False): max(e["acts"]) > 0 for e in pos + neg}
    assert L.detection_score(rec, "x", OracleScorer(lookup))["balanced_accuracy"] == 1.0
    assert L.detection_score(rec, "x", OracleScorer(lookup, flip=True))["balanced_accuracy"] == 0.0
    d = L.detection_score(rec, "x", OracleScorer(lookup, const=2.0))
    assert d["balanced_accuracy"] == 0.5 and d["auroc"] == 0.5 and d["scorer"] == "oracle"
    assert L.detection_score(records()[1], "x", OracleScorer(lookup)) is None  # never fires: no positives


# ------------------------------------------------------------------------------------------ JSONL


def test_jsonl_round_trip(tmp_path):
    recs = records()
    recs[0]["label"], recs[0]["detection"] = "bananas", {"balanced_accuracy": 0.75, "n_pos": 10, "n_neg": 10}
    sae_meta = {"model": "tiny", "layer": 1, "site": "resid_post", "d_sae": 8}
    path = L.write_jsonl(tmp_path / "latents.jsonl", recs, sae=sae_meta)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(l)["schema_version"] == L.SCHEMA_VERSION for l in lines)
    back = L.read_jsonl(path)
    assert [r["latent"] for r in back] == [2, 5]
    assert back[0]["label"] == "bananas" and back[0]["sae"] == sae_meta and back[0]["ranking"]["cohens_d"] == 1.25
    assert back[0]["examples"] == json.loads(json.dumps(recs[0]["examples"]))
    assert back[1]["detection"] is None and back[1]["explainer"] is None
    # writing what was read gives the same file
    L.write_jsonl(tmp_path / "again.jsonl", back)
    assert (tmp_path / "again.jsonl").read_text() == path.read_text()


def test_jsonl_schema_errors(tmp_path):
    recs = records()
    bad = json.loads(json.dumps(L.to_line(recs[0])))
    bad["examples"][0]["mark"] = 99
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(L.SchemaError, match=r"bad.jsonl:1: examples\[0\]: mark=99"):
        L.read_jsonl(tmp_path / "bad.jsonl")
    old = dict(L.to_line(recs[0]), schema_version=0)
    (tmp_path / "old.jsonl").write_text(json.dumps(old) + "\n")
    with pytest.raises(L.SchemaError, match="schema_version=0; expected 1"):
        L.read_jsonl(tmp_path / "old.jsonl")
    (tmp_path / "junk.jsonl").write_text("{not json\n")
    with pytest.raises(L.SchemaError, match="junk.jsonl:1: not JSON"):
        L.read_jsonl(tmp_path / "junk.jsonl")
    with pytest.raises(L.SchemaError, match="role_rates"):
        L.write_jsonl(tmp_path / "x.jsonl", [dict(recs[0], role_rates={"user": 0.1})])
    with pytest.raises(FileNotFoundError):
        L.read_jsonl(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------ text


def test_example_text_highlights_runs():
    ex = {"tokens": ["I", " love", " ban", "anas", " so", "\nmuch"], "acts": [0, 0, 1.0, 2.0, 0, 0.5]}
    assert L.example_text(ex) == "I love <<bananas>> so <<much>>"
    assert L.example_text(ex, highlight=False) == "I love bananas so much"
    prompt = L.explain_prompt([dict(ex, act=2.0, kind="top")])
    assert "Excerpt 1: I love <<bananas>> so <<much>>" in prompt and "short label" in prompt
    with pytest.raises(ValueError, match="no activating example"):
        L.explain_prompt([dict(ex, act=0.0, kind="random")])


def test_clean_label():
    assert L.clean_label('Label: "Mentions of fruit."\nMore text') == "Mentions of fruit"
    assert L.clean_label("Excerpt 1: about cats") == "about cats" and L.clean_label("Excerpt 3:") == "(no label)"
    assert L.clean_label("") == "(no label)"
    assert len(L.clean_label("word " * 50).split()) == 12


# ------------------------------------------------------------------------------------------ explainers


def test_local_explainer_and_scorer_on_a_tiny_model():
    model = tiny_chat_model()
    sae = random_sae(bias=-0.1)
    col = F.collect(model, sae, convs("pos", 4) + convs("neg", 4), latents=[1, 2])
    recs = F.build_records(col.table, [1, 2], model=model, sae=sae, n_bins=4, per_bin=2, n_top=2, n_random=4)
    ex = L.LocalExplainer(model, max_new_tokens=6, batch_size=2)
    sc = L.LocalDetectionScorer(model, batch_size=4)
    L.label_records(recs, ex, sc)
    for r in recs:
        if L.explain_examples(r):
            assert isinstance(r["label"], str) and r["label"] and r["explainer"].startswith("local:")
            if r["detection"] is not None:
                assert 0.0 <= r["detection"]["balanced_accuracy"] <= 1.0 and r["detection"]["scorer"].startswith("local:")
    s = sc.scores("anything", ["one text", "another text", "third"])
    assert s.shape == (3,) and np.isfinite(s).all()
    one_shot = L.LocalExplainer(model, max_new_tokens=4, batch_size=2, one_shot=True)
    labs = one_shot.explain_many([L.explain_examples(r) for r in recs if L.explain_examples(r)])
    assert all(isinstance(l, str) and l and l != L.DEMO_LABEL for l in labs)


def fake_transport(calls, reply):
    def transport(url, headers, payload):
        calls.append((url, headers, payload))
        return reply(payload)

    return transport


def test_openai_compatible_explainer_and_scorer_without_network():
    calls = []
    exp = L.OpenAICompatibleExplainer(base_url="http://example.invalid/v1/", model="m", api_key="k",
                                      transport=fake_transport(calls, lambda p: {"choices": [{"message": {
                                          "content": "Label: fruit words.\nextra"}}]}))
    rec = records()[0]
    assert exp.explain_many([L.explain_examples(rec)]) == ["fruit words"]
    url, headers, payload = calls[0]
    assert url == "http://example.invalid/v1/chat/completions" and headers["Authorization"] == "Bearer k"
    assert payload["model"] == "m" and "<<" in payload["messages"][0]["content"]

    def judge(p):
        yes = "bananas" in p["messages"][0]["content"]
        top = [{"token": "Yes", "logprob": -0.1 if yes else -3.0}, {"token": "No", "logprob": -3.0 if yes else -0.1}]
        return {"choices": [{"message": {"content": "Yes" if yes else "No"}, "logprobs": {"content": [{"top_logprobs": top}]}}]}

    calls.clear()
    sc = L.OpenAICompatibleDetectionScorer(base_url="http://x/v1", model="m", transport=fake_transport(calls, judge))
    s = sc.scores("fruit", ["I like bananas", "cats sleep"])
    np.testing.assert_allclose(s, [2.9, -2.9])
    assert calls[0][2]["logprobs"] is True and "Authorization" not in calls[0][1]
    text_only = L.OpenAICompatibleDetectionScorer(base_url="http://x/v1", model="m", transport=fake_transport(
        [], lambda p: {"choices": [{"message": {"content": "no."}}]}))
    assert text_only.scores("fruit", ["a"]).tolist() == [-1.0]


def test_remote_client_needs_configuration(monkeypatch):
    for var in ("PSM_LABEL_BASE_URL", "OPENAI_BASE_URL", "PSM_LABEL_MODEL"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="missing base_url .* and model"):
        L.OpenAICompatibleExplainer()
    monkeypatch.setenv("PSM_LABEL_BASE_URL", "http://env/v1")
    monkeypatch.setenv("PSM_LABEL_MODEL", "env-model")
    c = L.OpenAICompatibleExplainer(transport=lambda *a: {})
    assert c.base_url == "http://env/v1" and c.model == "env-model"
    with pytest.raises(ValueError, match="no message content"):
        c.explain_many([L.explain_examples(records()[0])])


# ------------------------------------------------------------------------------------------ export


def test_saelens_export_with_labels(tmp_path):
    from sae.config import SaeConfig
    from sae.interop import load_saelens

    cfg = SaeConfig(architecture="topk", d_in=16, d_sae=8, k=2)
    rng = np.random.default_rng(0)
    params = {"W_enc": rng.normal(size=(16, 8)).astype(np.float32), "b_enc": np.zeros(8, np.float32),
              "W_dec": rng.normal(size=(8, 16)).astype(np.float32), "b_dec": np.zeros(16, np.float32)}
    recs = records()
    recs[0]["label"], recs[0]["detection"] = "fruit", {"balanced_accuracy": 0.8, "auroc": 0.9, "n_pos": 4, "n_neg": 4}
    out = L.export_sae_with_labels(params, cfg, tmp_path / "sae", recs, hook_name="model.layers.1", model_name="tiny")
    imp = load_saelens(out)
    np.testing.assert_array_equal(imp.params["W_dec"], params["W_dec"])
    labels = L.read_labels(out)
    assert labels[2]["label"] == "fruit" and labels[2]["detection_balanced_accuracy"] == 0.8
    assert labels[5]["label"] is None
    fs = F.FeatureSae.load(out)
    assert fs.layer == 1 and fs.site == "resid_post" and fs.activation == "topk" and fs.k == 2
    with pytest.raises(FileNotFoundError, match="labels.json"):
        L.read_labels(tmp_path)
