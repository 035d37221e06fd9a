"""Refusal direction: difference in means, candidate scores without recompiling, selection rules,
and a tiny end-to-end run (random tiny model + the real SmolLM2 tokenizer)."""
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import refusal as R
from psm_jax import edits as E
from psm_jax.loading.hf import load_hf_dir
from psm_jax.logits import kl_divergence, token_set_log_odds
from psm_jax.model import Capture, jit_forward
from psm_jax.persona import refusal as RL

TOKEN_IDS = [3, 7, 11]


def _prompts(rng, n, T, vocab, min_len=4):
    tokens = np.zeros((n, T), np.int32)
    mask = np.zeros((n, T), bool)
    for i in range(n):
        length = int(rng.integers(min_len, T + 1))
        tokens[i, T - length:] = rng.integers(0, vocab, length)
        mask[i, T - length:] = True
    return RL.Prompts(tokens, mask, [f"p{i}" for i in range(n)])


@pytest.fixture(scope="module")
def tiny(tiny_hf):
    directory, _ = tiny_hf("llama")
    params, config = load_hf_dir(directory)
    rng = np.random.default_rng(0)
    return params, config, _prompts(rng, 5, 8, config.vocab_size), _prompts(rng, 4, 8, config.vocab_size)


def test_mean_diff_equals_numpy(tiny):
    params, config, harm, safe = tiny
    offsets = np.array([-3, -2, -1])
    got = RL.mean_diff_directions(params, config, harm, safe, offsets, batch_size=3)  # fill rows in both sets
    assert got.dtype == np.float64 and got.shape == (3, config.n_layers, config.d_model)

    def means(p):
        out = jit_forward(params, config, jnp.asarray(p.tokens), attention_mask=jnp.asarray(p.mask),
                          capture=Capture(sites=("resid_pre",)))
        h = np.asarray(out.captured["resid_pre"], np.float64)  # [L, N, T, D]
        return h[:, :, p.tokens.shape[1] + offsets].mean(axis=1).transpose(1, 0, 2)  # [P, L, D]

    np.testing.assert_allclose(got, means(harm) - means(safe), rtol=1e-6, atol=1e-6)


