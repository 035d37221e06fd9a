"""sae.data.corpus: the packaged ShareGPT dump (truncated as published) and local JSON/JSONL/parquet files."""
import json

import pytest

from sae.data.corpus import (Corpus, CorpusError, CorpusReport, iter_json_array, load_corpus, load_sharegpt,
                             load_system_prompts, sharegpt_path, with_system_prompts)


@pytest.fixture(scope="module")
def sharegpt():
    return load_sharegpt()


def test_sharegpt_packaged_file_counts(sharegpt):
    r = sharegpt.report
    assert r.format == "sharegpt-json-array"
    assert r.records_complete == 17671
    assert r.dropped_truncated == 1 and r.truncated_tail_chars > 0
    assert r.duplicate_ids == 123  # counted over the raw records
    assert r.dropped_bad_schema == 0
    assert r.stripped_leading_assistant >= 6358
    assert r.dropped_speakers == {"chatgpt": 8, "bing": 4, "bard": 2}
    assert r.dropped_empty >= 126  # empty conversations, and ones left empty after filtering
    assert r.kept == len(sharegpt) == len(sharegpt.ids)
    assert r.kept == r.records_complete - r.dropped_empty - r.dropped_bad_schema
    for conv in sharegpt.conversations[:2000]:
        first = next(m for m in conv if m["role"] != "system")
        assert first["role"] == "user"  # default leading_assistant="strip"
        assert all(set(m) == {"role", "content"} and m["content"].strip() for m in conv)
        assert {m["role"] for m in conv} <= {"system", "user", "assistant"}
    assert "17395 kept of 17671" in r.summary() or r.kept != 17395
    assert sharegpt_path().name == "ShareGPT_V3_unfiltered_cleaned_split.json"


def test_sharegpt_options_shuffle_slice_dedupe(sharegpt):
    a = load_sharegpt(shuffle=True, seed=3, take="10:20", leading_assistant="drop", dedupe_ids=True,
                      max_turns=3, max_chars=500)
    b = load_sharegpt(shuffle=True, seed=3, take=(10, 20), leading_assistant="drop", dedupe_ids=True,
                      max_turns=3, max_chars=500)
    assert a.ids == b.ids and a.documents == b.documents and len(a) == 10
    r = a.report
    assert r.dropped_leading_assistant >= 6358 and r.stripped_leading_assistant == 0
    # every duplicated ShareGPT id pairs an empty record with a real one: nothing left to dedupe
    assert r.dropped_duplicate_ids == 0 and len(set(a.ids)) == 10
    assert r.after_filter < sharegpt.report.kept
    for conv in a:
        assert len(conv) <= 3 and sum(len(m["content"]) for m in conv) <= 500
        assert next(m for m in conv if m["role"] != "system")["role"] == "user"
    c = load_sharegpt(shuffle=True, seed=4, take=10, leading_assistant="drop", dedupe_ids=True)
    assert c.ids != a.ids


def _write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_jsonl_messages_conversations_text_and_bad_schema(tmp_path):
    recs = [
        {"id": "a", "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello."}]},
        {"id": "b", "messages": [{"role": "assistant", "content": "stray"}, {"role": "user", "content": "Q"},
                                 {"role": "tool", "content": "x"}, {"role": "assistant", "content": "A"}]},
        {"id": "c", "messages": [{"role": "user", "content": "   "}]},
        {"id": "d", "messages": [{"role": "user", "content": "ok"}]},
        {"id": "e", "other": 1},
    ]
    c = load_corpus(_write_jsonl(tmp_path / "chat.jsonl", recs))
    assert c.report.format == "datasets-json"
    assert c.ids == ["a", "b", "d"]
    assert c[1] == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    r = c.report
    assert (r.records_complete, r.kept, r.dropped_empty, r.dropped_bad_schema) == (5, 3, 1, 1)
    assert r.stripped_leading_assistant == 1 and r.dropped_speakers == {"tool": 1}
    assert r.dropped_messages_empty == 1

    sg = [{"id": "x", "conversations": [{"from": "human", "value": "hey"}, {"from": "gpt", "value": "yo"}]}]
    c = load_corpus(_write_jsonl(tmp_path / "sg.jsonl", sg))
    assert c[0] == [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "yo"}]

    dup = load_corpus(_write_jsonl(tmp_path / "dup.jsonl", recs[:4] + recs[:1]), dedupe_ids=True)
    assert dup.ids == ["a", "b", "d"] and dup.report.duplicate_ids == 1 and dup.report.dropped_duplicate_ids == 1

    t = load_corpus(_write_jsonl(tmp_path / "text.jsonl", [{"text": "plain one"}, {"text": ""}, {"text": "two"}]))
    assert t.documents == ["plain one", "two"] and t.report.dropped_empty == 1
    assert t.ids == ["text.jsonl:0", "text.jsonl:2"]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tbl = pa.table({"id": ["p0", "p1"], "messages": [
        [{"role": "user", "content": "u0"}, {"role": "assistant", "content": "a0"}],
        [{"role": "user", "content": "u1"}]]})
    pq.write_table(tbl, tmp_path / "c.parquet")
    c = load_corpus(tmp_path / "c.parquet")
    assert c.report.format == "datasets-parquet" and c.ids == ["p0", "p1"]
    assert c[0][1] == {"role": "assistant", "content": "a0"}


