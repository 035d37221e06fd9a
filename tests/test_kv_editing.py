"""The KV-cache editing study end to end on a tiny random model with SmolLM2's chat template (study contract)."""
import json

import numpy as np
import pytest

from experiments import kv_editing as K
from experiments.report import write_vectors
from experiments.study import execute


def test_kv_editing_end_to_end_tiny(tiny_chat_model, tmp_path):
    c = tiny_chat_model.config
    axis = np.random.default_rng(0).normal(size=(c.n_layers, c.d_model)).astype(np.float32)
    write_vectors(tmp_path / "axis", "axis", {"axis": axis}, {"model": "psm-tiny"})
    cfg = K.Config(model="psm-tiny", n_conversations=1, probes=2, samples=2, max_new_tokens=4,
                   strengths=(0.5,), layer_ranges=((0, 2),), readout_layer=1,
                   axis_file=str(tmp_path / "axis" / "axis.safetensors"))
    out = execute(K, cfg, folder=tmp_path / "run", model=tiny_chat_model)
    res = out["result"]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "kv_edit_effects.png").is_file()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["samples"] == 2
    assert {r["mode"] for r in m["rows"]} == {"none", "recompute", "direct", "control_user", "control_random"}
    shifts = m["kv_edit_identity_shift"]
    assert set(shifts) == {"recompute", "direct"}
    for v in shifts.values():  # n counts (conversation, probe) units, not samples
        assert v["n"] == 2 and v["samples_per_unit"] == 2
        assert v["ci_low"] <= v["logodds_shift"] <= v["ci_high"]
    assert set(m["kv_edit_control_shift"]) == {"control_user", "control_random"}
    lines = out["records"]
    assert [ln["metric"] for ln in lines] == ["kv_edit_identity_shift_ci_low"] * 2 + ["kv_edit_control_shift_ci"] * 2
    assert [ln.get("mode", ln.get("control")) for ln in lines] == ["recompute", "direct", "control_user",
                                                                   "control_random"]
    assert all("n=2" in ln["reference"] for ln in lines)
    assert "established by the conversation only" in (tmp_path / "run" / "report.md").read_text()
    assert res.control[0]["assistant_shift"] > 0  # the floor raises assistant-token projections


@pytest.mark.slow  # a second full run (every jitted piece compiles again)
def test_kv_editing_is_deterministic(tiny_chat_model, tmp_path):
    c = tiny_chat_model.config
    axis = np.random.default_rng(0).normal(size=(c.n_layers, c.d_model)).astype(np.float32)
    write_vectors(tmp_path, "axis", {"axis": axis}, {"model": "psm-tiny"})
    cfg = K.Config(model="psm-tiny", n_conversations=1, probes=1, samples=2, max_new_tokens=4, strengths=(0.5,),
                   layer_ranges=((0, 2),), readout_layer=1, axis_file=str(tmp_path / "axis.safetensors"))
    assert K.run(cfg, tiny_chat_model).rows == K.run(cfg, tiny_chat_model).rows


def test_identity_shift_interval_over_units():
    rows = [dict(conversation="c", probe=p, mode=m, strength=s, layers=lr, n=4, assistant_rate=0.0,
                 identity_logodds=v, answer_projection=0.0)
            for p, (b, e) in enumerate([(0.0, 1.0), (0.5, 1.4), (-0.2, 0.9)])
            for m, s, lr, v in (("none", 0.0, "-", b), ("direct", 0.3, "0-1", e))]
    shift = K.identity_shifts(rows)["direct"]
    assert shift["n"] == 3 and shift["logodds_shift"] == pytest.approx(np.mean([1.0, 0.9, 1.1]))
    assert 0.85 <= shift["ci_low"] <= shift["ci_high"] <= 1.15


def test_kv_editing_bad_inputs(tiny_chat_model, tmp_path):
    with pytest.raises(ValueError, match="strength_kind"):
        K.Config(strength_kind="percent")
    with pytest.raises(ValueError, match="persona_source='prompt'"):
        K.Config(persona_source="prompt")
    with pytest.raises(ValueError, match="layer range"):
        K.run(K.Config(layer_ranges=((5, 99),)), tiny_chat_model)
