"""sae.data: chat tokenisation with role/turn masks, harvest, shuffle buffer, on-disk store."""
import json
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae import data as A
from sae.data import store as S
from sae.data.contexts import ActivationError, TokenFilter, batch_contexts, encode_documents
from sae.data.harvest import harvest, stream_batches
from sae.data.store import ActivationStore, ChunkError, harvest_to_store

T = 16  # context length of every test here
BOS, EOT, PAD = 1, 2, 0
ROLE_TOK = {"system": 3, "user": 4, "assistant": 5}


def fake_encode(doc) -> A.Encoded:
    """A tiny chat template: <bos> then per message <role> content... <eot>; roles/turns as in chat.py."""
    if isinstance(doc, str):
        ids = [BOS] + [10 + (ord(c) % 200) for c in doc]
        return A.Encoded(np.array(ids, np.int32), np.full(len(ids), A.ROLE_TEXT, np.int8), np.zeros(len(ids), np.int32))
    toks, roles, turns = [BOS], [A.ROLE_TEMPLATE], [0]
    for i, m in enumerate(doc):
        r = A.ROLE_NAMES[m["role"]]
        body = [10 + (ord(c) % 200) for c in m["content"]]
        toks += [ROLE_TOK[m["role"]]] + body + [EOT]
        roles += [A.ROLE_TEMPLATE] + [r] * len(body) + [A.ROLE_TEMPLATE]
        turns += [i] * (len(body) + 2)
    return A.Encoded(np.array(toks, np.int32), np.array(roles, np.int8), np.array(turns, np.int32))


class FakeTokenizer:
    bos_token_id = BOS
    pad_token_id = PAD
    eos_token_id = EOT
    all_special_ids = [PAD, BOS, EOT]