def test_candidate_scores_match_direct_and_do_not_recompile(tiny):
    params, config, harm, safe = tiny
    dirs = np.random.default_rng(1).normal(size=(2, config.n_layers, config.d_model))
    RL.evaluate_candidates(params, config, dirs, [(0, 1)], harm, safe, TOKEN_IDS, batch_size=4)
    size = RL._last_logits._cache_size()
    cands = [(0, 0), (1, 2), (1, 1)]
    rows = RL.evaluate_candidates(params, config, dirs, cands, harm, safe, TOKEN_IDS, batch_size=4)
    assert RL._last_logits._cache_size() == size  # directions and layer masks are traced
    assert [(r["position"], r["layer"]) for r in rows] == cands

    def last(p, edits=()):  # the same compiled forward, fed with edits built independently here
        return RL._last_logits(params, config, jnp.asarray(p.tokens), jnp.asarray(p.mask), tuple(edits))

    p, layer = cands[1]
    v = dirs[p, layer].astype(np.float32)
    u = v / np.linalg.norm(v)
    off = np.zeros(config.n_layers, bool)
    zero = np.zeros(config.d_model, np.float32)
    # built here with the edit constructors, in the experiment's edit layout (one compiled forward)
    abl = [E.project_out(config, u, layers="all", site=s) for s in ("resid_pre", "attn_out", "mlp_out")]
    abl += [E.add(config, zero, layers=off, site="resid_pre")]
    ind = [E.project_out(config, u, layers=off, site=s) for s in ("resid_pre", "attn_out", "mlp_out")]
    ind += [E.add(config, v, layers=[layer], coef=1.0, site="resid_pre")]
    bypass = float(jnp.mean(token_set_log_odds(last(harm, abl), jnp.asarray(TOKEN_IDS))))
    induce = float(jnp.mean(token_set_log_odds(last(safe, ind), jnp.asarray(TOKEN_IDS))))
    kl = float(kl_divergence(last(safe), last(safe, abl)))
    # switched-off condition edits are bit-identical to no edits
    np.testing.assert_array_equal(np.asarray(last(safe)), np.asarray(last(safe, RL.condition_edits(config))))
    assert rows[1]["bypass"] == pytest.approx(bypass, abs=1e-4)
    assert rows[1]["induce"] == pytest.approx(induce, abs=1e-4)
    assert rows[1]["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert rows[1]["norm"] == pytest.approx(float(np.linalg.norm(v)), rel=1e-5)


def test_direction_nulls_match_edits_built_here(tiny):
    """Each stand-in direction's drop (ablated on the harmful prompts), rise (added at the given norm and layer on the
    harmless ones) and KL (ablated on the harmless ones) equal those from edits built here with the edit
    constructors, and log-odds and KL taken here."""
    from psm_jax.persona.directions import random_directions

    params, config, harm, safe = tiny
    base_h, base_s = 0.3, -0.2  # any unedited means: the nulls are differences from them
    units = random_directions(4, 3, config.d_model, 1.0)
    null = RL.direction_nulls(params, config, units, harm, safe, TOKEN_IDS, harmful_base=base_h,
                              harmless_base=base_s, norm=2.5, layer=1, batch_size=4)
    ids = jnp.asarray(TOKEN_IDS)

    def last(p, edits):
        return jit_forward(params, config, jnp.asarray(p.tokens), attention_mask=jnp.asarray(p.mask),
                           edits=edits).logits[:, -1]

    for k in (0, 2):
        ablate = tuple(E.project_out(config, units[k], layers="all", site=s) for s in ("resid_pre", "attn_out",
                                                                                   "mlp_out"))
        add = (E.add(config, 2.5 * units[k], layers=[1], site="resid_pre"),)
        harm_score = float(jnp.mean(token_set_log_odds(last(harm, ablate), ids)))
        safe_score = float(jnp.mean(token_set_log_odds(last(safe, add), ids)))
        assert null["drops"][k] == pytest.approx(base_h - harm_score, abs=1e-4)
        assert null["rises"][k] == pytest.approx(safe_score - base_s, abs=1e-4)
        p, q = np.asarray(last(safe, ()), np.float64), np.asarray(last(safe, ablate), np.float64)
        lp = p - np.log(np.exp(p - p.max(1, keepdims=True)).sum(1, keepdims=True)) - p.max(1, keepdims=True)
        lq = q - np.log(np.exp(q - q.max(1, keepdims=True)).sum(1, keepdims=True)) - q.max(1, keepdims=True)
        kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))
        assert null["kls"][k] == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert len(set(np.round(null["drops"], 6))) == 3  # the directions differ


def test_shuffled_label_directions_follow_the_permutations(tiny):
    """Each shuffled-label direction is the unit difference of group means (numpy, from activations captured here)
    under the seeded relabelling, and the prompt activations' own group difference is the candidate direction."""
    params, config, harm, safe = tiny
    offset, layer = -2, 1
    acts = []
    for p in (harm, safe):
        out = jit_forward(params, config, jnp.asarray(p.tokens), attention_mask=jnp.asarray(p.mask),
                          capture=Capture(sites=("resid_pre",)))
        acts.append(np.asarray(out.captured["resid_pre"], np.float64)[layer, :, p.tokens.shape[1] + offset])
    a, b = acts
    np.testing.assert_allclose(RL.prompt_activations(params, config, harm, offset, layer, batch_size=3), a,
                               rtol=1e-5, atol=1e-5)
    got = RL.shuffled_label_directions(params, config, harm, safe, offset=offset, layer=layer, n=4, seed=9,
                                       batch_size=3)
    pooled, rng = np.concatenate([a, b]), np.random.default_rng(9)
    for k in range(4):
        perm = rng.permutation(len(pooled))
        d = pooled[perm[:len(a)]].mean(0) - pooled[perm[len(a):]].mean(0)
        np.testing.assert_allclose(got[k], d / np.linalg.norm(d), rtol=1e-4, atol=1e-5)
    dirs = RL.mean_diff_directions(params, config, harm, safe, np.array([offset]), batch_size=3)
    np.testing.assert_allclose(dirs[0, layer], a.mean(0) - b.mean(0), rtol=1e-5, atol=1e-5)


