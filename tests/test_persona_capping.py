"""Activation capping in the method library (`psm_jax.persona.capping`): percentile thresholds, the floor and
ceiling forms of the cap, assistant-only positions and token projections, checked on a tiny model against its
own residual stream computed without the edit."""
import numpy as np
import pytest

from psm_jax.chat import Role, encode_chat
from psm_jax.persona import capping
from psm_jax.persona.rollouts import conversation_nll

CONV = [{"role": "system", "content": "You are a ghost in an old house."},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I walk these halls at night and remember the candles."},
        {"role": "user", "content": "Are you sad?"},
        {"role": "assistant", "content": "Only when the wind is quiet."}]


def _resid(m, conv, edits=()):
    from psm_jax.model import Capture, forward

    enc = encode_chat(m.tokenizer, conv, chat_template=m.chat_template)
    out = forward(m.params, m.config, enc.tokens[None], edits=tuple(edits), capture=Capture(sites=("resid_post",)))
    return enc, np.asarray(out.captured["resid_post"])[:, 0], np.asarray(out.logits)[0]


def _axis(m, seed=0):
    return np.random.default_rng(seed).normal(size=(m.config.n_layers, m.config.d_model))


# ------------------------------------------------------------------ thresholds and the layer range

def test_percentile_thresholds_and_errors():
    rng = np.random.default_rng(0)
    vals = [rng.normal(size=101), rng.normal(loc=3, size=57)]
    tau = capping.percentile_thresholds(vals, 25)
    np.testing.assert_allclose(tau, [np.percentile(v, 25) for v in vals], rtol=1e-5)
    # the ceiling form's thresholds on -axis are the negated floors
    np.testing.assert_allclose(capping.percentile_thresholds([-v for v in vals], 75), -tau, rtol=1e-5)
    np.testing.assert_allclose(capping.form_thresholds(vals, 25, "ceiling"), -tau, rtol=1e-5)
    for bad in (0, 100, -5, 150, float("nan"), "a lot"):
        with pytest.raises(ValueError, match=r"strictly between 0 and 100"):
            capping.percentile_thresholds(vals, bad)
    with pytest.raises(ValueError, match="no token projections"):
        capping.percentile_thresholds([np.zeros(0)], 25)


def test_default_layer_range():
    assert capping.default_layer_range(30) == tuple(range(18, 26))
    assert capping.default_layer_range(4) == (2,)


# ------------------------------------------------------------------ the edit on a tiny model

def test_floor_raises_projections_below_tau_to_tau_and_leaves_others(tiny_chat_4layers):
    m = tiny_chat_4layers
    axis = _axis(m)
    layer = 2
    u = axis[layer] / np.linalg.norm(axis[layer])
    enc, h0, _ = _resid(m, CONV)
    p0 = h0[layer] @ u
    tau = float(np.median(p0))
    edit = capping.capping_edit(m.config, axis, [layer], [tau], form="floor")
    _, h1, _ = _resid(m, CONV, [edit])
    p1 = h1[layer] @ u
    below = p0 < tau
    assert 0 < below.sum() < len(p0)
    np.testing.assert_allclose(p1[below], tau, atol=1e-4)
    np.testing.assert_allclose(h1[layer][~below], h0[layer][~below], atol=1e-5)
    # only the component along u changes
    d = h1[layer] - h0[layer]
    np.testing.assert_allclose(d - np.outer(d @ u, u), 0, atol=1e-4)
    # earlier layers untouched
    np.testing.assert_allclose(h1[:layer], h0[:layer], atol=1e-6)


def test_floor_and_ceiling_forms_agree(tiny_chat_4layers):
    m = tiny_chat_4layers
    axis = _axis(m, 1)
    layers = [1, 2, 3]
    enc, h0, _ = _resid(m, CONV)
    units = axis / np.linalg.norm(axis, axis=-1, keepdims=True)
    tau = np.asarray([np.percentile(h0[l] @ units[l], 40) for l in layers])
    _, hf, lf = _resid(m, CONV, [capping.capping_edit(m.config, axis, layers, tau, form="floor")])
    _, hc, lc = _resid(m, CONV, [capping.capping_edit(m.config, axis, layers, -tau, form="ceiling")])
    np.testing.assert_allclose(hf, hc, atol=1e-4)
    np.testing.assert_allclose(lf, lc, atol=1e-3)
    assert not np.allclose(lf, _resid(m, CONV)[2], atol=1e-3)  # capping did something
    for i, l in enumerate(layers):
        assert (hf[l] @ units[l] >= tau[i] - 1e-4).all()
    with pytest.raises(ValueError, match="one per capped layer"):
        capping.capping_edit(m.config, axis, layers, tau[:2])
    with pytest.raises(ValueError, match="axis has shape"):
        capping.capping_edit(m.config, axis[:2], layers, tau)


