"""psm_jax.persona.kv_identity: the identity measure on a KV cache against full forwards computed here, and the row
statistics against hand-computed means, intervals and bands."""
import jax.numpy as jnp
import numpy as np
import pytest

from psm_jax.persona import kv_identity as KI

HISTORY = np.array([1, 17, 300, 42, 9, 1200, 77, 5, 640, 33, 2024], np.int32)
PROBE = np.array([88, 410, 7, 1500, 60], np.int32)
ASSISTANT = np.array([120, 9, 4000, 31], np.int32)
PERSONA = np.array([250, 11, 990, 31, 600, 8], np.int32)


def _cache(model, room: int):
    from psm_jax.generate import prefill

    return prefill(model.params, model.config, jnp.asarray(HISTORY[None]),
                   cache_size=len(HISTORY) + room).cache


def _full_logprobs(model, answer: np.ndarray) -> np.ndarray:
    """log p of each answer token from one forward over history + probe + answer with no cache (float64
    log-softmax here)."""
    from psm_jax.model import forward

    tokens = np.concatenate([HISTORY, PROBE, answer])[None]
    logits = np.asarray(forward(model.params, model.config, jnp.asarray(tokens)).logits[0], np.float64)
    start = len(HISTORY) + len(PROBE) - 1
    rows = logits[start:start + len(answer)]
    logz = rows.max(-1) + np.log(np.exp(rows - rows.max(-1, keepdims=True)).sum(-1))
    return rows[np.arange(len(answer)), answer] - logz


def test_identity_logodds_equals_full_forward_logprobs(tiny_chat_model):
    """After a prefilled history, the per-token log-odds equals mean log p(assistant) - mean log p(persona) from full
    forwards over history + probe + answer, each answer averaged over its own length."""
    m = tiny_chat_model
    cache = _cache(m, len(PROBE) + len(PERSONA))
    want_a, want_b = (_full_logprobs(m, a).mean() for a in (ASSISTANT, PERSONA))
    got_a = KI.per_token_logprob(m.params, m.config, cache, jnp.asarray(PROBE[None]), jnp.asarray(ASSISTANT[None]))
    assert float(got_a[0]) == pytest.approx(want_a, abs=1e-4)
    got = KI.identity_logodds(m.params, m.config, cache, *(jnp.asarray(x[None]) for x in (PROBE, ASSISTANT, PERSONA)))
    assert got.shape == (1,) and float(got[0]) == pytest.approx(want_a - want_b, abs=1e-4)
    # the length match matters: the summed log-likelihoods would give a different number
    assert abs((_full_logprobs(m, ASSISTANT).sum() - _full_logprobs(m, PERSONA).sum()) - float(got[0])) > 1e-2


def test_padded_probe_and_answer_give_the_unpadded_logprob(tiny_chat_model):
    """A left-padded probe and a right-padded answer (masks false on the pads) read the real tokens only: the same
    mean as the full forward over the unpadded tokens."""
    m = tiny_chat_model
    cache = _cache(m, 3 + len(PROBE) + len(ASSISTANT) + 5)
    probe = np.concatenate([np.full(3, 2, np.int32), PROBE])
    probe_mask = np.arange(len(probe)) >= 3
    answer = np.concatenate([ASSISTANT, np.full(5, 2, np.int32)])
    answer_mask = np.arange(len(answer)) < len(ASSISTANT)
    got = KI.per_token_logprob(m.params, m.config, cache, *(jnp.asarray(x[None]) for x in
                                                             (probe, answer, probe_mask, answer_mask)))
    assert float(got[0]) == pytest.approx(_full_logprobs(m, ASSISTANT).mean(), abs=1e-4)


def test_projection_readout_equals_full_forward_projection(tiny_chat_model):
    """The mean projection of resid_post[layer] on u over the masked tokens continuing the cache, against a full
    forward over history + the real tokens, projected and averaged here."""
    from psm_jax.model import Capture, forward

    m, layer = tiny_chat_model, 1
    u = np.random.default_rng(3).normal(size=m.config.d_model).astype(np.float32)
    u /= np.linalg.norm(u)
    real = PROBE[:4]
    tokens = np.concatenate([real, np.full(2, 2, np.int32)])  # two masked trailing slots (a finished answer)
    mask = np.arange(len(tokens)) < len(real)
    cache = _cache(m, len(tokens))
    got = KI.projection_readout(m.params, m.config, cache, jnp.asarray(tokens[None]), jnp.asarray(mask[None]),
                                layer, jnp.asarray(u))
    full = forward(m.params, m.config, jnp.asarray(np.concatenate([HISTORY, real])[None]),
                   capture=Capture(sites=("resid_post",), layers=(layer,)), return_logits=False)
    h = np.asarray(full.captured["resid_post"][0, 0, len(HISTORY):], np.float64)
    assert float(got[0]) == pytest.approx(float((h @ u).mean()), abs=1e-4)


def _row(conv, probe, mode, value, history="scripted", kind="norm", strength=0.3, layers="0-1", **extra):
    return dict(conversation=conv, history=history, probe=probe, mode=mode, kind=kind, strength=strength,
                layers=layers, n=4, assistant_rate=extra.pop("rate", 0.0), identity_logodds=value,
                answer_projection=extra.pop("proj", 0.0), **extra)


def _bootstrap_interval(values, seed=0, n=2000):
    """The 95% percentile bootstrap interval of the mean, written out here."""
    x = np.asarray(values, np.float64)
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n, x.size))
    return np.quantile(x[idx].mean(1), [0.025, 0.975])