def test_zero_direction_is_skipped(tiny):
    params, config, harm, safe = tiny
    dirs = np.random.default_rng(2).normal(size=(1, config.n_layers, config.d_model))
    dirs[0, 0] = 0.0
    rows = RL.evaluate_candidates(params, config, dirs, [(0, 0)], harm, safe, TOKEN_IDS, batch_size=4)
    assert np.isnan(rows[0]["bypass"])
    best, ann = RL.select_direction(rows, config.n_layers)
    assert best is None and "zero direction" in ann[0]["reason"]


def _row(layer, bypass, induce, kl, position=0):
    return dict(position=position, layer=layer, bypass=bypass, induce=induce, kl=kl)


def test_selection_rules_on_synthetic_scores():
    n_layers = 10  # layer cut at 8
    rows = [
        _row(9, -9.0, 1.0, 0.01),  # best bypass but layer >= 0.8 * n_layers
        _row(8, -8.0, 1.0, 0.01),  # layer exactly at the cut: dropped
        _row(2, -7.0, 1.0, 0.5),  # KL too high
        _row(3, -6.0, -0.1, 0.01),  # induce < 0
        _row(4, -5.0, 0.0, 0.1),  # passes (KL == threshold, induce == 0 are kept)
        _row(5, -4.0, 2.0, 0.0),  # passes, worse bypass
        _row(1, float("nan"), 1.0, 0.0),  # NaN
    ]
    best, ann = RL.select_direction(rows, n_layers, max_layer_frac=0.8, kl_threshold=0.1, induce_threshold=0.0)
    assert (best["layer"], best["bypass"]) == (4, -5.0)
    assert [r["kept"] for r in ann] == [False, False, False, False, True, True, False]
    assert "layer" in ann[0]["reason"] and "layer" in ann[1]["reason"]
    assert "KL" in ann[2]["reason"] and "induce" in ann[3]["reason"]
    best, _ = RL.select_direction(rows[:4], n_layers)
    assert best is None
    with pytest.raises(ValueError, match="lacks"):
        RL.select_direction([dict(layer=1, bypass=0.0, kl=0.0)], n_layers)


def test_selection_fallback_tiers():
    n = 10
    rows = [_row(2, -3.0, -2.0, 0.05), _row(3, -4.0, -1.0, 0.05), _row(4, -9.0, 0.5, 0.9), _row(9, -20.0, 1, 0)]
    best, _, tier = RL.select_with_fallback(rows, n, harmless_baseline=-1.5)
    assert tier == "induce_above_baseline" and best["layer"] == 3
    best, _, tier = RL.select_with_fallback(rows, n, harmless_baseline=0.0)
    assert tier == "kl_only" and best["layer"] == 3
    best, _, tier = RL.select_with_fallback(rows[2:], n, harmless_baseline=0.0)
    assert tier == "layer_only" and best["layer"] == 4
    best, _, tier = RL.select_with_fallback(rows, n, harmless_baseline=0.0, fallback=False)
    assert best is None and tier is None
    best, _, tier = RL.select_with_fallback(rows + [_row(5, -1.0, 0.1, 0.0)], n, harmless_baseline=0.0)
    assert tier == "strict" and best["layer"] == 5