DOCS = [
    [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"}],
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a long answer"}],
    [{"role": "user", "content": "x" * 30}, {"role": "assistant", "content": "y" * 5}],
    "plain text document",
    [{"role": "user", "content": "u"}, {"role": "assistant", "content": "abcdefghijklmnopqrstuvwxyz"}],
    [{"role": "user", "content": "short"}],
    [{"role": "user", "content": "more"}, {"role": "assistant", "content": "words here"}],
]


def test_modes_roles_turns_and_doc_ids():
    rows = list(encode_documents(DOCS, T, fake_encode, mode="truncate"))
    assert [r.index for r in rows] == list(range(len(DOCS)))
    full = [fake_encode(d) for d in DOCS]
    for r, e in zip(rows, full):
        assert len(r.tokens) == min(T, len(e.tokens))
        np.testing.assert_array_equal(r.roles, e.roles[:T])
        np.testing.assert_array_equal(r.turns, e.turns[:T])
    split = list(encode_documents(DOCS, T, fake_encode, mode="split"))
    assert sum(len(r.tokens) for r in split) == sum(len(e.tokens) for e in full)
    assert all(len(np.unique(r.doc_ids)) == 1 for r in split)
    pack = list(encode_documents(DOCS, T, fake_encode, mode="pack"))
    assert all(len(r.tokens) == T for r in pack[:-1])
    cat = np.concatenate([r.tokens for r in pack])
    np.testing.assert_array_equal(cat, np.concatenate([e.tokens for e in full]))
    assert len(np.unique(np.concatenate([r.doc_ids for r in pack]))) == len(DOCS)
    # resume: rows from start_context on are identical
    for mode in ("truncate", "split", "pack"):
        allr = list(encode_documents(DOCS, T, fake_encode, mode=mode))
        tail = list(encode_documents(DOCS, T, fake_encode, mode=mode, start_context=3))
        assert [r.index for r in tail] == [r.index for r in allr if r.index >= 3]
        for a, b in zip([r for r in allr if r.index >= 3], tail):
            np.testing.assert_array_equal(a.tokens, b.tokens)


def test_batches_padding_and_token_filters():
    rows = list(encode_documents(DOCS, T, fake_encode))
    b = next(batch_contexts(rows, 4, T, PAD, TokenFilter(skip_first=0, exclude_bos=False)))
    assert b.tokens.shape == (4, T) and b.n_rows == 4 and b.context_end == 4
    n0 = len(rows[0].tokens)
    assert not b.attention_mask[0, :T - n0].any() and b.attention_mask[0, T - n0:].all()  # left padding
    assert (b.roles[0, :T - n0] == A.ROLE_PAD).all() and (b.turns[0, :T - n0] == A.TURN_PAD).all()
    np.testing.assert_array_equal(b.keep, b.attention_mask)
    asst = next(batch_contexts(rows, 4, T, PAD, TokenFilter(roles=("assistant",))))
    assert asst.keep.any() and (asst.roles[asst.keep] == A.ROLE_ASSISTANT).all()
    assert asst.keep.sum() == ((b.roles == A.ROLE_ASSISTANT)).sum()
    f = TokenFilter(exclude_template=True, exclude_bos=True, skip_first=2)
    c = next(batch_contexts(rows, 4, T, PAD, f, bos_id=BOS))
    assert not (c.roles[c.keep] == A.ROLE_TEMPLATE).any() and not (c.tokens[c.keep] == BOS).any()
    assert not c.keep[:, :T - n0 + 2][0].any()
    # partial last batch: filler rows keep nothing but have one attended position
    last = list(batch_contexts(rows, 4, T, PAD, TokenFilter()))[-1]
    assert last.n_rows == 3 and not last.keep[3].any() and last.attention_mask[3].sum() == 1
    with pytest.raises(ActivationError, match="unknown role"):
        TokenFilter(roles=("narrator",))


def test_role_and_turn_ids_match_psm_jax_chat():
    from psm_jax import chat

    assert {n: int(getattr(chat.Role, n.upper())) for n in ("template", "system", "user", "assistant")} == \
        {n: A.ROLE_NAMES[n] for n in ("template", "system", "user", "assistant")}
    assert A.ROLE_TEXT not in {int(r) for r in chat.Role}
    assert (chat.ROLE_PAD, chat.TURN_PAD, chat.TURN_AFTER, chat.TURN_DEFAULT_SYSTEM) == \
        (A.ROLE_PAD, A.TURN_PAD, A.TURN_AFTER, A.TURN_DEFAULT_SYSTEM)


# ---------------------------------------------------------------------------------------------
# harvest on a tiny random Llama


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from psm_jax.loading.hf import load_hf_dir
    from tests import tiny_models

    d = tmp_path_factory.mktemp("tiny_llama")
    tiny_models.save("llama", d)
    params, config = load_hf_dir(d)
    return types.SimpleNamespace(params=params, config=config, tokenizer=FakeTokenizer(), source=str(d))


PAIRS = [("resid_post", 1), ("mlp_out", 0), ("q", 2)]


def test_harvest_equals_forward_capture(tiny_model):
    from psm_jax.model import Capture, jit_forward

    m = tiny_model
    filt = TokenFilter(roles=("assistant", "text"))
    got = list(harvest(m, DOCS, PAIRS, context_len=T, batch_size=4, token_filter=filt, encode=fake_encode))
    assert [g.context_end for g in got] == [4, 7]
    rows = list(encode_documents(DOCS, T, fake_encode))
    for g, cb in zip(got, batch_contexts(rows, 4, T, PAD, filt, bos_id=BOS, special_ids=FakeTokenizer.all_special_ids)):
        out = jit_forward(m.params, m.config, cb.tokens, attention_mask=cb.attention_mask,
                          capture=Capture(sites=("resid_post", "mlp_out", "q"), layers=(0, 1, 2)))
        keep = cb.keep
        assert len(g) == keep.sum() > 0
        assert set(g.roles.tolist()) <= {A.ROLE_ASSISTANT, A.ROLE_TEXT}
        np.testing.assert_array_equal(g.roles, cb.roles[keep])
        np.testing.assert_array_equal(g.turns, cb.turns[keep])
        np.testing.assert_array_equal(g.tokens, cb.tokens[keep])
        np.testing.assert_array_equal(g.doc_ids, cb.doc_ids[keep])
        np.testing.assert_array_equal(g.context, np.broadcast_to(cb.context[:, None], keep.shape)[keep])
        for site, layer in PAIRS:
            ref = np.asarray(out.captured[site][layer])
            ref = ref.reshape(ref.shape[0], T, -1)[keep]
            assert g.acts[(site, layer)].dtype == np.float32
            np.testing.assert_allclose(g.acts[(site, layer)], ref, rtol=1e-5, atol=1e-5)
    # the model cut after the deepest layer gives the same activations
    full = list(harvest(m, DOCS, PAIRS, context_len=T, batch_size=4, token_filter=filt, encode=fake_encode,
                        truncate_layers=False))
    for a, b in zip(got, full):
        for k in PAIRS:
            np.testing.assert_allclose(a.acts[k], b.acts[k], rtol=1e-6, atol=1e-6)


def test_harvest_errors(tiny_model):
    with pytest.raises(ActivationError, match="out of range"):
        list(harvest(tiny_model, DOCS, [("resid_post", 3)], context_len=T, encode=fake_encode))
    with pytest.raises(ActivationError, match="unknown site"):
        list(harvest(tiny_model, DOCS, [("resid", 0)], context_len=T, encode=fake_encode))
    with pytest.raises(ActivationError, match="empty"):
        list(harvest(tiny_model, [], [("resid_post", 0)], context_len=T, encode=fake_encode))


def test_shuffle_buffer_is_a_seeded_permutation():
    buf = A.ShuffleBuffer(capacity=32, batch_size=8, seed=5)
    out = []
    for s in range(0, 100, 10):
        out += list(buf.add({"x": np.arange(s, s + 10), "y": -np.arange(s, s + 10)}))
    out += list(buf.drain())
    got = np.concatenate([b["x"] for b in out])
    assert len(got) == 96 and len(np.unique(got)) == 96  # each row at most once, partial tail dropped
    assert all((b["y"] == -b["x"]).all() for b in out)  # rows stay aligned across keys
    assert not (got == np.sort(got)).all()
    buf2 = A.ShuffleBuffer(capacity=32, batch_size=8, seed=5)
    again = []
    for s in range(0, 100, 10):
        again += list(buf2.add({"x": np.arange(s, s + 10), "y": -np.arange(s, s + 10)}))
    again += list(buf2.drain())
    np.testing.assert_array_equal(got, np.concatenate([b["x"] for b in again]))


def test_stream_batches_and_replay(tiny_model):
    kw = dict(context_len=T, forward_batch_size=2, mode="split", encode=fake_encode, token_filter=TokenFilter(skip_first=0))
    s = list(stream_batches(tiny_model, DOCS, PAIRS[:2], 16, buffer_size=48, seed=1, **kw))
    assert len(s) >= 3 and all(len(b) == 16 for b, _ in s)
    assert s[-1][1]["batches"] == len(s)
    tail = list(stream_batches(tiny_model, DOCS, PAIRS[:2], 16, buffer_size=48, seed=1, start_batch=2, **kw))
    assert len(tail) == len(s) - 2
    for (a, _), (b, _) in zip(s[2:], tail):
        np.testing.assert_array_equal(a.acts[("resid_post", 1)], b.acts[("resid_post", 1)])
        np.testing.assert_array_equal(a.roles, b.roles)


# ---------------------------------------------------------------------------------------------
# on-disk store


def _harvest_store(m, path, **kw):
    base = dict(context_len=T, batch_size=2, mode="split", chunk_tokens=40, encode=fake_encode,
                token_filter=TokenFilter(skip_first=0))
    return harvest_to_store(m, DOCS, path, PAIRS[:2], **{**base, **kw})


def test_store_round_trip_and_cursor(tiny_model, tmp_path):
    st = _harvest_store(tiny_model, tmp_path / "s")
    ref = A.ActivationBatch.concat(list(harvest(tiny_model, DOCS, PAIRS[:2], context_len=T, batch_size=2,
                                                mode="split", encode=fake_encode, token_filter=TokenFilter(skip_first=0))))
    assert st.complete and st.n_tokens == len(ref) and len(st.chunks) > 2
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert man["d"] == {"resid_post.1": 64, "mlp_out.0": 64} and man["context_len"] == T
    back = [st.read_chunk(i) for i in range(len(st.chunks))]
    for k in PAIRS[:2]:
        np.testing.assert_array_equal(np.concatenate([b[k] for b in back]), ref.acts[k])
    for f in A.META_FIELDS:
        np.testing.assert_array_equal(np.concatenate([b[f] for b in back]), getattr(ref, f))
    assert st.d("resid_post", 1) == 64
    st.verify()

    # one epoch covers every row once (the partial tail is dropped); rows stay aligned with metadata
    bs = 16
    ep = list(st.iter_batches(PAIRS[:2], bs, seed=7, epochs=1, window_chunks=2))
    assert len(ep) == st.n_tokens // bs
    seen = [(c, p) for b, _ in ep for c, p in zip(b.context.tolist(), b.pos.tolist())]
    assert len(set(seen)) == len(seen)
    idx = {cp: i for i, cp in enumerate(zip(ref.context.tolist(), ref.pos.tolist()))}
    for b, _ in ep:
        i = [idx[cp] for cp in zip(b.context.tolist(), b.pos.tolist())]
        for k in PAIRS[:2]:
            np.testing.assert_array_equal(b.acts[k], ref.acts[k][i])
        np.testing.assert_array_equal(b.tokens, ref.tokens[i])
        np.testing.assert_array_equal(b.roles, ref.roles[i])

    # cursor save/restore gives exactly the same continuation, across epochs
    it = st.batches("resid_post", 1, bs, seed=7, window_chunks=2)
    seq = [next(it) for _ in range(2 * len(ep) + 3)]
    for cut in (1, len(ep) - 1, len(ep), len(ep) + 2):
        cursor = json.loads(json.dumps(seq[cut - 1][1]))
        resumed = st.batches("resid_post", 1, bs, seed=7, start_cursor=cursor, window_chunks=2)
        for want, (got, cur) in zip(seq[cut:], resumed):
            np.testing.assert_array_equal(want[0], got)
            assert want[1] == cur
    assert not np.array_equal(seq[0][0], next(st.batches("resid_post", 1, bs, seed=8))[0])
    no_prefetch = st.batches("resid_post", 1, bs, seed=7, window_chunks=2, prefetch=False)
    for want, (got, cur) in zip(seq, no_prefetch):
        np.testing.assert_array_equal(want[0], got)

    b, _ = next(st.iter_batches(PAIRS[:2], 8, with_meta=False))
    assert len(b) == 8 and len(b.roles) == 0

    # role-filtered stream keeps only those roles
    b, _ = next(st.iter_batches([("resid_post", 1)], 4, roles=["assistant"]))
    assert (b.roles == A.ROLE_ASSISTANT).all()


def test_store_resume_after_crash(tiny_model, tmp_path):
    ref = _harvest_store(tiny_model, tmp_path / "ref")
    _harvest_store(tiny_model, tmp_path / "s")
    # what a crash after chunk 1 was renamed leaves: a manifest listing chunk 0 only, an unlisted chunk 1
    # (here with garbage), a half-built chunk 2, a temporary manifest
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    first = man["chunks"][0]
    man.update(chunks=[first], n_tokens=first["n_tokens"], n_contexts=first["context_end"], complete=False)
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(man))
    (tmp_path / "s" / "chunks" / "chunk_000001" / "roles.npy").write_bytes(b"garbage")
    for orphan in ("chunk_000002", ".tmp_chunk_000002_0123abcd"):
        shutil.rmtree(tmp_path / "s" / "chunks" / orphan, ignore_errors=True)
        (tmp_path / "s" / "chunks" / orphan).mkdir()
        (tmp_path / "s" / "chunks" / orphan / "roles.npy").write_bytes(b"garbage")
    (tmp_path / "s" / ".manifest.json.0123abcd.tmp").write_text("{")
    st = _harvest_store(tiny_model, tmp_path / "s")
    assert not (tmp_path / "s" / ".manifest.json.0123abcd.tmp").exists()
    assert not (tmp_path / "s" / "chunks" / ".tmp_chunk_000002_0123abcd").exists()
    assert st.complete and st.n_tokens == ref.n_tokens and len(st.chunks) == len(ref.chunks)
    for i in range(len(st.chunks)):
        a, b = st.read_chunk(i), ref.read_chunk(i)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6)
    # a token budget stops early; a later call with a larger budget continues the same store
    part = _harvest_store(tiny_model, tmp_path / "b", max_tokens=50)
    assert not part.complete and 50 <= part.n_tokens < ref.n_tokens
    whole = _harvest_store(tiny_model, tmp_path / "b")
    assert whole.complete and whole.n_tokens == ref.n_tokens
    # float16 storage reads back as float32
    h = _harvest_store(tiny_model, tmp_path / "h", dtype="float16")
    got = h.read_chunk(0)[("resid_post", 1)]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref.read_chunk(0)[("resid_post", 1)], rtol=2e-3, atol=2e-3)
    # another config in the same directory is refused
    with pytest.raises(ActivationError, match="different context_len"):
        _harvest_store(tiny_model, tmp_path / "s", context_len=8)
    # ... and so is the same model in another dtype (bf16 activations never mix with float32 ones)
    bf16 = types.SimpleNamespace(**{**vars(tiny_model), "params": jax.tree_util.tree_map(
        lambda a: a.astype(jnp.bfloat16), tiny_model.params)})
    with pytest.raises(ActivationError, match="different model.*bfloat16"):
        _harvest_store(bf16, tmp_path / "s")


