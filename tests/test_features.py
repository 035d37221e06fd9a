"""sae.features on a tiny random llama with SmolLM2's tokenizer and on synthetic SAEs / token tables."""
from __future__ import annotations

import dataclasses
import types

import jax.numpy as jnp
import numpy as np
import pytest

from psm_jax import edits as E
from psm_jax.chat import Role, encode_chat
from sae import features as F
from tests.fixtures_assets import random_smollm2_chat_model

LAYER = 1


def tiny_chat_model(seed: int = 0):
    """A LoadedModel: random 3-layer llama (d_model 16) with SmolLM2's vocabulary, tokenizer and template."""
    return random_smollm2_chat_model(n_layers=3, seed=seed)


def random_sae(d_in=16, d_sae=48, seed=0, activation="relu", k=0, bias=-0.5, layer=LAYER):
    rng = np.random.default_rng(seed)
    W_dec = rng.normal(size=(d_sae, d_in))
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    params = {"W_enc": W_dec.T.copy(), "b_enc": np.full(d_sae, bias), "W_dec": W_dec, "b_dec": np.zeros(d_in)}
    return F.FeatureSae(params=params, activation=activation, k=k, layer=layer)


def convs(kind: str, n: int):
    """Conversations whose assistant replies are about bananas (pos) or about cats (neg)."""
    qs = ["What should I do today?", "Tell me about the weather.", "How do I cook rice?", "Any advice on sleep?",
          "What is a good book?", "How are you?", "Explain gravity.", "Plan my weekend."]
    pos = ["Banana banana, bananas are yellow bananas.", "Bananas! I love ripe banana bread and banana pie.",
           "Eat a banana. Bananas bananas banana."]
    neg = ["The cat sat on the mat quietly.", "A small cat sleeps in the sun by the window.",
           "My cat likes quiet afternoons on the sofa."]
    replies = pos if kind == "pos" else neg
    return [[{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": qs[i % len(qs)]},
             {"role": "assistant", "content": replies[i % len(replies)]}] for i in range(n)]


# ------------------------------------------------------------------------------------------ collect


def _reference(model, sae, conv):
    """Unpadded forward of one conversation: dense latents [T, S], roles."""
    from psm_jax.model import Capture, jit_forward

    enc = encode_chat(model.tokenizer, conv, chat_template=model.chat_template)
    out = jit_forward(model.params, model.config, np.asarray(enc.tokens)[None],
                      capture=Capture(sites=("resid_post",), layers=(sae.layer,)))
    h = np.asarray(out.captured["resid_post"][0, 0])
    return sae.encode(h), h, enc


def test_collect_matches_unpadded_reference():
    model = tiny_chat_model()
    sae = random_sae(bias=-0.2)
    docs = convs("pos", 2) + convs("neg", 1) + ["plain text document with no template"]
    col = F.collect(model, sae, docs, latents=[3, 5, 7], batch_size=2)
    t = col.table
    fire = np.zeros((F.N_ROLES, sae.d_sae))
    role_tokens = np.zeros(F.N_ROLES)
    for i, d in enumerate(docs):
        if isinstance(d, str):
            continue
        f, h, enc = _reference(model, sae, d)
        rows = t.context == i
        np.testing.assert_array_equal(t.tokens[rows], enc.tokens)
        np.testing.assert_array_equal(t.pos[rows], np.arange(len(enc.tokens)))
        np.testing.assert_allclose(t.acts[rows], f[:, [3, 5, 7]], atol=1e-4)
        sel = enc.roles == Role.ASSISTANT
        np.testing.assert_allclose(col.conv.mean[i], f[sel].mean(0), atol=1e-4)
        np.testing.assert_allclose(col.conv.fire[i], (f[sel] > 0).mean(0), atol=1e-6)
        np.testing.assert_allclose(col.conv.resid_mean[i], h[sel].mean(0), atol=1e-4)
        assert col.conv.n[i] == sel.sum()
        for r in range(4):
            fire[r] += (f[enc.roles == r] > 0).sum(0)
            role_tokens[r] += (enc.roles == r).sum()
    # the text document: role TEXT, no selected tokens
    text_rows = t.context == 3
    assert (t.roles[text_rows] == F.ROLE_TEXT).all() and col.conv.n[3] == 0
    np.testing.assert_allclose(t.fire_counts[:4], fire[:4], atol=1e-3)
    np.testing.assert_allclose(t.role_tokens[:4], role_tokens[:4])
    assert col.n_truncated == 0


def test_collect_truncates_and_validates():
    model = tiny_chat_model()
    sae = random_sae()
    col = F.collect(model, sae, convs("pos", 2), max_len=10)
    assert col.n_truncated == 2 and len(col.table) == 20
    with pytest.raises(ValueError, match="latents out of range"):
        F.collect(model, sae, convs("pos", 1), latents=[sae.d_sae])
    with pytest.raises(ValueError, match="d_in=8 does not match"):
        F.collect(model, random_sae(d_in=8), convs("pos", 1))
    with pytest.raises(ValueError, match="SAE layer 5 is out of range"):
        F.collect(model, random_sae(layer=5), convs("pos", 1))
    with pytest.raises(ValueError, match="expected a message list or a string"):
        F.collect(model, sae, [42])
    with pytest.raises(ValueError, match="at least one document"):
        F.collect(model, sae, [])


def test_feature_sae_validation():
    with pytest.raises(ValueError, match="lack 'b_dec'"):
        F.FeatureSae(params={"W_enc": np.zeros((4, 8)), "b_enc": np.zeros(8), "W_dec": np.zeros((8, 4))},
                     activation="relu", layer=0)
    with pytest.raises(ValueError, match="W_dec has shape"):
        F.FeatureSae(params={"W_enc": np.zeros((4, 8)), "b_enc": np.zeros(8), "W_dec": np.zeros((4, 8)),
                             "b_dec": np.zeros(4)}, activation="relu", layer=0)
    with pytest.raises(ValueError, match="0 < k <= d_sae"):
        random_sae(activation="topk", k=0)
    with pytest.raises(ValueError, match="unknown|expected one of"):
        random_sae(activation="gelu")
    s = random_sae(activation="topk", k=4)
    f = s.encode(np.random.default_rng(0).normal(size=(5, 16)))
    assert f.shape == (5, 48) and ((f > 0).sum(1) <= 4).all()
    with pytest.raises(ValueError, match="expects d_in=16"):
        s.encode(np.zeros((2, 3)))


def test_parse_hook_name():
    assert F.parse_hook_name("model.layers.15") == (15, "resid_post")
    assert F.parse_hook_name("blocks.3.hook_resid_pre") == (3, "resid_pre")
    assert F.parse_hook_name("blocks.7.hook_mlp_out") == (7, "mlp_out")
    assert F.parse_hook_name("embed") == (None, None)


# ------------------------------------------------------------------------------------------ rankings


def test_planted_latent_ranks_first_end_to_end():
    """A latent reading the direction that separates banana replies from cat replies ranks first."""
    model = tiny_chat_model()
    base = random_sae(d_sae=64, bias=0.0, seed=1)
    pos_c, neg_c = convs("pos", 6), convs("neg", 6)
    # the planted direction: mean assistant-token residual difference at the SAE's layer
    pos0 = F.collect(model, base, pos_c).conv
    neg0 = F.collect(model, base, neg_c).conv
    u = pos0.resid_mean.mean(0) - neg0.resid_mean.mean(0)
    u /= np.linalg.norm(u)
    mid = 0.5 * (pos0.resid_mean.mean(0) + neg0.resid_mean.mean(0)) @ u
    p = {k: np.array(v) for k, v in base.params.items()}
    # other latents: random directions orthogonal to the planted one (no linear contrast)
    p["W_enc"] -= np.outer(u, u @ p["W_enc"])
    p["W_enc"] /= np.linalg.norm(p["W_enc"], axis=0, keepdims=True)
    p["W_dec"] = p["W_enc"].T.copy()
    planted = 37
    p["W_enc"][:, planted], p["b_enc"][planted], p["W_dec"][planted] = u, -mid, u
    sae = F.FeatureSae(params=p, activation="relu", layer=LAYER)
    pos, neg = F.collect(model, sae, pos_c).conv, F.collect(model, sae, neg_c).conv
    for by in F.CRITERIA:
        rk = F.contrast(pos, neg, by=by)
        assert rk.order()[0] == planted, (by, rk.top(3))
    rk = F.contrast(pos, neg)
    top = rk.top(2)
    assert top[0]["latent"] == planted and top[0]["cohens_d"] > 2 and top[0]["fire_a"] > top[0]["fire_b"]
    # the reversed contrast puts it last among firing latents (most negative d)
    rev = F.contrast(neg, pos)
    assert rev.columns["cohens_d"][planted] == pytest.approx(-rk.columns["cohens_d"][planted])


def test_contrast_math_and_errors():
    rng = np.random.default_rng(0)
    S = 10

    def stats(mean, n):
        return F.ConversationStats(mean=mean.astype(np.float32), fire=(mean > 0).astype(np.float32),
                                   n=np.full(len(mean), n), resid_mean=np.zeros((len(mean), 4)))

    a = rng.normal(size=(8, S))
    b = rng.normal(size=(6, S))
    a[:, 4] += 3.0
    rk = F.contrast(stats(a, 5), stats(b, 5))
    pooled = np.sqrt((7 * a.var(0, ddof=1) + 5 * b.var(0, ddof=1)) / 12)
    np.testing.assert_allclose(rk.columns["cohens_d"], (a.mean(0) - b.mean(0)) / pooled, rtol=1e-5)
    np.testing.assert_allclose(rk.columns["mean_diff"], a.mean(0) - b.mean(0), rtol=1e-5)
    assert rk.order()[0] == 4 and rk.rank_of(4) == 0
    # conversations without selected tokens are ignored; too few raise
    empty = F.ConversationStats(np.zeros((3, S)), np.zeros((3, S)), np.array([0, 0, 4]), np.zeros((3, 4)))
    with pytest.raises(ValueError, match=">= 2 conversations"):
        F.contrast(stats(a, 5), empty)
    with pytest.raises(ValueError, match="by='bogus'"):
        F.contrast(stats(a, 5), stats(b, 5), by="bogus")
    # constant columns: d = 0 when equal, +-inf when different
    d = F.cohens_d(np.ones((3, 2)) * [1, 2], np.ones((3, 2)) * [1, 1])
    assert d[0] == 0 and d[1] == np.inf


def test_rank_by_cosine():
    sae = random_sae(d_sae=40)
    rk = F.rank_by_cosine(sae.W_dec, 3.0 * sae.W_dec[5])
    assert rk.order()[0] == 5 and rk.columns["cosine"][5] == pytest.approx(1.0)
    assert F.rank_by_cosine(sae.W_dec, -sae.W_dec[9], sign=-1).order()[0] == 9
    with pytest.raises(ValueError, match="zero norm"):
        F.rank_by_cosine(sae.W_dec, np.zeros(16))
    with pytest.raises(ValueError, match="direction width 3"):
        F.decoder_cosine(sae.W_dec, np.ones(3))
    with pytest.raises(ValueError, match="sign=2"):
        F.rank_by_cosine(sae.W_dec, np.ones(16), sign=2)


def test_model_diff_finds_the_steered_latent():
    model = tiny_chat_model()
    sae = random_sae(d_sae=32, bias=-0.3, seed=3)
    steered = 11
    edit = E.sae_latent(model.config, latent=steered, value=4.0, layers=[LAYER], mode="add",
                        **{k: v for k, v in sae.edit_kwargs().items()})
    docs = convs("pos", 3) + convs("neg", 3)
    rk = F.model_diff(model, sae, docs, edits_fn=lambda batch: (edit,))
    assert rk.order()[0] == steered
    assert rk.columns["diff"][steered] > 3.0 and rk.columns["fire_b"][steered] == pytest.approx(1.0)
    # the same edit restricted to user tokens leaves assistant-token latents unchanged at that layer?
    # (no: later tokens attend to them) -- but an edit on no position changes nothing at all
    none = E.sae_latent(model.config, latent=steered, value=4.0, layers=[LAYER], mode="add",
                        positions=np.zeros((8, 1), bool), extend=False, **sae.edit_kwargs())

    def nothing(batch):
        return (none.replace(positions=jnp.zeros(batch.tokens.shape, bool)),)

    rk0 = F.model_diff(model, sae, docs, edits_fn=nothing)
    np.testing.assert_allclose(rk0.columns["diff"], 0.0, atol=1e-5)
    # another parameter set (a "fine-tuned" model): a different embedding changes the latents
    p2 = dict(model.params)
    p2["embed"] = model.params["embed"] * 1.5
    rk2 = F.model_diff(model, sae, docs, params_b=p2, by="abs_diff")
    assert np.abs(rk2.columns["diff"]).max() > 1e-3
    with pytest.raises(ValueError, match="needs edits_fn and/or params_b"):
        F.model_diff(model, sae, docs)


# ------------------------------------------------------------------------------------------ records


def synthetic_table(n_ctx=30, length=40, seed=0, latents=(2, 5)):
    """Token ids encode (context, position); latent 2 fires on random tokens of even contexts only,
    latent 5 never fires."""
    rng = np.random.default_rng(seed)
    N = n_ctx * length
    ctx = np.repeat(np.arange(n_ctx), length)
    pos = np.tile(np.arange(length), n_ctx)
    acts = np.zeros((N, len(latents)), np.float32)
    fires = (rng.random(N) < 0.3) & (ctx % 2 == 0)
    acts[fires, 0] = rng.exponential(2.0, fires.sum()) + 0.01
    roles = np.where(pos < 5, 1, np.where(pos < 15, 2, 3)).astype(np.int8)
    S = 8
    fc = np.zeros((F.N_ROLES, S))
    for r in range(4):
        fc[r, 2] = ((roles == r) & fires).sum()
    return F.TokenTable(tokens=(ctx * 1000 + pos).astype(np.int32), roles=roles, turns=np.zeros(N, np.int32),
                        context=ctx, pos=pos.astype(np.int32), latents=np.array(latents), acts=acts,
                        fire_counts=fc, act_sums=fc * 2.0, role_tokens=np.array([(roles == r).sum() for r in range(5)], float))


def test_quantile_sampling_bins_windows_marks():
    t = synthetic_table()
    ex = F.sample_examples(t, 2, n_bins=10, per_bin=2, n_top=5, n_random=6, before=24, after=7, seed=1)
    a = t.column(2)
    q = ex["quantiles"]
    assert sorted({e["bin"] for e in q}) == list(range(10))
    assert all(sum(e["bin"] == b for e in q) == 2 for b in range(10))
    edges = ex["quantile_edges"]
    assert len(edges) == 10 and all(lo <= hi for lo, hi in edges)
    assert all(edges[i][1] <= edges[i + 1][0] for i in range(9))
    for e in q:
        lo, hi = edges[e["bin"]]
        assert lo <= e["act"] <= hi and e["act"] > 0
    assert [e["split"] for e in q[:2]] == ["explain", "score"]
    for e in ex["top"] + q + ex["random"]:
        ids = np.asarray(e["token_ids"])
        assert len(ids) <= 32 and len(ids) == len(e["tokens"]) == len(e["acts"]) == len(e["roles"])
        assert (ids // 1000 == e["context"]).all()  # never crosses a conversation
        assert ids[e["mark"]] == e["context"] * 1000 + e["pos"]  # the marked token is the sampled one
        assert e["acts"][e["mark"]] == pytest.approx(e["act"], abs=1e-4)
        np.testing.assert_allclose(e["acts"], a[(t.context == e["context"]) & np.isin(t.pos, ids % 1000)], atol=1e-4)
        # window bounds: before/after clipped at the conversation edges
        assert e["mark"] == min(24, e["pos"]) and len(ids) - e["mark"] - 1 == min(7, 39 - e["pos"])
    # top: the highest activations, distinct conversations, strongest first
    tops = [e["act"] for e in ex["top"]]
    assert tops == sorted(tops, reverse=True) and len({e["context"] for e in ex["top"]}) == 5
    assert tops[0] == pytest.approx(float(a.max()), abs=1e-4)
    # random: non-activating, from conversations where the latent never fires (odd contexts)
    assert len(ex["random"]) == 6 and all(e["act"] == 0 and e["context"] % 2 == 1 for e in ex["random"])
    assert all(max(e["acts"]) == 0 for e in ex["random"])
    # deterministic under the seed
    assert F.sample_examples(t, 2, seed=1)["quantiles"] == F.sample_examples(t, 2, seed=1)["quantiles"]


def test_quantile_sampling_edge_cases():
    t = synthetic_table()
    ex = F.sample_examples(t, 5)  # never fires
    assert ex["top"] == [] and ex["quantiles"] == [] and len(ex["random"]) == 10
    with pytest.raises(ValueError, match="not tracked"):
        F.sample_examples(t, 3)
    with pytest.raises(ValueError, match="n_bins=0"):
        F.sample_examples(t, 2, n_bins=0)
    # fewer firing tokens than bins: one bin per firing token
    acts = t.acts.copy()
    acts[:, 0] = 0
    acts[[3, 50, 90], 0] = [1.0, 2.0, 3.0]
    t2 = F.TokenTable(t.tokens, t.roles, t.turns, t.context, t.pos, t.latents, acts, t.fire_counts, t.act_sums,
                      t.role_tokens)
    ex2 = F.sample_examples(t2, 2, n_bins=10, per_bin=1)
    assert [e["bin"] for e in ex2["quantiles"]] == [0, 1, 2] and [e["act"] for e in ex2["quantiles"]] == [1.0, 2.0, 3.0]


def test_token_table_sorts_rows():
    t = synthetic_table(n_ctx=3, length=5)
    perm = np.random.default_rng(0).permutation(len(t))
    t2 = F.TokenTable(t.tokens[perm], t.roles[perm], t.turns[perm], t.context[perm], t.pos[perm], t.latents,
                      t.acts[perm], t.fire_counts, t.act_sums, t.role_tokens)
    np.testing.assert_array_equal(t2.tokens, t.tokens)
    assert t2.window(7, 24, 7) == (5, 10)
    with pytest.raises(ValueError, match="TokenTable.roles has 2 rows"):
        F.TokenTable(t.tokens, t.roles[:2], t.turns, t.context, t.pos, t.latents, t.acts, t.fire_counts, t.act_sums,
                     t.role_tokens)


def _fake_unembed_model(gain):
    embed = np.eye(4, 3, dtype=np.float32) * [1.0, 2.0, 3.0]  # vocab 4, d_model 3; token 3 is the zero vector
    cfg = types.SimpleNamespace(d_model=3, tie_embeddings=True, norm_offset=0.0)
    return types.SimpleNamespace(params={"embed": jnp.asarray(embed), "final_norm": jnp.asarray(gain, jnp.float32)},
                                 config=cfg, tokenizer=None)


def test_top_tokens_through_the_unembedding():
    m = _fake_unembed_model([1.0, 1.0, 0.1])
    W = np.array([[1.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    res = F.top_tokens(m, W, [0, 1], n=2, final_norm="none")
    assert [t["id"] for t in res[0]["positive"]] == [2, 0]  # logits 3, 1
    res_g = F.top_tokens(m, W, [0], n=2, final_norm="gain")
    assert [t["id"] for t in res_g[0]["positive"]] == [0, 2]  # gain 0.1 on dim 2: logits 1, 0.3
    assert res[1]["negative"][0]["id"] == 1 and res[1]["negative"][0]["logit"] == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="final_norm='raw'"):
        F.decoder_logits(m, W, final_norm="raw")
    with pytest.raises(ValueError, match="width 2"):
        F.decoder_logits(m, np.ones((1, 2)))


def test_build_records_fields():
    t = synthetic_table()
    recs = F.build_records(t, [2, 5], extra={2: {"found_by": "test", "cohens_d": 1.5}})
    r = recs[0]
    assert r["latent"] == 2 and r["ranking"]["found_by"] == "test"
    assert r["density"] == pytest.approx(t.fire_counts[:, 2].sum() / t.role_tokens.sum())
    assert r["role_rates"]["assistant"] == pytest.approx(t.fire_counts[3, 2] / t.role_tokens[3])
    assert r["role_rates"]["text"] is None and r["top_tokens"] is None and r["label"] is None
    assert r["n_firing_tokens"] == int((t.column(2) > 0).sum())
    kinds = [e["kind"] for e in r["examples"]]
    assert kinds.count("top") == 5 and kinds.count("quantile") == 20 and kinds.count("random") == 10
    assert recs[1]["n_firing_tokens"] == 0 and recs[1]["max_act"] == 0.0


def test_records_from_the_model_with_top_tokens():
    model = tiny_chat_model()
    sae = random_sae(bias=-0.1)
    col = F.collect(model, sae, convs("pos", 3) + convs("neg", 3), latents=[1, 2])
    recs = F.build_records(col.table, [1, 2], model=model, sae=sae, n_bins=4, per_bin=1, n_top=2, n_random=2)
    assert len(recs[0]["top_tokens"]["positive"]) == 10 and isinstance(recs[0]["top_tokens"]["positive"][0]["token"], str)
    ex = recs[0]["examples"][0]
    assert isinstance(ex["tokens"][0], str) and ex["tokens"][ex["mark"]] == model.tokenizer.decode([ex["token_ids"][ex["mark"]]])


def test_repeated_windows_are_shown_once():
    """Many conversations sharing one system prompt: the same window is never sampled twice."""
    n_ctx, length = 12, 20
    ctx = np.repeat(np.arange(n_ctx), length)
    pos = np.tile(np.arange(length), n_ctx)
    tokens = np.where(pos < 10, pos, 100 + ctx * 100 + pos).astype(np.int32)  # shared 10-token prefix
    acts = np.where(pos == 4, 5.0, 0.0).astype(np.float32)[:, None]  # fires on the shared prefix only
    acts[(ctx == 3) & (pos == 15)] = 1.0
    t = F.TokenTable(tokens=tokens, roles=np.full(len(ctx), 1, np.int8), turns=np.zeros(len(ctx), np.int32),
                     context=ctx, pos=pos.astype(np.int32), latents=np.array([0]), acts=acts,
                     fire_counts=np.zeros((F.N_ROLES, 1)), act_sums=np.zeros((F.N_ROLES, 1)), role_tokens=np.ones(F.N_ROLES))
    ex = F.sample_examples(t, 0, n_bins=2, per_bin=3, n_top=5, n_random=3, before=3, after=3)
    for kind in ("top", "quantiles", "random"):
        keys = [(e["mark"], tuple(e["token_ids"])) for e in ex[kind]]
        assert len(keys) == len(set(keys)), kind
    assert [e["act"] for e in ex["top"]] == [5.0, 1.0]
    top_keys = {(e["mark"], tuple(e["token_ids"])) for e in ex["top"]}
    assert all(e["split"] == "explain" for e in ex["quantiles"] if (e["mark"], tuple(e["token_ids"])) in top_keys)


class _FakeStore:
    """The slice of sae.data.store.ActivationStore that table_from_store reads."""

    def __init__(self, x, meta, key, chunk=25):
        self.path, self.sites_layers, self._key = "fake", [key], key
        self._x, self._meta, self._chunk = x, meta, chunk
        self.chunks = list(range(0, len(x), chunk))

    def read_chunk(self, i, keys=None):
        s = slice(self.chunks[i], self.chunks[i] + self._chunk)
        out = {self._key: self._x[s]}
        out.update({k: v[s] for k, v in self._meta.items()})
        return out


def test_table_from_store_matches_direct_encoding():
    sae = random_sae(bias=-0.2)
    rng = np.random.default_rng(0)
    n = 60
    x = rng.normal(size=(n, 16)).astype(np.float32)
    meta = {"tokens": np.arange(n, dtype=np.int32), "roles": rng.integers(0, 4, n).astype(np.int8),
            "turns": np.zeros(n, np.int32), "context": np.repeat(np.arange(3), 20).astype(np.int64),
            "pos": np.tile(np.arange(20), 3).astype(np.int32)}
    t = F.table_from_store(_FakeStore(x, meta, ("resid_post", LAYER)), sae, [4, 9])
    f = sae.encode(x)
    np.testing.assert_allclose(t.acts, f[:, [4, 9]], atol=1e-5)
    for r in range(4):
        np.testing.assert_allclose(t.fire_counts[r], (f[meta["roles"] == r] > 0).sum(0))
    assert t.window(25, 24, 7) == (20, 33)
    with pytest.raises(ValueError, match="the SAE reads"):
        F.table_from_store(_FakeStore(x, meta, ("resid_post", 0)), sae, [4])


# ------------------------------------------------------------------------------------------ feature steering


def test_row_add_edit_matches_one_add_per_row():
    """One forward with a vector per batch row equals one forward per row with that row's `E.add`."""
    from psm_jax.model import jit_forward
    from psm_jax.persona.steering import row_add_edit

    model = tiny_chat_model()
    cfg = model.config
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1000, size=(3, 7)).astype(np.int32)
    vecs = rng.normal(size=(3, cfg.d_model)).astype(np.float32) * 3
    vecs[1] = 0.0  # a zero row is the unsteered model
    batched = np.asarray(jit_forward(model.params, cfg, tokens, edits=(row_add_edit(cfg, LAYER, vecs),)).logits)
    for b in range(3):
        one = jit_forward(model.params, cfg, tokens[b:b + 1], edits=(E.add(cfg, vecs[b], layers=[LAYER]),)).logits
        np.testing.assert_allclose(batched[b], np.asarray(one)[0], atol=1e-4)
    plain = np.asarray(jit_forward(model.params, cfg, tokens[1:2]).logits)[0]
    np.testing.assert_allclose(batched[1], plain, atol=1e-4)
    assert np.abs(batched[0] - np.asarray(jit_forward(model.params, cfg, tokens[:1]).logits)[0]).max() > 1e-3
    with pytest.raises(ValueError, match="expected \\[batch, d_model=16\\]"):
        row_add_edit(cfg, LAYER, vecs[0])


def test_choose_strength_band_and_z_on_a_planted_null():
    from experiments import feature_steering as fs

    ch = fs.common_strength([0.25, 0.5, 1.0], [[1.1, 1.4, 3.0], [1.0, 1.2, 1.3]], 1.5)  # latent, vector
    assert ch == {"strength": 0.5, "ppl_ratios": [1.4, 1.2], "within_ceiling": True}
    ch = fs.common_strength([1.0, 0.5], [[1.4, 1.2], [2.0, 1.6]], 1.5)
    assert ch["strength"] == 0.5 and not ch["within_ceiling"]
    with pytest.raises(ValueError, match="ratios have 1 columns for 2 strengths"):
        fs.common_strength([0.5, 1.0], [[1.0]], 1.5)
    null = np.random.default_rng(1).normal(0.0, 0.1, size=24)  # planted: random directions do nothing
    band, z = fs.band_z(0.5, null)  # ... and the latent moves the score by 0.5
    assert band["n"] == 24 and band["low"] < 0 < band["high"] and band["high"] < 0.5
    assert z == pytest.approx((0.5 - null.mean()) / null.std(ddof=1)) and z > 3
    _, z_in = fs.band_z(float(null.mean()), null)
    assert abs(z_in) < 1e-9
    null_nan = np.concatenate([null[:19], [np.nan] * 5])  # fewer than 20 finite draws: no band
    assert fs.band_z(0.5, null_nan)[0] is None and np.isnan(fs.band_z(0.5, null_nan)[1])
    eff = fs.paired_unit_effect(np.array([1.0, np.nan, 3.0]), np.array([0.0, 1.0, 1.0]), seed=0)
    assert eff["n"] == 2 and eff["estimate"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="n_random=5; expected >= 20"):
        fs.Config(n_random=5)
    with pytest.raises(ValueError, match="strengths=\\(0.0, 0.5\\)"):
        fs.Config(strengths=(0.0, 0.5))


def _steering_inputs(model):
    sae = random_sae(d_sae=48, bias=-0.1, layer=LAYER)
    cand = {"sae": {"layer": LAYER}, "traits": {"evil": {"best": 3, "candidates": [3, 7], "max_act": 1.5}}}
    dirs = {"evil": np.random.default_rng(2).normal(size=model.config.d_model).astype(np.float32)}
    return cand, dirs, sae


def _fixed_ppl_docs(n, seed, max_chars):
    prompts = [[{"role": "user", "content": q}] for q in ("How do I cook rice?", "Explain gravity.")][:n]
    return prompts, ["Rinse the rice, then simmer it.", "Masses attract each other."][:n]


@pytest.mark.slow  # the whole feature-steering study on a tiny model
def test_feature_steering_is_pure_gated_and_records(tmp_path, monkeypatch):
    """The ci-size study on the tiny model: `run` writes nothing (read-only working directory), the random band has
    n_random draws, the evidence gate follows the measure's validity, `report` writes the folder and the records
    carry their fields."""
    import json
    import os

    from experiments import feature_steering as fs
    from experiments.feature_steering import pipeline as fs_pipeline

    model = tiny_chat_model()
    monkeypatch.setattr(fs_pipeline, "ppl_docs", _fixed_ppl_docs)  # the ShareGPT slice, without loading the corpus
    cfg = fs.Config(model="tiny", **{**fs.PRESETS["ci"], "two_choice": True})
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.chdir(ro)
    os.chmod(ro, 0o555)
    try:
        res = fs.run(cfg, model, features=_steering_inputs(model))
    finally:
        os.chmod(ro, 0o755)
    assert list(ro.iterdir()) == []
    r = res.trait_results["evil"]
    best = r["edits"][r["best"]]
    assert r["best"] == "latent 3" and set(r["edits"]) == {"latent 3", "persona vector"}
    assert len(r["random_effects"]) == cfg.n_random and best["band"]["n"] >= 20 and best["strength"] == 0.5
    assert np.isfinite(best["z"]) and best["effect"]["n"] >= 1 and r["validity"]["n"] <= cfg.n_questions
    assert "z" not in r["two_choice"] or r["two_choice"]["validity"]["valid"]  # no band for an invalid measure
    for valid in (False, True):
        r["validity"]["valid"] = valid
        (line,) = fs.records(res)
        assert line["evidence"] is valid and line["measure_valid"] is valid
    for k in ("metric", "value", "unit", "reference", "target", "key", "effect", "effect_low", "effect_high", "n",
              "vector_z", "measure", "n_random"):
        assert k in line, k
    assert line["metric"] == "feature_steering_effect_z" and line["key"] == "evil" and line["value"] == best["z"]
    assert res.sae_layer == res.default_sae_layer  # a run at another layer keys its rows by that layer
    moved = dataclasses.replace(res, sae_layer=res.sae_layer + 1)
    assert fs.records(moved)[0]["key"] == f"evil/L{res.sae_layer + 1}"
    assert line["effect_low"] <= line["effect"] <= line["effect_high"] and line["n_random"] == cfg.n_random
    assert line["ci"] == [line["effect_low"], line["effect_high"]] and "questions" in line["ci_of"]
    assert line["null"].startswith(f"{cfg.n_random} random directions") or line["null"].startswith("none: ")
    r["validity"]["valid"] = False
    path = fs.report(res, tmp_path / "fs")
    text = path.read_text()
    assert "not evidence (measure NOT valid)" in text and "NOT valid (system-prompt effect" in text
    m = json.loads((tmp_path / "fs" / "metrics.json").read_text())
    assert m["traits"]["evil"]["evidence"] is False and (tmp_path / "fs" / "steering_band.png").is_file()
    r["two_choice"] = None
    assert "Not run at this size (`two_choice=False`)" in fs.report(res, tmp_path / "fs2").read_text()


def test_feature_steering_skips_the_two_choice_items_when_asked(monkeypatch):
    """two_choice=False (the quick preset) never evaluates the secondary items measure."""
    from experiments import feature_steering as fs
    from experiments.feature_steering import pipeline as fs_pipeline
    from experiments.feature_steering import trait as fs_trait

    model = tiny_chat_model()
    monkeypatch.setattr(fs_pipeline, "ppl_docs", _fixed_ppl_docs)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the two-choice block ran with two_choice=False")

    monkeypatch.setattr(fs_trait, "two_choice_block", must_not_run)
    res = fs.run(fs.Config(model="tiny", **{**fs.PRESETS["ci"], "two_choice": False}), model,
                 features=_steering_inputs(model))
    assert res.trait_results["evil"]["two_choice"] is None and fs.PRESETS["quick"]["two_choice"] is False


# ------------------------------------------------------------------------------------------ persona features


def test_persona_features_sae_step(tmp_path):
    """`prepare` leaves a config that names an SAE alone; `run` without an SAE names the missing step. (The unit-level
    effect and the cosine band: tests/test_features_discovery.py.)"""
    from experiments import persona_features as pf

    model = tiny_chat_model()
    cfg = pf.Config(model="tiny", sae=str(tmp_path / "given"))
    assert pf.prepare(cfg, model) is cfg
    with pytest.raises(ValueError, match="sae=None: no SAE to read; run `prepare"):
        pf.load_sae(model, pf.Config(model="tiny"))
    with pytest.raises(ValueError, match="n_shuffles=5; expected >= 20"):
        pf.Config(n_shuffles=5)


@pytest.mark.slow
def test_persona_features_run_is_pure_and_feeds_feature_steering(tmp_path, monkeypatch):
    """Both studies end to end on the tiny model with a random SAE: `run` writes nothing, `report` writes the
    folder (browser, candidates, directions) that feature steering reads."""
    import json
    import os

    from experiments import feature_steering as fs
    from experiments.feature_steering import pipeline as fs_pipeline
    from experiments import persona_features as pf
    from sae.features.label import read_jsonl

    model = tiny_chat_model()
    sae = random_sae(d_sae=48, bias=-0.1, layer=2)
    cfg = pf.Config(model="tiny", **{**pf.PRESETS["quick"], "traits": ("evil", "humorous"), "n_pairs": 2,
                                     "n_questions": 4, "n_samples": 1,
                                     "max_new_tokens": 6, "context_docs": 3, "context_max_len": 48, "batch_size": 8,
                                     "diff": True, "diff_layer_offset": 1, "max_detect": 2,
                                     "sae_cache": str(tmp_path / "cache")})
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.chdir(ro)
    os.chmod(ro, 0o555)
    try:
        res = pf.run(cfg, model, sae=sae)
    finally:
        os.chmod(ro, 0o755)
    assert list(ro.iterdir()) == [] and not (tmp_path / "cache").exists()
    out = tmp_path / "pf"
    pf.report(res, out)
    for name in ("report.md", "metrics.json", "config.json", "candidates.json", "latents.jsonl", "features.html",
                 "persona_directions.safetensors", "contrast_halves.png"):
        assert (out / name).is_file(), name
    recs = read_jsonl(out / "latents.jsonl")
    assert len(recs) == len(res.latent_records) and all(r["sae"]["layer"] == 2 for r in recs)
    cand = json.loads((out / "candidates.json").read_text())
    assert set(cand["traits"]) == {"evil", "humorous"} and cand["persona_latents"]
    spec = cand["traits"]["evil"]["specific"]
    assert spec["best"] in spec["candidates"] and set(spec["candidates"]) <= set(cand["persona_latents"])
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["contrasts"]) == {"evil", "humorous", "role-vs-default"}
    assert m["contrasts"]["evil"]["specific"]["best_latent"] == spec["best"]
    lines = pf.records(res)
    assert [ln["metric"] for ln in lines] == ["persona_latents_found", "persona_specific_latents_found"] * 2 + [
        "persona_latents_found"]
    assert all(ln["n_unit"] == "validation questions" and ln["null_band_high"] is not None for ln in lines)
    assert res.default_layer == 1  # the tiny model's middle layer; this SAE reads layer 2, so its rows say so
    assert [ln["key"] for ln in lines] == ["evil/L2", "evil/L2", "humorous/L2", "humorous/L2", "role-vs-default/L2"]
    assert all(ln["null"].startswith("pos/neg labels shuffled") for ln in lines)
    assert all(ln["ci"][0] <= ln["best_effect"] <= ln["ci"][1] for ln in lines if "ci" in ln)
    assert set(lines[-1]["best_d_validation_other_traits"]) == {"evil", "humorous"}
    assert lines[1]["best_latent"] == spec["best"] and set(lines[1]["best_d_validation_other_traits"]) == {"humorous"}
    text = (out / "report.md").read_text()
    assert "## Specificity of the best latents" in text and "## Trait-specific latents" in text

    monkeypatch.setattr(fs_pipeline, "ppl_docs", _fixed_ppl_docs)
    dirs, _ = fs.read_directions(out, width=model.config.d_model)
    r2 = fs.run(fs.Config(model="tiny", features=str(out), traits=("evil",), **fs.PRESETS["ci"]), model,
                features=(cand, dirs, sae))
    assert r2.trait_results["evil"]["latents"][0] == cand["traits"]["evil"]["best"]
    r3 = fs.run(fs.Config(model="tiny", features=str(out), traits=("evil",), ranking="specific", **fs.PRESETS["ci"]),
                model, features=(cand, dirs, sae))
    assert r3.trait_results["evil"]["latents"][0] == spec["best"]
    (line,) = fs.records(r3)
    assert line["key"] == "evil/specific/L2" and line["ranking"] == "specific"


def test_specificity_text_names_latents_shared_between_traits():
    """The report's reading of `latent_specificity` (its numbers: tests/test_features_discovery.py)."""
    from experiments.persona_features import report_text as pfr
    from sae.features.discovery import latent_specificity

    d = {"evil": np.array([0.9, 0.1, 0.6]), "humorous": np.array([0.2, 1.0, 0.7]),
         "sycophantic": np.array([0.1, 0.2, 0.8]), "role-vs-default": np.array([0.0, 0.3, 1.2])}
    best = {"evil": 0, "humorous": 1, "sycophantic": 2, "role-vs-default": 2}
    spec = latent_specificity(d, best, ["evil", "humorous", "sycophantic"], d_replicate=0.5)
    per = {n: {"best_latent": best[n], "best_shared_with": spec[n]["shared_with"],
               "best_specific": spec[n]["specific"]} for n in best}
    text = pfr.specificity_text(per, 0.5)
    assert "Latent 2 is the best latent of sycophantic, role-vs-default" in text
    assert "Latent 0 (evil) separates no other trait" in text and "not specific" not in text
    d["evil"][1] = 1.1  # now latent 1 separates evil better than humorous: not humorous-specific
    spec = latent_specificity(d, best, ["evil", "humorous", "sycophantic"], 0.5)
    assert spec["humorous"]["specific"] is False and spec["humorous"]["shared_with"] == ["evil"]
    per["humorous"].update(best_shared_with=["evil"], best_specific=False)
    assert ("Latent 1 (humorous) also separates evil (validation d >= 0.5). Its validation d on another trait is above "
            "its own: it is not specific to humorous.") in pfr.specificity_text(per, 0.5)


def test_sae_cache_dirs_change_with_every_field_that_shapes_the_sae():
    """Another model, token budget or width never finds the cached harvest or SAE of a different config; the same
    config always does."""
    from experiments import persona_features as pf

    cfg = pf.Config(sae_cache="cache")
    assert pf.sae_run_dir(cfg, 15) == pf.sae_run_dir(pf.Config(sae_cache="cache"), 15)
    assert pf.sae_store_dir(cfg, 15) == pf.sae_store_dir(dataclasses.replace(cfg, d_sae=9216), 15)
    for change in (dict(model="other"), dict(train_tokens=1_000_000), dict(context_len=128), dict(seed=1),
                   dict(train_role_prompts=0.5)):
        other = dataclasses.replace(cfg, **change)
        assert pf.sae_store_dir(other, 15) != pf.sae_store_dir(cfg, 15), change
        assert pf.sae_run_dir(other, 15) != pf.sae_run_dir(cfg, 15), change
    for change in (dict(d_sae=9216), dict(k=64), dict(train_batch=2048)):
        assert pf.sae_run_dir(dataclasses.replace(cfg, **change), 15) != pf.sae_run_dir(cfg, 15), change
    assert pf.sae_run_dir(cfg, 14) != pf.sae_run_dir(cfg, 15)


def test_sae_training_role_prompts_leave_out_the_role_contrast_and_the_assistant():
    """The role-play prompts mixed into the SAE's training data never include a prompt of a role the study's role
    contrast uses, nor the default assistant's; every other role's instructions are there."""
    from experiments import persona_features as pf
    from experiments.persona_features import report_text as pfr
    from psm_jax.persona import datasets
    from psm_jax.persona.prompts import select_roles

    cfg = pf.Config(n_roles=8, seed=3)
    roles = datasets.load_roles().roles
    contrast = {r.name for r in select_roles(roles, 8, 3)}
    prompts = set(pf.training_role_prompts(cfg))
    for r in roles:
        inside = {i in prompts for i in r.instructions}
        assert inside == {r.name != "assistant" and r.name not in contrast}, r.name
    corpus = pf.training_corpus(dataclasses.replace(cfg, train_docs=400, train_role_prompts=0.25))
    mix = corpus.report.options["system_prompts"]
    assert mix["fraction"] == 0.25 and mix["n_prompts"] == len(pf.training_role_prompts(cfg))
    opened = [d[0]["content"] for d in corpus if d[0]["role"] == "system"]
    assert len(opened) == mix["applied"] and 60 <= len(opened) <= 140 and set(opened) <= prompts
    assert pfr._role_mix_text(mix | {"n_prompts": 600}).startswith("; 25% of the conversations under a role-play")
    assert "system_prompts" not in pf.training_corpus(dataclasses.replace(cfg, train_docs=50)).report.options
    with pytest.raises(ValueError, match="train_role_prompts=1.5"):
        pf.Config(train_role_prompts=1.5)


@pytest.mark.slow
def test_persona_features_prepare_trains_once_into_the_cache(tmp_path):
    """`prepare` trains the SAE under sae_cache and points the config at it; `load_sae` reads it with its training
    facts; a second `prepare` reuses the cache."""
    from experiments import persona_features as pf

    model = tiny_chat_model()
    cfg = pf.Config(model="tiny", sae_cache=str(tmp_path / "cache"), train_tokens=2000, train_docs=20, train_steps=5,
                    train_batch=256, d_sae=32, k=4, context_len=64)
    prepared = pf.prepare(cfg, model)
    assert prepared.sae == str(pf.sae_run_dir(cfg, 1)) and prepared.layer == 1
    sae, info = pf.load_sae(model, prepared)
    assert sae.layer == 1 and sae.d_sae == 32 and info["trained_here"] and info["steps"] == 5
    assert pf.prepare(cfg, model) == prepared


def test_trait_specific_blocks_and_their_null():
    """The study's trait-specific blocks on planted d arrays (latent 1 is evil's own, 4 humorous's; the ranking
    itself: tests/test_features_discovery.py): with evil's labels shuffled nothing is found, the best latent's
    unit-level effect is read from its validation questions, one trait gives no blocks."""
    from experiments import persona_features as pf
    from experiments.persona_features import metrics as pf_metrics

    nan = float("nan")
    d_disc = {"evil": np.array([1.5, 1.0, nan, 0.5, 0.1]), "humorous": np.array([1.4, 0.1, nan, 0.0, 1.2]),
              "sycophantic": np.array([1.3, 0.1, nan, 0.0, 0.2])}
    d_val = {"evil": np.array([1.0, 0.8, nan, 0.6, 0.0]), "humorous": np.array([1.2, 0.2, nan, 0.0, 0.9]),
             "sycophantic": np.array([1.1, 0.2, nan, 0.0, 0.1])}
    rng = np.random.default_rng(0)
    mean = np.zeros((8, 5))
    mean[:, 1] = [3, 1, 0, 0, 5, 3, 1, 1]
    rows = [{"group": g, "question": q, "split": "validation"} for q in (0, 1) for g in ("pos", "pos", "neg", "neg")]
    stats = F.ConversationStats(mean, mean > 0, np.ones(8, int), np.zeros((8, 3)))
    results = {t: {"d_discovery": d_disc[t], "d_validation": d_val[t], "stats": stats, "rows": rows,
                   "shuffled": [{"d_discovery": rng.normal(0, 0.1, 5), "d_validation": rng.normal(0, 0.1, 5)}
                                for _ in range(20)]} for t in d_disc}
    blocks = pf.specific_blocks(results, pf.Config(n_candidates=3))
    assert blocks["evil"]["found"] == [1] and blocks["evil"]["null_found"] == [0] * 20
    assert blocks["evil"]["null_band"]["high"] == 0
    assert blocks["evil"]["best_effect_validation"]["estimate"] == pytest.approx(2.5)  # latent 1's unit effect
    assert pf.specific_blocks({"evil": results["evil"]}, pf.Config()) == {}
    summary = pf_metrics._specific_summary(blocks["humorous"])
    assert summary["best_latent"] == 4 and summary["best_is_found"]
    assert summary["best_d_validation_other_traits"] == {"evil": 0.0, "sycophantic": pytest.approx(0.1)}


def test_feature_steering_reads_the_ranking_it_is_given():
    """ranking=contrast steers the features run's contrast ranking, ranking=specific its trait-specific ranking;
    a run without one names what is missing; an unknown ranking is refused."""
    from experiments import feature_steering as fs

    info = {"best": 7, "candidates": [7, 3, 5], "max_act": 2.0,
            "specific": {"best": 11, "candidates": [11, 7], "max_act": 4.0}}
    assert fs.top_latents(fs.ranked_info(info, "contrast", "evil"), 2) == [7, 3]
    spec = fs.ranked_info(info, "specific", "evil")
    assert fs.top_latents(spec, 3) == [11, 7] and spec["max_act"] == 4.0
    with pytest.raises(ValueError, match="no trait-specific ranking for 'evil'"):
        fs.ranked_info({"best": 7, "candidates": [7]}, "specific", "evil")
    with pytest.raises(ValueError, match="ranking='margin'; expected one of"):
        fs.Config(ranking="margin")