def test_matched_damage_selection_on_synthetic_scores():
    """The winner has the largest drop z among the null directions of matched KL, computed here by hand; the layer
    cut, the induce floor, too few matched directions and NaN drop candidates, whatever their drop."""
    null_kls = np.array([0.1] * 10 + [1.0] * 10 + [0.01] * 3)
    null_drops = np.array([0.0, 0.2, 0.4, 0.1, 0.3, 0.5, 0.2, 0.1, 0.3, 0.4] + [3.0, 3.5, 2.5, 4.0, 3.2, 2.8, 3.1,
                                                                                  3.3, 2.9, 3.4] + [0.0] * 3)
    rows = [_row(2, 1.0, 0.5, 0.12),  # drop 1.0 at KL 0.12: matched to the ten 0.1-KL nulls
            _row(3, -2.0, 0.5, 0.9),  # drop 4.0 at KL 0.9: matched to the ten 1.0-KL nulls, a smaller z
            _row(9, -5.0, 0.5, 0.1),  # past the layer cut
            _row(4, 0.0, -2.0, 0.1),  # induce below the harmless mean
            _row(5, 0.0, 0.5, 0.01),  # only 3 matched
            _row(6, float("nan"), 0.5, 0.1)]
    best, ann = RL.select_matched_damage(rows, 10, null_drops=null_drops, null_kls=null_kls, harmful_baseline=2.0,
                                         harmless_baseline=-1.0)
    low, high = null_drops[:10], null_drops[10:20]
    z0 = (1.0 - low.mean()) / low.std(ddof=1)
    z1 = (4.0 - high.mean()) / high.std(ddof=1)
    assert z0 > z1 and best["layer"] == 2
    assert ann[0]["matched_z"] == pytest.approx(z0) and ann[1]["matched_z"] == pytest.approx(z1)
    assert ann[0]["n_matched"] == 10 and ann[0]["matched_p"] == pytest.approx(1 / 11)
    assert ann[1]["matched_p"] == pytest.approx(2 / 11) and ann[1]["drop"] == pytest.approx(4.0)  # ties count
    assert [r["kept"] for r in ann] == [True, True, False, False, False, False]
    assert "layer" in ann[2]["reason"] and "induce" in ann[3]["reason"]
    assert "matched KL" in ann[4]["reason"] and "non-finite" in ann[5]["reason"]
    best, _ = RL.select_matched_damage(rows[2:], 10, null_drops=null_drops, null_kls=null_kls,
                                       harmful_baseline=2.0, harmless_baseline=-1.0)
    assert best is None
    with pytest.raises(ValueError, match="equal 1-d shapes"):
        RL.select_matched_damage(rows, 10, null_drops=[1.0], null_kls=[0.1], harmful_baseline=0.0,
                                 harmless_baseline=0.0)


class _FakeTok:
    def encode(self, text, add_special_tokens=False):
        return {"I": [5], " I": [6], "Sorry": [7, 8], " Sorry": [9, 10], "As": [5]}.get(text, [])


def test_refusal_token_ids():
    assert RL.refusal_token_ids(_FakeTok(), ["I", "Sorry", "As"]) == [5, 6, 7, 9]
    with pytest.raises(ValueError, match="non-empty"):
        RL.refusal_token_ids(_FakeTok(), ["I", " "])
    with pytest.raises(ValueError, match="no token ids"):
        RL.refusal_token_ids(_FakeTok(), ["zzz"])


