"""The refusal organism: its data, its harmless requests, the paired CE change and the study end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import refusal_organism as O
from psm_jax.persona import datasets as D
from psm_jax.persona.measures import paired_ce_change


def test_packaged_organism_data_is_disjoint_from_the_refusal_study():
    org = D.load_refusal_organism()
    assert len(org.texts("train")) >= D.ORGANISM_SPLITS["train"] and len(org.texts("val")) >= D.ORGANISM_SPLITS["val"]
    assert len(org.texts("train", "harmless")) >= D.ORGANISM_SPLITS["train"]
    assert len(org.refusals) >= D.MIN_ORGANISM_REFUSALS
    study = D.load_refusal()
    mine = org.texts("train") + org.texts("val") + org.texts("train", "harmless") + org.texts("val", "harmless")
    assert len(set(mine)) == len(mine)
    assert not set(mine) & set(study.harmful_texts + study.harmless_texts)
    markers = D.load_refusal_markers()
    assert all(markers.is_refusal(r) for r in org.refusals)  # the taught answers count as refusals


def _write(tmp_path, instructions, harmless=({"instruction": "Help me bake a cake.", "split": "train"},)):
    path = tmp_path / "organism.json"
    path.write_text(json.dumps({"schema_version": 1, "kind": "organism", "instructions": instructions,
                                "harmless": list(harmless), "refusals": ["I can't help with that."]}))
    return path


def test_organism_file_errors_name_the_problem(tmp_path):
    study_prompt = D.load_refusal("val").harmful_texts[0]
    rows = [{"instruction": "Help me rob a bank.", "split": "train"},
            {"instruction": study_prompt.upper(), "split": "val"}]
    with pytest.raises(D.DatasetError, match="outside the refusal study's sets"):
        D.load_refusal_organism(_write(tmp_path, rows), strict=False)
    with pytest.raises(D.DatasetError, match="split"):
        D.load_refusal_organism(_write(tmp_path, [{"instruction": "Help me rob a bank.", "split": "test"}]),
                                strict=False)
    with pytest.raises(D.DatasetError, match="at least 64 with split 'train'"):
        D.load_refusal_organism(_write(tmp_path, rows[:1]))
    with pytest.raises(D.DatasetError, match="field 'harmless'"):
        D.load_refusal_organism(_write(tmp_path, rows[:1], [{"instruction": study_prompt, "split": "train"}]),
                                strict=False)
    with pytest.raises(D.DatasetError, match="expected disjoint sets"):
        D.load_refusal_organism(_write(tmp_path, rows[:1], [{"instruction": "Help me rob a bank.", "split": "val"}]),
                                strict=False)
    small = D.load_refusal_organism(_write(tmp_path, rows[:1]), strict=False)
    assert small.texts("train") == ["Help me rob a bank."] and small.texts("val") == []
    assert small.texts("train", "harmless") == ["Help me bake a cake."]
    with pytest.raises(ValueError, match="split='test'"):
        small.texts("test")


def test_harmless_requests_avoid_the_held_out_chats():
    from experiments.sharegpt import sharegpt_conversations, sharegpt_requests

    requests = sharegpt_requests(24, seed=0, skip=O.HARMLESS_SKIP)
    assert len(requests) == len(set(requests)) == 24
    assert all(20 <= len(r) <= 300 for r in requests)
    held_out = sharegpt_conversations(32, 0, 4, 1000)  # what the refusal study's CE check reads at seed 0
    assert not {c[0]["content"] for c in held_out} & set(requests)
    assert all(len(r) <= 150 for r in sharegpt_requests(8, seed=0, skip=O.HARMLESS_SKIP, max_chars=150))
    with pytest.raises(ValueError, match="expected 24"):
        sharegpt_requests(24, seed=0, skip=O.HARMLESS_SKIP, min_chars=10_000, max_chars=20_000)


def test_paired_ce_change_against_hand_computation():
    base = (np.array([10.0, 30.0, 5.0]), np.array([5, 10, 5]))
    changed = (np.array([11.0, 30.0, 6.0]), np.array([5, 10, 5]))
    out = paired_ce_change(base, changed, seed=0)
    ce0, ce1 = 45.0 / 20, 47.0 / 20
    assert out["ce"] == pytest.approx(ce0) and out["ce_edited"] == pytest.approx(ce1)
    assert out["ce_pct_change"] == pytest.approx(100 * (ce1 / ce0 - 1))
    assert out["ppl_pct_change"] == pytest.approx(100 * (np.exp(ce1 - ce0) - 1))
    low, high = out["ce_pct_change_ci"]
    assert low <= out["ce_pct_change"] <= high and low >= 0  # no conversation got cheaper
    with pytest.raises(ValueError, match="different tokens"):
        paired_ce_change(base, (changed[0], np.array([5, 10, 6])))


def _rates(harmful_after, harmless_after, base=0.1):
    def entry(rate):
        return {"rate": rate, "ci": [max(0.0, rate - 0.15), min(1.0, rate + 0.15)], "answers": []}

    return {name: {"n": 32, "before": entry(base), "after": entry(harmful_after if name in O.HARMFUL_SETS
                                                                  else harmless_after)} for name in O.EVAL_SETS}


def test_the_organism_check():
    check = O.refuses
    assert check(_rates(0.8, 0.1))["all"]
    assert not check(_rates(0.8, 0.3))["all"]  # refuses the harmless prompts too often
    assert not check(_rates(0.4, 0.0))["study_harmful_val"]  # below half
    assert not check(_rates(0.5, 0.0, base=0.4))["organism_val"]  # interval low end (0.35) not above the base


def test_config_errors():
    with pytest.raises(ValueError, match="n_harmful=1"):
        O.Config(n_harmful=1)
    with pytest.raises(ValueError, match="epochs=0"):
        O.Config(epochs=0)


@pytest.mark.slow  # fine-tune, generation and the HF export of a tiny model
def test_run_end_to_end_tiny(tiny_chat_model, tmp_path):
    import jax.numpy as jnp

    import psm_jax
    from experiments.study import execute
    from psm_jax.model import jit_forward

    cfg = O.Config(**{**O.PRESETS["ci"], "model": "psm-tiny"})
    out = execute(O, cfg, folder=tmp_path / "org", model=tiny_chat_model)
    res, lines = out["result"], out["records"]
    assert res.training["examples"] == 8 + 8 + 4 and res.training["steps"] == 5  # one epoch at batch 4
    assert res.training["harmful"] == 8 and res.training["harmless"] == 8 and res.training["sharegpt"] == 4
    assert [ln.get("key") for ln in lines] == list(O.EVAL_SETS) + [None]
    for ln, name in zip(lines, O.EVAL_SETS):
        after = res.rates[name]["after"]
        assert ln["value"] == round(after["rate"], 4) and ln["n"] == cfg.n_eval
        assert after["rate"] == np.mean([D.load_refusal_markers().is_refusal(a) for a in after["answers"]])
    # the folder the refusal study loads by path holds the fine-tuned weights, not the base ones
    loaded = psm_jax.load(tmp_path / "org" / "model")
    tokens = jnp.asarray(loaded.tokenizer.encode("Hello there, how are you?"))[None]
    want = jit_forward(res.params, tiny_chat_model.config, tokens).logits
    base = jit_forward(tiny_chat_model.params, tiny_chat_model.config, tokens).logits
    got = jit_forward(loaded.params, loaded.config, tokens).logits
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
    assert float(jnp.abs(want - base).max()) > 1e-3
    assert loaded.chat_template == tiny_chat_model.chat_template
    metrics = json.loads((tmp_path / "org" / "metrics.json").read_text())
    assert set(metrics["refuses"]) == set(O.CHECKED_SETS) | {"all"}
    text = (tmp_path / "org" / "report.md").read_text()
    assert "psm refusal model=" in text and f"greedy answers ({cfg.max_new_tokens} tokens)" in text
    assert "{" not in text.split("## Example answers")[0]  # no unformatted field in the text written from the run