def test_assistant_only_capping_leaves_user_tokens_unchanged(tiny_chat_4layers):
    from psm_jax.persona.rollouts import encode_batch

    m = tiny_chat_4layers
    axis = _axis(m, 2)
    enc, h0, _ = _resid(m, CONV)
    units = axis / np.linalg.norm(axis, axis=-1, keepdims=True)
    layer = 2
    tau = float(np.percentile(h0[layer] @ units[layer], 75))  # high floor: most tokens would move
    edit = capping.capping_edit(m.config, axis, [layer], [tau])
    _, batch = encode_batch(m, [CONV], add_generation_prompt=False, multiple_of=1)
    (e,) = capping.make_edits_fn(edit, "assistant")(batch)
    assert e.extend  # generated tokens are capped too
    _, h1, _ = _resid(m, CONV, [e])
    asst = enc.roles == Role.ASSISTANT
    # at the capped layer nothing but assistant tokens moves
    np.testing.assert_allclose(h1[layer][~asst], h0[layer][~asst], atol=1e-5)
    assert (h1[layer][asst] @ units[layer] >= tau - 1e-4).all()
    assert not np.allclose(h1[layer][asst], h0[layer][asst], atol=1e-3)
    # "all" positions moves the user tokens as well
    (e_all,) = capping.make_edits_fn(edit, "all")(batch)
    _, h2, _ = _resid(m, CONV, [e_all])
    user = enc.roles == Role.USER
    assert not np.allclose(h2[layer][user], h0[layer][user], atol=1e-3)
    # over a layer range, user tokens before the first assistant token are unchanged at every layer
    rng_edit = capping.capping_edit(m.config, axis, [1, 2, 3], [tau] * 3)
    (e3,) = capping.make_edits_fn(rng_edit, "assistant")(batch)
    _, h3, _ = _resid(m, CONV, [e3])
    first = np.flatnonzero(asst)[0]
    early_user = user & (np.arange(len(enc.tokens)) < first)
    np.testing.assert_allclose(h3[:, early_user], h0[:, early_user], atol=1e-5)
    assert capping.make_edits_fn(None, "all") is None


def test_token_projections_and_assistant_nll(tiny_chat_4layers):
    from psm_jax.persona.rollouts import score_answers

    m = tiny_chat_4layers
    axis = _axis(m, 3)
    enc, h0, _ = _resid(m, CONV)
    vals = capping.token_projections(m, [CONV], axis, [1, 3], batch_size=2)
    last = (enc.roles == Role.ASSISTANT) & (enc.turns == 4)
    for i, l in enumerate([1, 3]):
        u = axis[l] / np.linalg.norm(axis[l])
        np.testing.assert_allclose(vals[i], h0[l][last] @ u, atol=1e-4)
    single = CONV[:3]
    nll, cnt = conversation_nll(m, [single, CONV], batch_size=2)
    lp = score_answers(m, [single[:2]], [single[2]["content"]], batch_size=1)
    np.testing.assert_allclose(nll[0], -lp[0], rtol=1e-4)
    assert cnt[1] == (enc.roles == Role.ASSISTANT).sum()
    # capping changes the NLL
    edit = capping.capping_edit(m.config, axis, [1, 2], [5.0, 5.0])
    nll_c, _ = conversation_nll(m, [single, CONV], batch_size=2, edits_fn=capping.make_edits_fn(edit, "all"))
    assert not np.allclose(nll_c, nll)


def test_random_caps_are_thresholded_at_the_same_percentile_of_their_own_projections(tiny_chat_4layers):
    """The matched-threshold control: each random cap's floor at a capped layer is the same percentile of the
    threshold tokens' projections onto that cap's own unit direction (numpy, from the unedited residual stream);
    the directions differ between caps and are seeded."""
    m = tiny_chat_4layers
    layers = [1, 3]
    caps = capping.random_cap_edits(m, layers, [CONV], 30.0, 3, seed=5)
    again = capping.random_cap_edits(m, layers, [CONV], 30.0, 3, seed=5)
    assert len(caps) == 3 and capping.random_cap_edits(m, layers, [CONV], 30.0, 0, seed=5) == []
    enc, h0, _ = _resid(m, CONV)
    last = (enc.roles == Role.ASSISTANT) & (enc.turns == 4)
    for cap, same in zip(caps, again):
        u = np.asarray(cap.direction)
        np.testing.assert_array_equal(u, np.asarray(same.direction))
        for l in layers:
            np.testing.assert_allclose(np.linalg.norm(u[l]), 1.0, rtol=1e-5)
            want = np.percentile(h0[l][last] @ u[l], 30)
            np.testing.assert_allclose(np.asarray(cap.floor)[l], want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(caps[0].direction)[1], np.asarray(caps[1].direction)[1])