def test_store_errors(tiny_model, tmp_path):
    st = _harvest_store(tiny_model, tmp_path / "s")
    with pytest.raises(ActivationError, match=r"\('resid_post', 2\) is not in the store"):
        next(st.batches("resid_post", 2, 4))
    with pytest.raises(ActivationError, match="d_in=32 does not match"):
        next(st.batches("resid_post", 1, 4, d_in=32))
    with pytest.raises(ActivationError, match="fewer than batch_size"):
        next(st.batches("resid_post", 1, 10 ** 6))
    with pytest.raises(ActivationError, match="cursor does not match"):
        _, cur = next(st.batches("resid_post", 1, 4, seed=1))
        next(st.batches("resid_post", 1, 4, seed=2, start_cursor=cur))
    f = tmp_path / "s" / "chunks" / "chunk_000001" / "resid_post.1.npy"
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(ChunkError, match="chunk_000001/resid_post.1.npy"):
        st.read_chunk(1)
    f.unlink()
    with pytest.raises(ChunkError, match="chunk_000001/resid_post.1.npy: chunk file is missing"):
        list(st.batches("resid_post", 1, 4, epochs=1))
    with pytest.raises(ActivationError, match="no manifest"):
        ActivationStore(tmp_path)
    with pytest.raises(ActivationError, match="kept no token"):
        list(harvest(tiny_model, ["only text"], [("resid_post", 0)], context_len=T, encode=fake_encode,
                     token_filter=TokenFilter(roles=("assistant",))))
    with pytest.raises(ActivationError, match="kept no token"):
        harvest_to_store(tiny_model, ["only text"], tmp_path / "e", [("resid_post", 0)], context_len=T,
                         encode=fake_encode, token_filter=TokenFilter(roles=("assistant",)))