@pytest.mark.parametrize("kw,match", [
    (dict(n_train=0), "n_train"), (dict(max_layer_frac=1.5), "max_layer_frac"), (dict(kl_threshold=0.0), "kl"),
    (dict(positions=(1,)), "negative"), (dict(layers=(-1,)), "layer"), (dict(n_ce=-1), "n_ce"),
    (dict(n_random=5), "n_random=5"), (dict(n_shuffled=3), "n_shuffled=3; expected 0"),
    (dict(selection_rule="lowest"), "selection_rule='lowest'"),
    (dict(selection_rule="matched_damage"), "n_random_selection >= 1 exactly when"),
    (dict(n_random_selection=20), "n_random_selection >= 1 exactly when"),
    (dict(selection_rule="matched_damage", n_random_selection=5), "n_random_selection=5; expected 0"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        R.Config(**kw)


def test_mean_diff_needs_prompts(tiny):
    params, config, harm, _ = tiny
    with pytest.raises(ValueError, match="at least one"):
        RL.mean_diff_directions(params, config, harm, harm.subset([]), [-1])


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.slow  # the whole study on a tiny model: every candidate, condition and generation compiled
def test_run_end_to_end_tiny(tiny_chat_model, tmp_path):
    kw = dict(model="psm-tiny", n_train=4, n_val=4, n_eval=4, n_ce=2, ce_max_chars=300,
              max_new_tokens=3, batch_size=4, positions=(-1, -6), layers=(1, 2), min_filtered=2)
    from experiments.study import execute

    res = execute(R, R.Config(**kw), folder=tmp_path / "a", model=tiny_chat_model)["result"]
    out = tmp_path / "a"
    for name in ("report.md", "metrics.json", "config.json", "selection_scores.png", "heldout_logodds.png",
                 "refusal_direction.safetensors", "refusal_direction.json", "candidate_directions.safetensors"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(m["refusal_logodds_drop"]) and np.isfinite(m["refusal_ce_change"])
    assert len(m["candidates"]) == 4 and m["selected"]["tier"] in RL.FALLBACK_TIERS
    assert m["orthogonalized_max_abs_logit_diff"] < 1e-4
    assert res.mean_diffs.shape == (6, 3, 32)  # every post-instruction position x every layer
    from experiments.report import load_vectors

    vecs, meta = load_vectors(out / "refusal_direction.safetensors", expect_model="psm-tiny", expect_width=32)
    assert meta["site"] == "resid_pre" and vecs["direction"].shape == (32,)
    # same config + seed -> same numbers
    lines = R.records(res)
    assert [ln["metric"] for ln in lines] == ["refusal_logodds_drop", "refusal_induce_rise", "refusal_ablation_kl",
                                              "refusal_ce_change"]
    drop = res.heldout_logodds["harmful_base"] - res.heldout_logodds["harmful_ablated"]
    assert lines[0]["ci"][0] <= np.mean(drop) <= lines[0]["ci"][1] and lines[0]["n"] == len(drop)
    assert lines[3]["n"] == 2 and lines[3]["ci"][0] <= lines[3]["value"] <= lines[3]["ci"][1]
    assert lines[1]["value"] == pytest.approx(np.mean(res.heldout_logodds["harmless_induced"]
                                                      - res.heldout_logodds["harmless_base"]), abs=1e-4)
    assert all(ln["null"] for ln in lines)
    rnd, shuf = res.nulls["random"], res.nulls["shuffled"]
    for null, n in ((rnd, R.Config().n_random), (shuf, R.Config().n_shuffled)):
        assert all(len(v) == n and np.isfinite(v).all() for v in null.values())
    assert lines[0]["null"].startswith("20 random directions (unit norm) ablated the same way: 95% band [")
    assert "; 20 label-shuffled difference-in-means directions (same position and layer) (unit norm) ablated" \
        in lines[0]["null"]
    assert lines[0]["random_drops"] == [round(float(x), 4) for x in rnd["drops"]]
    assert lines[0]["shuffled_drops"] == [round(float(x), 4) for x in shuf["drops"]]
    assert lines[1]["null"].startswith(
        f"20 random directions at the direction's norm added at L{res.selected['layer']}")
    assert lines[1]["random_rises"] == [round(float(x), 4) for x in rnd["rises"]]
    assert lines[2]["value"] == pytest.approx(np.mean(res.ablation_kl), abs=1e-4) and lines[2]["n"] == 4
    assert lines[2]["shuffled_kls"] == [round(float(x), 4) for x in shuf["kls"]]
    # the null adds each random direction the way the induce condition adds the selected one: one draw by hand
    from psm_jax.persona.directions import random_directions

    u = random_directions(res.config.seed + 1, res.config.n_random, res.d_model, 1.0)[0]
    edits = RL.condition_edits(tiny_chat_model.config, vector=np.linalg.norm(res.direction) * u,
                              induce_layer=res.selected["layer"])
    by_hand = RL.refusal_scores(tiny_chat_model.params, tiny_chat_model.config, res.heldout_harmless,
                               res.score_token_ids, edits,
                               res.config.batch_size).mean() - res.heldout_logodds["harmless_base"].mean()
    assert rnd["rises"][0] == pytest.approx(by_hand, abs=1e-5)
    res2 = R.run(R.Config(**kw), tiny_chat_model)
    assert res2.logodds_drop == res.logodds_drop and res2.chat_ce == res.chat_ce
    for name in ("random", "shuffled"):
        for key in ("drops", "rises", "kls"):
            np.testing.assert_array_equal(res2.nulls[name][key], res.nulls[name][key])
    np.testing.assert_array_equal(res2.ablation_kl, res.ablation_kl)
    np.testing.assert_array_equal(res2.mean_diffs, res.mean_diffs)
    text = (out / "report.md").read_text()
    assert "refuses" in text  # the baseline-refusal reading
    assert f"The ablation costs KL **{np.mean(res.ablation_kl):.4f} nats**" in text
    assert not re.search(r"\{(ci|res|v|_|null|name)\W", text)  # every field of the new sections formatted
    assert (out / "ablation_damage.png").is_file()
    assert ("Validity of the refusal score: not checkable" in text) == (res.validity is None)
    assert lines[0]["measure_valid"] == (None if res.validity is None else res.validity["valid"])
    low, high = res.chat_ce["ce_pct_change_ci"]
    assert f"95% interval over conversations [{low:+.2f}%, {high:+.2f}%]" in text


@pytest.mark.slow  # the study under the matched-damage rule on a tiny model
def test_run_matched_damage_rule_tiny(tiny_chat_model, tmp_path):
    """The val null is the hand-checked `direction_nulls` on the val prompts with key seed + 3; the winner is the
    largest z recomputed here from metrics.json; the report and the KL line say no threshold applied."""
    from experiments.refusal.prompts import load_prompt_sets, score_tokens
    from experiments.study import execute
    from psm_jax.persona.directions import random_directions

    cfg = R.Config(model="psm-tiny", n_train=4, n_val=4, n_eval=4, n_ce=0, max_new_tokens=2, batch_size=4,
                   positions=(-1, -2, -3), layers=(0, 1, 2), max_layer_frac=1.0, min_filtered=2, n_random=0,
                   n_shuffled=0, selection_rule="matched_damage", n_random_selection=40)
    res = execute(R, cfg, folder=tmp_path / "md", model=tiny_chat_model)["result"]
    m = json.loads((tmp_path / "md" / "metrics.json").read_text())
    assert res.selection_tier == m["selected"]["tier"] == "matched_damage" and not res.fallback_used
    model, sets = tiny_chat_model, load_prompt_sets(cfg, tiny_chat_model)
    units = random_directions(cfg.seed + 3, 40, model.config.d_model, 1.0)
    ref = RL.direction_nulls(model.params, model.config, units, sets.val_harmful, sets.val_harmless,
                             score_tokens(model, res.markers)[0], harmful_base=res.harmful_val_logodds,
                             harmless_base=res.harmless_val_logodds, norm=1.0, layer=0, batch_size=4)
    for key in ("drops", "kls"):
        np.testing.assert_allclose(m["selection_nulls"][key], ref[key], rtol=1e-6, atol=1e-7)
    d, k = np.array(m["selection_nulls"]["drops"]), np.array(m["selection_nulls"]["kls"])
    zs = {}
    for c in m["candidates"]:
        if c["kl"] is None:  # a zero direction: NaN scores, written as null
            continue
        matched = d[(k >= c["kl"] / 2) & (k <= c["kl"] * 2)]
        if c["induce"] >= res.harmless_val_logodds and matched.size >= 9:
            zs[(c["position"], c["layer"])] = (res.harmful_val_logodds - c["bypass"] - matched.mean()) / matched.std(
                ddof=1)
    assert max(zs, key=zs.get) == (res.selected["position"], res.selected["layer"])
    assert res.selected["matched_z"] == pytest.approx(max(zs.values()))
    text = (tmp_path / "md" / "report.md").read_text()
    assert "Selection (matched damage): 40 random unit directions" in text and "## Selection against damage" in text
    assert "no threshold: the matched-damage rule selected it" in text
    assert R.records(res)[2]["target"].startswith("none (the matched-damage rule")


def test_run_rejects_bad_sizes(tiny_chat_model, tmp_path):
    with pytest.raises(ValueError, match="exceeds"):
        R.run(R.Config(n_train=120, n_eval=32), tiny_chat_model)
    with pytest.raises(ValueError, match="out of range"):
        R.run(R.Config(layers=(7,)), tiny_chat_model)


def test_score_validity_reads_the_answers():
    """The score's AUROC for the answers with a refusal marker anywhere, against the AUROC written here; None when all
    answers fall on one side; a length mismatch is an error."""
    from psm_jax.persona import datasets
    from psm_jax.persona.stats import auroc

    markers = datasets.load_refusal_markers()
    refusal = markers.refusal_prefixes[0] + " that."
    answers = [refusal, "Sure, here it is.", refusal, "Here you go.", "Well, " + refusal, "Fine."] * 4
    refused = np.array([markers.is_refusal(a, anywhere=True) for a in answers])
    assert refused.sum() == 12
    scores = refused * 2.0 + np.random.default_rng(1).normal(size=len(answers))
    v = RL.score_validity(scores, answers, markers, seed=2)
    assert v["estimate"] == pytest.approx(auroc(refused, scores)) and v["n"] == 24 and v["n_pos"] == 12
    assert v["enough"] and v["valid"] == (v["low"] > 0.5)
    assert RL.score_validity(scores[:2], ["Fine."] * 2, markers) is None
    few = [refusal] * 3 + ["Fine."] * 21  # three refusals, perfectly separated: the interval is unsupported
    v_few = RL.score_validity(np.r_[np.full(3, 5.0), np.zeros(21)], few, markers)
    assert v_few["estimate"] == 1.0 and v_few["low"] > 0.5 and not v_few["enough"] and not v_few["valid"]
    with pytest.raises(ValueError, match="one answer per score"):
        RL.score_validity(scores, answers[:3], markers)


def test_matched_damage_null_counts_equally_damaging_directions():
    """Only null directions whose KL lies within the factor of the selected one's count; p is their rank p."""
    drops, kls = [0.5, 2.0, 1.0, 3.0, 0.1, 1.5], [0.1, 0.15, 0.3, 1.0, 0.04, 0.05]
    r = RL.matched_damage_null(1.5, 0.1, drops, kls)  # matched: KL in [0.05, 0.2] -> drops 0.5, 2.0, 1.5
    assert (r["n_matched"], r["n_at_least"], r["enough"], r["matched_max_drop"]) == (3, 2, False, 2.0)
    assert r["p"] == pytest.approx(3 / 4)
    assert RL.matched_damage_null(1.5, 10.0, drops, kls)["matched_max_drop"] is None
    many = RL.matched_damage_null(9.0, 0.1, [1.0] * 12, [0.1] * 12)
    assert many["enough"] and many["p"] == pytest.approx(1 / 13)
    with pytest.raises(ValueError, match="equal 1-d shapes"):
        RL.matched_damage_null(1.0, 0.1, [1.0], [0.1, 0.2])
    with pytest.raises(ValueError, match="kl > 0"):
        RL.matched_damage_null(1.0, 0.0, [1.0], [0.1])


def test_matched_null_script_reads_a_report_and_records(tmp_path, monkeypatch):
    """benchmarks/refusal_matched_null.py pools both nulls of a report and records the rank p; a report without
    null directions is a clear error."""
    from benchmarks import refusal_matched_null as script

    folder = tmp_path / "rep"
    folder.mkdir()
    nulls = {"random": {"drops": [0.1, 0.2, 3.0], "rises": [0, 0, 0], "kls": [0.2, 0.25, 5.0]},
             "shuffled": {"drops": [1.1, 0.3], "rises": [0, 0], "kls": [0.3, 0.1]}}
    (folder / "metrics.json").write_text(json.dumps({"refusal_logodds_drop": 1.0, "ablation_kl": {"mean": 0.2},
                                                     "nulls": nulls}))
    (folder / "config.json").write_text(json.dumps({"model": "m"}))
    results = tmp_path / "results.jsonl"
    monkeypatch.setenv("PSM_RESULTS", str(results))
    assert script.main([str(folder), "--record"]) == 0
    line = json.loads(results.read_text())
    assert line["metric"] == "refusal_drop_matched_damage_p" and line["n"] == 4  # KL 0.2, 0.25, 0.3, 0.1 match
    assert line["value"] == pytest.approx(2 / 5) and "3 random + 2 shuffled" in line["reference"]
    assert line["key"] == "rep" and line["model"] == "m"
    (folder / "metrics.json").write_text(json.dumps({"refusal_logodds_drop": 1.0}))
    with pytest.raises(ValueError, match="no null directions"):
        script.main([str(folder)])