def test_truncated_json_array(tmp_path):
    recs = [{"id": str(i), "conversations": [{"from": "human", "value": f"q{i} ]}}"},
                                             {"from": "gpt", "value": "a\u00e9\u4e2d"}]} for i in range(5)]
    text = json.dumps(recs, indent=1, ensure_ascii=False)
    cut = text.index('"q4')  # inside the last record
    p = tmp_path / "trunc.json"
    p.write_bytes(text[:cut + 3].encode())
    c = load_corpus(p)
    assert c.report.format == "json-array"
    assert c.report.records_complete == 4 and c.report.dropped_truncated == 1 and len(c) == 4
    assert c[3][1]["content"] == "a\u00e9\u4e2d"
    # cut inside a multi-byte character, and between elements: still fine
    raw = text.encode()
    k = raw.index("\u4e2d".encode()) + 1
    p.write_bytes(raw[:k])
    it, stream = iter_json_array(p)
    assert list(it) == [] and stream.truncated == 1
    with pytest.raises(CorpusError, match="empty after filtering"):
        load_corpus(p)
    p.write_bytes(text[:text.index("},\n {") + 2].encode())
    c = load_corpus(p)
    assert c.report.records_complete == 1 and c.report.dropped_truncated == 0
    # a complete file parses fully; small read blocks exercise the incremental reader
    from sae.data.corpus import _ArrayStream

    p.write_text(text)
    s = _ArrayStream(p, block=7)
    assert [r["id"] for r in s] == ["0", "1", "2", "3", "4"] and s.closed and s.truncated == 0


def test_corrupt_json_array_is_an_error(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[{"id": "1", "messages": []}, {"id": 2, oops: 3}, {"id": "3"}]')
    with pytest.raises(CorpusError, match="malformed JSON element"):
        load_corpus(p)


def test_errors(tmp_path):
    with pytest.raises(CorpusError, match="hub ids are not accepted"):
        load_corpus("someone/some-dataset")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(CorpusError, match="is empty"):
        load_corpus(tmp_path / "empty.jsonl")
    p = _write_jsonl(tmp_path / "asst.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(CorpusError, match="empty after filtering"):
        load_corpus(p, leading_assistant="drop")
    with pytest.raises(CorpusError, match="empty after filtering"):
        load_corpus(p)  # stripped -> nothing left
    assert len(load_corpus(p, leading_assistant="keep")) == 1
    with pytest.raises(CorpusError, match="leading_assistant"):
        load_corpus(p, leading_assistant="nope")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(CorpusError, match="unsupported extension"):
        load_corpus(tmp_path / "x.txt")


def _chats(n):
    docs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(n)]
    docs[0] = [{"role": "system", "content": "old system"}] + docs[0]
    return Corpus(docs, [str(i) for i in range(n)], CorpusReport(source="t", format="json-array", kept=n))


def test_with_system_prompts_replaces_or_adds_a_system_message_on_a_seeded_fraction():
    base = _chats(400)
    mixed = with_system_prompts(base, ["be a pirate", "be a cat"], 0.3, seed=1)
    opened = [i for i, d in enumerate(mixed) if d[0]["role"] == "system" and d[0]["content"] != "old system"]
    assert mixed.report.options["system_prompts"] == {"fraction": 0.3, "n_prompts": 2, "seed": 1,
                                                       "applied": len(opened)}
    assert 90 <= len(opened) <= 150 and {mixed[i][0]["content"] for i in opened} == {"be a pirate", "be a cat"}
    for i, (d, old) in enumerate(zip(mixed, base)):
        body = [m for m in old if m["role"] != "system"]
        assert d == ([d[0]] + body if i in opened else old)  # one system message at most; the turns unchanged
    assert mixed.ids == base.ids and base.report.options == {}
    again = with_system_prompts(base, ["be a pirate", "be a cat"], 0.3, seed=1)
    assert again.documents == mixed.documents
    assert with_system_prompts(base, ["be a pirate", "be a cat"], 0.3, seed=2).documents != mixed.documents
    assert with_system_prompts(base, ["x"], 0.0, seed=1).documents == base.documents
    assert all(d[0] == {"role": "system", "content": "x"} for d in with_system_prompts(base, ["x"], 1.0, seed=1))


def test_with_system_prompts_errors():
    base = _chats(3)
    with pytest.raises(CorpusError, match="fraction=1.5"):
        with_system_prompts(base, ["x"], 1.5, seed=0)
    with pytest.raises(CorpusError, match="1 system prompt.s. given, 1 of them empty"):
        with_system_prompts(base, [" "], 0.5, seed=0)
    with pytest.raises(CorpusError, match="0 system prompt.s. given"):
        with_system_prompts(base, [], 0.5, seed=0)
    text = Corpus(["plain text"], ["0"], CorpusReport(source="t", format="json-array"))
    with pytest.raises(CorpusError, match="plain text"):
        with_system_prompts(text, ["x"], 0.5, seed=0)


def test_load_system_prompts_from_json_or_lines(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(["You are a pirate.", " ", "You are a cat."]))
    (tmp_path / "p.txt").write_text("You are a pirate.\n\nYou are a cat.\n")
    assert load_system_prompts(tmp_path / "p.json") == load_system_prompts(tmp_path / "p.txt") == \
        ["You are a pirate.", "You are a cat."]
    (tmp_path / "bad.json").write_text(json.dumps({"a": 1}))
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "broken.json").write_text('["You are a pirate.", ')
    for name, match in (("bad.json", "expected a JSON list of strings"), ("empty.txt", "holds no system prompt"),
                        ("broken.json", "is not valid JSON"),
                        ("missing.txt", "does not exist")):
        with pytest.raises(CorpusError, match=match):
            load_system_prompts(tmp_path / name)