# ---------------------------------------------------------------------------------------------
# real chat template + tokenizer (SmolLM2's, from the packaged GGUF) on a tiny random Llama


from tests.fixtures_assets import smollm2_tokenizer  # noqa: E402,F401  (session fixture)


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory, smollm2_tokenizer):
    import psm_jax
    from tests.tiny_models import save_chat_llama

    d = tmp_path_factory.mktemp("tiny_chat_llama")
    save_chat_llama(d, smollm2_tokenizer, n_layers=2, seed=0, max_position_embeddings=512, rescale=False)
    return psm_jax.load(d)


def test_harvest_sharegpt_with_chat_template(tiny_chat_model):
    from psm_jax.model import Capture, jit_forward
    from sae.data.corpus import load_sharegpt

    m = tiny_chat_model
    assert m.tokenizer is not None and m.chat_template
    corpus = load_sharegpt(shuffle=True, seed=0, take=5, max_chars=2000)
    filt = TokenFilter(roles=("assistant",))
    ctx = 64
    got = list(harvest(m, corpus, [("resid_post", 1)], context_len=ctx, batch_size=3, mode="split",
                       token_filter=filt))
    tok = m.tokenizer
    rows = list(encode_documents(corpus, ctx, A.default_encoder(tok, m.chat_template), mode="split"))
    cbs = list(batch_contexts(rows, 3, ctx, tok.pad_token_id, filt, bos_id=tok.bos_token_id,
                              special_ids=tok.all_special_ids))
    assert len(got) == len(cbs) >= 2
    n_asst = 0
    for g, cb in zip(got, cbs):
        assert (g.roles == A.ROLE_ASSISTANT).all()
        np.testing.assert_array_equal(g.tokens, cb.tokens[cb.keep])
        np.testing.assert_array_equal(g.turns, cb.turns[cb.keep])
        out = jit_forward(m.params, m.config, cb.tokens, attention_mask=cb.attention_mask,
                          capture=Capture(sites=("resid_post",), layers=(1,)))
        ref = np.asarray(out.captured["resid_post"][0])[cb.keep]
        np.testing.assert_allclose(g.acts[("resid_post", 1)], ref, rtol=1e-5, atol=1e-5)
        n_asst += int((cb.roles == A.ROLE_ASSISTANT).sum())
    n_kept = sum(len(g) for g in got)
    assert n_kept == sum(int(cb.keep.sum()) for cb in cbs) and 0 < n_kept <= n_asst
    # the template's default system prompt is marked (turn -2) and excluded by default
    first = rows[0]
    assert (first.turns == A.TURN_DEFAULT_SYSTEM).any()
    allb = next(batch_contexts(rows, 3, ctx, tok.pad_token_id, TokenFilter(), bos_id=tok.bos_token_id))
    assert not (allb.turns[allb.keep] == A.TURN_DEFAULT_SYSTEM).any()
    assert not (allb.tokens[allb.keep] == tok.bos_token_id).any()


