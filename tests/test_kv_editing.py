"""The KV-cache editing study end to end on a tiny random model with SmolLM2's chat template (study contract)."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import kv_editing as K
from experiments.kv_editing import padding
from experiments.kv_editing import pipeline as KP
from experiments.kv_editing import report_text as KR
from experiments.kv_editing.runner import Runner
from experiments.report import write_vectors
from experiments.study import execute
from psm_jax.persona import kv_identity as KI


@pytest.mark.slow  # the whole study twice over histories, strengths and modes
def test_kv_editing_end_to_end_tiny(tiny_chat_model, tmp_path):
    c = tiny_chat_model.config
    axis = np.random.default_rng(0).normal(size=(c.n_layers, c.d_model)).astype(np.float32)
    write_vectors(tmp_path / "axis", "axis", {"axis": axis}, {"model": "psm-tiny"})
    cfg = K.Config(model="psm-tiny", n_conversations=1, probes=2, samples=2, max_new_tokens=4,
                   strengths=(0.5,), layer_ranges=((0, 2),), readout_layer=1, strength_kind="both",
                   histories=("scripted", "generated"), history_tokens=3,
                   axis_file=str(tmp_path / "axis" / "axis.safetensors"))
    out = execute(K, cfg, folder=tmp_path / "run", model=tiny_chat_model)
    res = out["result"]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    report = (tmp_path / "run" / "report.md").read_text()
    assert (tmp_path / "run" / "kv_edit_effects.png").is_file()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["samples"] == 2
    assert {r["mode"] for r in m["rows"]} == {"none", "recompute", "direct", "control_user", "control_random",
                                             KI.MATCHED}
    assert {r["history"] for r in m["rows"]} == {"scripted", "generated"}
    assert {(r["mode"], r["kind"]) for r in m["rows"] if r["mode"] == "direct"} == {("direct", "norm"),
                                                                                   ("direct", "scale")}
    # the generated history holds the model's own turns, not the scripted replies
    (turns,) = res.histories.values()
    assert turns and all(isinstance(t, str) for t in turns)
    shifts = m["kv_edit_identity_shift"]
    assert set(shifts) == {"recompute/norm", "recompute/scale", "direct/norm", "direct/scale"}
    for v in shifts.values():  # n counts (conversation, probe) units: not samples, not histories
        assert v["n"] == 2 and v["samples_per_unit"] == 2
        assert v["ci_low"] <= v["logodds_shift"] <= v["ci_high"]
    controls = m["kv_edit_control_shift"]
    assert set(controls) == {"control_user/norm", "control_user/scale", "control_random/norm", "control_random/scale"}
    rnd = controls["control_random/norm"]
    assert rnd["n_directions"] == cfg.n_random and rnd["band_low"] <= rnd["band_high"]
    assert isinstance(rnd["axis_outside_band"], bool)
    band_rows = [r for r in m["rows"] if r["mode"] == "control_random"]
    assert all(len(r["band_logodds"]) == cfg.n_random and len(set(r["band_logodds"])) > 1 for r in band_rows)
    lines = out["records"]
    user_lines = ["kv_edit_control_shift_ci"] + ["kv_edit_assistant_minus_user_shift"] * 2
    assert [ln["metric"] for ln in lines] == (["kv_edit_identity_validity"] + ["kv_edit_identity_shift_ci_low"] * 4
                                              + user_lines * 2 + ["kv_edit_control_shift_ci"] * 2)
    assert [ln["key"] for ln in lines[1:] if ln["metric"] != "kv_edit_assistant_minus_user_shift"] == \
        list(shifts) + list(controls)
    validity = m["identity_validity"]
    assert lines[0]["valid"] == validity["valid"] and lines[0]["n"] == 2 and lines[0]["key"] == "roleplay"
    assert all(ln["measure_valid"] == validity["valid"] for ln in lines if ln["metric"].endswith("shift_ci_low"))
    assert "Validity of the identity measure" in report and len(m["reference"]) == 2
    user = controls["control_user/norm"]
    pairs = user["assistant_minus_user"]
    assert pairs["all_tokens"]["estimate"] == pytest.approx(shifts["direct/norm"]["logodds_shift"]
                                                            - user["logodds_shift"])
    matched = [r for r in m["rows"] if r["mode"] == KI.MATCHED and r["kind"] == "norm"]
    assert len(matched) == 2 * 2  # (scripted, generated) x 2 probes
    assert user["assistant_tokens"] > user["user_tokens"] > 0
    assert all("n=2" in ln["reference"] for ln in lines)
    assert "established by the conversation only" in report and "## Targets" in report
    assert "By history kind" in report and "| scripted | control_random |" in report
    assert res.control[0]["assistant_shift"] > 0  # the floor raises assistant-token projections


@pytest.mark.slow  # 20 directions, each also as its own direct edit
def test_band_matches_single_direct_edits(tiny_chat_model):
    """The mapped random-direction band gives the same log-odds as one direct edit per direction."""
    from psm_jax import edits as E
    from psm_jax.chat import Role
    from psm_jax.generate import prefill
    from psm_jax.kvcache import edit_cache_direct
    from psm_jax.model import Capture
    from psm_jax.persona import datasets

    m, c = tiny_chat_model, tiny_chat_model.config
    conv = datasets.load_conversations("roleplay")[0]
    hist, probe = K.history_and_probe(m, conv.as_dicts()[1:], "Who are you?")
    n, size = len(hist), len(hist) + K.PROBE_ROOM + K.ANSWER_ROOM
    base = prefill(m.params, c, jnp.asarray(hist.tokens[None]), cache_size=size, capture=Capture(sites=("resid_pre",)))
    resid = jnp.pad(base.captured["resid_pre"], ((0, 0), (0, 0), (0, size - n), (0, 0)))
    asst = np.zeros((1, size), bool)
    asst[0, :n] = hist.roles == Role.ASSISTANT
    dirs = np.asarray(np.random.default_rng(0).normal(size=(3, c.n_layers, c.d_model)), np.float32)
    edit = E.add(c, dirs[0], layers=[0, 1], coef=2.0, site="resid_pre", positions=asst, extend=False)
    a, b = (jnp.asarray(K.answer_ids(m, t)[None]) for t in (K.ASSISTANT_ANSWER, "I am a pirate."))
    p = jnp.asarray(probe[None])
    band = np.asarray(KI.identity_logodds_band(m.params, c, base.cache, resid, p, a, b, edit, jnp.asarray(dirs)))
    for i in range(3):
        cache = edit_cache_direct(m.params, c, base.cache, resid, edit.replace(vector=jnp.asarray(dirs[i])))
        np.testing.assert_allclose(band[i], KI.identity_logodds(m.params, c, cache, p, a, b), atol=1e-4)
    assert abs(band[0, 0] - band[1, 0]) > 1e-6  # the directions differ, and so do their effects


@pytest.mark.slow  # a second full run (every jitted piece compiles again)
def test_kv_editing_is_deterministic(tiny_chat_model, tmp_path):
    c = tiny_chat_model.config
    axis = np.random.default_rng(0).normal(size=(c.n_layers, c.d_model)).astype(np.float32)
    write_vectors(tmp_path, "axis", {"axis": axis}, {"model": "psm-tiny"})
    cfg = K.Config(model="psm-tiny", n_conversations=1, probes=1, samples=2, max_new_tokens=4, strengths=(0.5,),
                   layer_ranges=((0, 2),), readout_layer=1, axis_file=str(tmp_path / "axis.safetensors"))
    first, second = (json.dumps(K.run(cfg, tiny_chat_model).rows, sort_keys=True) for _ in range(2))
    assert first == second  # as JSON: a control row's unsampled rates are NaN, which == never matches


def test_user_token_control_paired_with_the_assistant_edits():
    """The user-token control carries its paired differences from the same edit on every assistant token and on as
    many assistant tokens as there are user tokens, per unit."""
    units = [(0.0, 1.0, 0.2, 0.3), (0.5, 1.4, 0.5, 0.6), (-0.2, 0.9, 0.0, 0.3)]  # unedited, all, matched, user
    rows = [dict(conversation="c", history="scripted", probe=p, mode=m, kind="norm", strength=s, layers=lr, n=4,
                 assistant_rate=0.0, identity_logodds=v, answer_projection=0.0, assistant_tokens=40, user_tokens=12)
            for p, (b, a, t, u) in enumerate(units)
            for m, s, lr, v in (("none", 0.0, "-", b), ("direct", 0.3, "0-1", a), (KI.MATCHED, 0.3, "0-1", t),
                                ("control_user", 0.3, "0-1", u))]
    user = KI.control_shifts(rows)["control_user/norm"]
    assert user["logodds_shift"] == pytest.approx(np.mean([0.3, 0.1, 0.5]))
    pairs = user["assistant_minus_user"]
    assert pairs["all_tokens"]["estimate"] == pytest.approx(np.mean([0.7, 0.8, 0.6]))
    assert pairs["all_tokens"]["low"] > 0.55
    assert pairs["matched_tokens"]["estimate"] == pytest.approx(np.mean([-0.1, -0.1, -0.3]))
    assert pairs["matched_tokens"]["high"] < 0
    assert (user["assistant_tokens"], user["user_tokens"]) == (40, 12)
    assert "assistant turns are not shown to carry more" in KR.target_text({}, {"control_user/norm": user})
    cfg = K.Config(n_conversations=1, probes=3, samples=4, strengths=(0.3,), layer_ranges=((0, 2),))
    result = K.Result(config=cfg, rows=rows, control=[], samples=[], seconds=0.0)
    lines = [ln for ln in K.records(result) if ln["metric"] == "kv_edit_assistant_minus_user_shift"]
    assert [ln["key"] for ln in lines] == ["all_tokens/norm", "matched_tokens/norm"]
    assert lines[1]["value"] == pytest.approx(pairs["matched_tokens"]["estimate"], abs=1e-4) and lines[1]["n"] == 3
    assert "assistant 40.0, user 12.0" in lines[0]["reference"]
    assert lines[1]["ci"] == [pairs["matched_tokens"]["low"], pairs["matched_tokens"]["high"]]
    control, = [ln for ln in K.records(result) if ln["metric"] == "kv_edit_control_shift_ci"]
    assert control["ci"] == [user["ci_low"], user["ci_high"]] and control["null"].startswith("0: a control edit")


def test_kv_editing_bad_inputs(tiny_chat_model, tmp_path):
    with pytest.raises(ValueError, match="strength_kind"):
        K.Config(strength_kind="percent")
    with pytest.raises(ValueError, match="histories=\\('typed',\\)"):
        K.Config(histories=("typed",))
    with pytest.raises(ValueError, match="persona_source='prompt'"):
        K.Config(persona_source="prompt")
    with pytest.raises(ValueError, match="n_random=3; expected >= 20"):
        K.Config(n_random=3)
    with pytest.raises(ValueError, match="layer range"):
        K.run(K.Config(layer_ranges=((5, 99),)), tiny_chat_model)


def test_buckets_and_pads():
    assert [K.bucket(n) for n in (1, 16, 17, 24, 25, 33, 49, 65, 97, 129, 325, 388)] == \
        [16, 16, 24, 24, 32, 48, 64, 96, 128, 192, 384, 512]
    toks, mask = K.left_pad(np.array([5, 6, 7]), 5, 0)
    assert toks.tolist() == [0, 0, 5, 6, 7] and mask.tolist() == [False, False, True, True, True]
    toks, mask = K.right_pad(np.array([5, 6]), 4, 1)
    assert toks.tolist() == [5, 6, 1, 1] and mask.tolist() == [True, True, False, False]


@pytest.mark.slow  # 15-20 s of compiles; CI runs it in the bounded slow step
def test_padded_cache_and_logodds_equal_the_unpadded_ones(tiny_chat_model):
    """A left-padded history, left-padded probe and right-padded answers give the unpadded identity log-odds, also
    after a recompute edit and a direct edit on the assistant positions (masked slots are never attended to)."""
    from psm_jax import edits as E
    from psm_jax.chat import Role
    from psm_jax.generate import prefill
    from psm_jax.kvcache import edit_cache_direct
    from psm_jax.model import Capture
    from psm_jax.persona import datasets

    m, c = tiny_chat_model, tiny_chat_model.config
    conv = datasets.load_conversations("roleplay")[1]
    hist, probe = K.history_and_probe(m, conv.as_dicts()[1:], "Who are you?")
    answers = [K.answer_ids(m, t) for t in (K.ASSISTANT_ANSWER, "I am a dragon.")]
    u = np.random.default_rng(1).normal(size=(c.n_layers, c.d_model)).astype(np.float32)

    def logodds(n_pad, p_pad, a_pads, mode):
        size = n_pad + K.PROBE_ROOM + K.ANSWER_ROOM
        toks, mask = K.left_pad(hist.tokens, n_pad, 0)
        asst = np.zeros((1, size), bool)
        asst[0, n_pad - len(hist):n_pad] = hist.roles == Role.ASSISTANT
        edit = E.add(c, u, layers=[0, 1], coef=3.0, site="resid_pre", positions=asst, extend=False)
        base = prefill(m.params, c, jnp.asarray(toks[None]), jnp.asarray(mask[None]), cache_size=size,
                       edits=(edit,) if mode == "recompute" else (), capture=Capture(sites=("resid_pre",)))
        cache = base.cache
        if mode == "direct":
            resid = jnp.pad(base.captured["resid_pre"], ((0, 0), (0, 0), (0, size - n_pad), (0, 0)))
            cache = edit_cache_direct(m.params, c, cache, resid, edit)
        pt, pm = K.left_pad(probe, p_pad, 0)
        (at, am), (bt, bm) = (K.right_pad(a, n, 0) for a, n in zip(answers, a_pads))
        return float(KI.identity_logodds(m.params, c, cache, *(jnp.asarray(x[None]) for x in (pt, at, bt)),
                                         masks=tuple(jnp.asarray(x[None]) for x in (pm, am, bm)))[0])

    exact = [len(hist), len(probe), [len(a) for a in answers]]
    padded = [K.bucket(len(hist)) + 7, K.bucket(len(probe)) + 3, [K.bucket(len(a)) for a in answers]]
    assert padded[0] > exact[0] and padded[1] > exact[1]
    for mode in ("none", "recompute", "direct"):
        want, got = logodds(*exact, mode), logodds(*padded, mode)
        assert got == pytest.approx(want, abs=2e-5), mode
    assert logodds(*exact, "direct") != pytest.approx(logodds(*exact, "none"), abs=1e-3)  # the edit does something


@pytest.mark.slow  # the study twice, padded and unpadded
def test_padded_run_equals_unpadded_with_fewer_compiles(tiny_chat_model, tmp_path, monkeypatch):
    """The whole study with bucketed shapes gives the unpadded numbers; two histories of one bucket share each
    compiled function, where the unpadded path compiles once per history length.

    The scored numbers (log-odds) agree to rounding. The answer projections come from sampled answers, and the two
    shapes round the logits differently: on the tiny random model's near-flat distributions a draw can land on the
    other side of a token's probability boundary (seen on an AVX2 CPU), so one row in eight may differ; the rest
    agree to rounding."""
    c = tiny_chat_model.config
    axis = np.random.default_rng(0).normal(size=(c.n_layers, c.d_model)).astype(np.float32)
    write_vectors(tmp_path, "axis", {"axis": axis}, {"model": "psm-tiny"})
    cfg = K.Config(model="psm-tiny", conversations=("dragon", "ghost"), probes=2, samples=2, max_new_tokens=4,
                   strengths=(0.5,), layer_ranges=((0, 2),), readout_layer=1, histories=("scripted",), n_random=20,
                   axis_file=str(tmp_path / "axis.safetensors"))
    made = []

    class Spy(Runner):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(KP, "Runner", Spy)
    padded = K.run(cfg, tiny_chat_model).rows
    monkeypatch.setattr(padding, "bucket", lambda n: n)
    exact = K.run(cfg, tiny_chat_model).rows
    assert len(padded) == len(exact) > 0
    sampled, differ = 0, []
    for p, e in zip(padded, exact):
        assert (p["conversation"], p["probe"], p["mode"], p["kind"]) == (e["conversation"], e["probe"], e["mode"],
                                                                         e["kind"])
        assert p["identity_logodds"] == pytest.approx(e["identity_logodds"], abs=2e-5)
        if p["mode"] == "control_random":
            np.testing.assert_allclose(p["band_logodds"], e["band_logodds"], atol=2e-5)
        else:
            sampled += 1
            if p["answer_projection"] != pytest.approx(e["answer_projection"], abs=1e-3):
                differ.append((p["conversation"], p["probe"], p["mode"], p["kind"]))
    assert len(differ) <= sampled // 8, f"{len(differ)} of {sampled} sampled rows differ: {differ}"
    for name in ("decode", "extend", "direct"):
        assert getattr(made[0], name)._cache_size() == 1 < getattr(made[1], name)._cache_size(), name


def test_open_role_conversations_draw_roles_and_questions():
    from psm_jax.persona import datasets
    from psm_jax.persona.prompts import open_role_conversations, select_roles

    roles, questions = datasets.load_roles(), datasets.load_role_questions()
    convs = open_role_conversations(roles, questions, 12, 4, seed=3)
    assert [cv.id for cv in convs] == [r.name for r in select_roles(roles, 12, 3)]
    assert convs == open_role_conversations(roles, questions, 12, 4, seed=3)  # seeded
    by_name = {r.name: r for r in roles}
    for cv in convs:
        assert cv.role == cv.id and cv.system == by_name[cv.id].instructions[0]
        users = [m.content for m in cv.messages[1:]]
        assert [m.role for m in cv.messages[1:]] == ["user"] * 4 and len(set(users)) == 4
        assert set(users) <= set(questions)
    assert len({tuple(m.content for m in cv.messages[1:]) for cv in convs}) > 1  # drawn per role, not one list
    named = open_role_conversations(roles, questions, None, 2, seed=0, names=("dragon", "librarian"))
    assert [cv.id for cv in named] == ["dragon", "librarian"]
    with pytest.raises(ValueError, match=r"unknown role names \['assistant'\]"):
        open_role_conversations(roles, questions, None, 2, seed=0, names=("assistant",))
    with pytest.raises(ValueError, match="turns=0; expected 1.."):
        open_role_conversations(roles, questions, 2, 0, seed=0)


def test_kv_editing_on_open_role_conversations(tiny_chat_model):
    """Open role conversations run end to end with generated histories: one unit per (role, probe), the capping
    control on the generated turns; scripted histories are refused for them."""
    with pytest.raises(ValueError, match="histories=\\('scripted', 'generated'\\) with conversation_set='roles'"):
        K.Config(conversation_set="roles")
    with pytest.raises(ValueError, match="conversation_set='chats'"):
        K.Config(conversation_set="chats")
    cfg = K.Config(model="psm-tiny", conversation_set="roles", conversations=("dragon", "librarian"), role_turns=2,
                   probes=1, samples=2, max_new_tokens=2, strengths=(0.5,), layer_ranges=((0, 2),), readout_layer=1,
                   histories=("generated",), history_tokens=3, controls=False, axis_roles=2, axis_questions=1)
    res = K.run(cfg, tiny_chat_model)
    assert {r["conversation"] for r in res.rows} == {"dragon", "librarian"}
    assert {r["history"] for r in res.rows} == {"generated"}
    assert set(res.histories) == {"dragon/generated", "librarian/generated"}
    assert all(len(turns) == 2 for turns in res.histories.values())
    assert [r["conversation"] for r in res.control] == ["dragon", "librarian"]
    assert all(r["assistant_tokens"] > 0 and r["user_tokens"] > 0 for r in res.control)
    # the validity reference: the same user turns answered as the default Assistant, one row per (role, probe)
    assert [(r["conversation"], r["probe"]) for r in res.reference] == [(c, res.rows[0]["probe"])
                                                                         for c in ("dragon", "librarian")]
    assert set(res.reference_histories) == {"dragon", "librarian"}
    assert res.reference_histories["dragon"] != res.histories["dragon/generated"]
    v = KI.identity_validity(res.rows, res.reference)
    base = {r["conversation"]: r["identity_logodds"] for r in res.rows if r["mode"] == "none"}
    want = np.mean([r["identity_logodds"] - base[r["conversation"]] for r in res.reference])
    assert v["n"] == 2 and v["effect"] == pytest.approx(want)


def test_identity_validity_on_planted_rows():
    """Paired over (conversation, probe) units, the persona side averaged over its history kinds; valid only when
    the interval lies above 0; no reference, no check."""
    rows, reference = [], []
    rng = np.random.default_rng(0)
    for c in range(6):
        for p in ("Who are you?", "What are you?"):
            persona = rng.normal()
            rows += [dict(conversation=f"c{c}", probe=p, history=h, mode="none", identity_logodds=persona + d)
                     for h, d in (("scripted", -0.1), ("generated", 0.1))]
            rows.append(dict(conversation=f"c{c}", probe=p, history="scripted", mode="direct", identity_logodds=9.0))
            reference.append(dict(conversation=f"c{c}", probe=p, identity_logodds=persona + 1.0 + 0.05 * rng.normal()))
    v = KI.identity_validity(rows, reference, seed=0)
    assert v["n"] == 12 and v["effect"] == pytest.approx(1.0, abs=0.05) and v["valid"]
    flat = [dict(r, identity_logodds=r["identity_logodds"] - 1.0) for r in reference]
    assert not KI.identity_validity(rows, flat, seed=0)["valid"]
    assert KI.identity_validity(rows, [], seed=0) is None
    assert "NOT valid" in KR.validity_text(KI.identity_validity(rows, flat, seed=0))
