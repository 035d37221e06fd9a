"""The KV-cache editing experiment end to end on a tiny random model with SmolLM2's chat template."""
import json

import numpy as np
import pytest

from experiments import kv_editing as K


def test_kv_editing_end_to_end_tiny(tiny_chat_model, tmp_path):
    c = tiny_chat_model.config
    axis = np.random.default_rng(0).normal(size=(c.n_layers, c.d_model)).astype(np.float32)
    from experiments.report import Report

    Report(tmp_path / "axis", "axis").save_vectors("axis", {"axis": axis}, {"model": "psm-tiny"})
    cfg = K.KVEditConfig(model="psm-tiny", n_conversations=1, probes=1, samples=2, max_new_tokens=4,
                         strengths=(-0.5, 0.5), layer_ranges=((0, 2),), readout_layer=1,
                         axis_file=str(tmp_path / "axis" / "axis.safetensors"), out=str(tmp_path / "run"))
    res = K.run(cfg, model=tiny_chat_model)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "kv_edit_effects.png").is_file()
    modes = {r["mode"] for r in m["rows"]}
    assert modes == {"none", "recompute", "direct"}
    assert set(m["kv_edit_identity_shift"]) == {"recompute", "direct"}
    ctrl = res["control"][0]
    assert ctrl["assistant_shift"] > 0  # the floor raises assistant-token projections
    # same config and seed -> same numbers
    res2 = K.run(cfg.__class__(**{**cfg.__dict__, "out": str(tmp_path / "run2")}), model=tiny_chat_model)
    assert res2["aggregate"] == res["aggregate"]


def test_kv_editing_bad_inputs(tiny_chat_model, tmp_path):
    with pytest.raises(ValueError, match="strength_kind"):
        K.KVEditConfig(strength_kind="percent")
    with pytest.raises(ValueError, match="layer range"):
        K.run(K.KVEditConfig(layer_ranges=((5, 99),), out=str(tmp_path)), model=tiny_chat_model)