def test_sources_follow_the_trainer_protocol(tiny_model, tmp_path):
    """StoreSource / StreamSource: arrays, JSON cursor, seek -> the same continuation (the data-source protocol)."""
    st = _harvest_store(tiny_model, tmp_path / "s")
    src = A.StoreSource(st, "resid_post", 1, 8, seed=3)
    assert src.d_in == 64 and src.cursor["epoch"] == 0
    first = [next(src) for _ in range(5)]
    assert all(b.shape == (8, 64) and b.dtype == np.float32 for b in first)
    cur = json.loads(json.dumps(src.cursor))
    want = [next(src) for _ in range(20)]
    other = A.StoreSource(str(tmp_path / "s"), "resid_post", 1, 8, seed=3)
    other.seek(cur)
    for w in want:
        np.testing.assert_array_equal(w, next(other))
    fresh = A.StoreSource(st, "resid_post", 1, 8, seed=3)
    np.testing.assert_array_equal(first[0], next(fresh))
    with pytest.raises(ActivationError, match="d_in=7"):
        A.StoreSource(st, "resid_post", 1, 8, d_in=7)

    kw = dict(context_len=T, forward_batch_size=2, mode="split", encode=fake_encode, buffer_size=48, seed=1)
    ss = A.StreamSource(tiny_model, DOCS, "resid_post", 1, 16, **kw)
    a = [next(ss) for _ in range(3)]
    assert ss.cursor == {"mode": "stream", "batches": 3}
    ss2 = A.StreamSource(tiny_model, DOCS, "resid_post", 1, 16, **kw)
    ss2.seek({"mode": "stream", "batches": 2})
    np.testing.assert_array_equal(a[2], next(ss2))