def test_identity_shifts_against_hand_computed_units():
    """Units are (conversation, probe); a unit's shift is the mean over its histories of edited minus unedited; the
    interval is a percentile bootstrap over those unit values; only the largest positive strength is read."""
    rng = np.random.default_rng(1)
    rows, per_unit = [], []
    for c in ("a", "b", "c"):
        for p in ("Who are you?", "What are you?"):
            diffs = []
            for h in ("scripted", "generated"):
                base, edited = rng.normal(), rng.normal() + 0.8
                rows += [_row(c, p, "none", base, h, kind="-", strength=0.0, layers="-", proj=1.0),
                         _row(c, p, "direct", edited, h, rate=0.5, proj=1.5),
                         _row(c, p, "direct", 99.0, h, strength=0.1),  # a smaller strength: not read
                         _row(c, p, "direct", -99.0, h, strength=-0.3)]  # negative: not read
                diffs.append(edited - base)
            per_unit.append(np.mean(diffs))
    got = KI.identity_shifts(rows, seed=5)
    assert list(got) == ["direct/norm"]
    v = got["direct/norm"]
    assert v["n"] == 6 and v["strength"] == 0.3 and v["samples_per_unit"] == 4
    assert v["logodds_shift"] == pytest.approx(np.mean(per_unit))
    lo, hi = _bootstrap_interval(per_unit, seed=5)
    assert (v["ci_low"], v["ci_high"]) == pytest.approx((lo, hi))
    assert v["ci_low"] <= v["logodds_shift"] <= v["ci_high"]
    assert v["assistant_rate_shift"] == pytest.approx(0.5) and v["projection_shift"] == pytest.approx(0.5)
    units = KI.unit_shifts(rows, [r for r in rows if r["mode"] == "direct" and r["strength"] == 0.3])
    assert sorted(units) == sorted((c, p) for c in "abc" for p in ("Who are you?", "What are you?"))
    assert list(units.values()) == pytest.approx(per_unit)


def test_identity_shift_interval_over_units():
    rows = [dict(conversation="c", history=h, probe=p, mode=m, kind=k, strength=s, layers=lr, n=4,
                 assistant_rate=0.0, identity_logodds=v + (0.2 if h == "generated" else 0.0), answer_projection=0.0)
            for h in ("scripted", "generated")
            for p, (b, e) in enumerate([(0.0, 1.0), (0.5, 1.4), (-0.2, 0.9)])
            for m, k, s, lr, v in (("none", "-", 0.0, "-", b), ("direct", "norm", 0.3, "0-1", e))]
    shift = KI.identity_shifts(rows)["direct/norm"]
    # three (conversation, probe) units; each unit's two histories are averaged, not counted twice
    assert shift["n"] == 3 and shift["logodds_shift"] == pytest.approx(np.mean([1.0, 0.9, 1.1]))
    assert 0.85 <= shift["ci_low"] <= shift["ci_high"] <= 1.15
    assert KI.identity_shifts(rows, history="generated")["direct/norm"]["n"] == 3


def test_random_direction_band_and_axis_edit_by_hand():
    """The random-direction control: its row shift, the band of per-direction mean shifts (2.5% and 97.5%
    quantiles over directions), and the direct axis edit's mean shift against it."""
    rng = np.random.default_rng(2)
    rows, dir_shifts, axis_shifts = [], [], []
    for p in range(4):
        base = rng.normal()
        band = base + 0.1 * rng.normal(size=25)
        rows += [_row("c", p, "none", base, kind="-", strength=0.0, layers="-"),
                 _row("c", p, "direct", base + 2.0 + 0.1 * p),
                 _row("c", p, "control_random", float(band.mean()), band_logodds=band.tolist())]
        dir_shifts.append(band - base)
        axis_shifts.append(2.0 + 0.1 * p)
    v = KI.control_shifts(rows)["control_random/norm"]
    lo, hi = np.quantile(np.mean(dir_shifts, axis=0), [0.025, 0.975])
    assert (v["band_low"], v["band_high"], v["n_directions"]) == (pytest.approx(lo), pytest.approx(hi), 25)
    assert v["direct_axis_shift"] == pytest.approx(np.mean(axis_shifts)) and v["axis_outside_band"] is True
    assert v["logodds_shift"] == pytest.approx(np.mean([d.mean() for d in dir_shifts]))


def test_condition_means_skip_nan_and_count_units():
    rows = [_row("a", 0, "none", 1.0, kind="-", strength=0.0, layers="-", rate=0.25),
            _row("a", 0, "none", 3.0, "generated", kind="-", strength=0.0, layers="-", rate=0.75),
            _row("b", 0, "none", 2.0, kind="-", strength=0.0, layers="-", rate=0.5),
            _row("a", 0, "control_random", 5.0, rate=float("nan"), proj=float("nan")),
            _row("a", 0, "direct", 4.0)]
    agg = KI.condition_means(rows)
    assert [a["mode"] for a in agg] == ["none", "direct", "control_random"]  # unedited first, controls last
    none, _, ctl = agg
    assert none["n"] == 2 and none["samples"] == 12  # units (a, 0) and (b, 0); four answers per row
    assert none["identity_logodds"] == pytest.approx(2.0) and none["assistant_rate"] == pytest.approx(0.5)
    assert np.isnan(ctl["assistant_rate"]) and ctl["identity_logodds"] == 5.0


def test_matched_positions_are_a_seeded_subset_of_the_assistant_tokens():
    assistant = np.zeros(40, bool)
    assistant[5:15] = assistant[25:35] = True
    picked = KI.matched_positions(assistant, 6, np.random.default_rng(0))
    assert picked.sum() == 6 and not (picked & ~assistant).any()
    assert (picked == KI.matched_positions(assistant, 6, np.random.default_rng(0))).all()
    assert KI.matched_positions(assistant, 50, np.random.default_rng(0)).sum() == 20  # at most every assistant token