def test_flipped_bytes_are_caught_by_the_default_read(tiny_model, tmp_path):
    st = _harvest_store(tiny_model, tmp_path / "s")
    f = tmp_path / "s" / "chunks" / "chunk_000001" / "resid_post.1.npy"
    entry = st.chunks[1]["files"]["resid_post.1.npy"]
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x01                                       # same size, one bit flipped in the data
    f.write_bytes(bytes(raw))
    st = ActivationStore(tmp_path / "s")
    st.read_chunk(0)
    with pytest.raises(ChunkError, match=rf"chunk_000001/resid_post.1.npy: xxh3_64 [0-9a-f]{{16}}, manifest says "
                                         rf"{entry['xxh3_64']} \(corrupt chunk"):
        st.read_chunk(1)
    with pytest.raises(ChunkError, match=rf"sha256 [0-9a-f]{{64}}, manifest says {entry['sha256']}"):
        st.verify()
    with pytest.raises(ChunkError, match="xxh3_64"):                 # the training stream checks it too
        list(st.batches("resid_post", 1, 4, epochs=1))
    assert st.read_chunk(1, verify="size")[("resid_post", 1)].shape == (st.chunks[1]["n_tokens"], 64)
    # a store written before xxh3_64 was recorded is checked against its sha256
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    for c in man["chunks"]:
        for info in c["files"].values():
            del info["xxh3_64"]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ChunkError, match=rf"resid_post.1.npy: sha256 [0-9a-f]{{64}}, manifest says"):
        ActivationStore(tmp_path / "s").read_chunk(1)


def test_nan_activations_are_caught_at_harvest(tiny_model):
    docs = types.SimpleNamespace(documents=DOCS, ids=[f"doc-{i}" for i in range(len(DOCS))])
    k_tok = 10 + ord("k") % 200                                      # "k" occurs only in document 4
    p = dict(tiny_model.params, embed=tiny_model.params["embed"].at[k_tok].set(jnp.nan))
    bad_embed = types.SimpleNamespace(**{**vars(tiny_model), "params": p})
    kw = dict(context_len=T, batch_size=4, encode=fake_encode)
    with pytest.raises(A.NonFiniteActivationError, match=r"at mlp_out.0 in document index 4 \(id 'doc-4'\)"):
        list(harvest(bad_embed, docs, PAIRS, **kw))
    layers = dict(tiny_model.params["layers"], w_down=tiny_model.params["layers"]["w_down"].at[1].set(jnp.inf))
    bad_layer = types.SimpleNamespace(**{**vars(tiny_model), "params": dict(tiny_model.params, layers=layers)})
    with pytest.raises(A.NonFiniteActivationError,
                       match=r"hook point\(s\) \['resid_post.1', 'q.2'\]: first at resid_post.1 in document index 0"):
        list(harvest(bad_layer, docs, PAIRS, **kw))


def test_store_folder_and_manifest_errors(tiny_model, tmp_path):
    st = _harvest_store(tiny_model, tmp_path / "s")
    mpath = tmp_path / "s" / "manifest.json"
    good = mpath.read_text()
    with pytest.raises(ActivationError, match=r"verify='md5'; expected one of \('checksum', 'sha256'"):
        st.read_chunk(0, verify="md5")
    # a chunk file whose bytes match the manifest but are not a .npy file
    f = tmp_path / "s" / "chunks" / "chunk_000000" / "roles.npy"
    f.write_bytes(b"not an npy file")
    man = json.loads(good)
    man["chunks"][0]["files"]["roles.npy"].update(bytes=15, xxh3_64=S._checksum("xxh3_64", b"not an npy file"))
    mpath.write_text(json.dumps(man))
    with pytest.raises(ChunkError, match=r"chunk_000000/roles.npy: unreadable chunk file"):
        ActivationStore(tmp_path / "s").read_chunk(0)
    mpath.write_text(good[:-20])
    with pytest.raises(ChunkError, match=r"manifest.json: corrupt manifest"):
        ActivationStore(tmp_path / "s")
    mpath.write_text(json.dumps(dict(json.loads(good), format="something-else")))
    with pytest.raises(ActivationError, match="not a psm-jax-activation-store manifest"):
        ActivationStore(tmp_path / "s")
    mpath.write_text(json.dumps(dict(json.loads(good), version=99)))
    with pytest.raises(ActivationError, match="store version 99, expected 1"):
        ActivationStore(tmp_path / "s")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ActivationError, match=r"other exists, is not empty and has no manifest.json"):
        _harvest_store(tiny_model, other)
    with pytest.raises(ActivationError, match=r"refusing to overwrite .*other: it is not an activation store"):
        _harvest_store(tiny_model, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"
