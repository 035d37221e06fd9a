"""Activation source for SAE training: tokenise chat corpora, harvest sites in one jitted forward,
shuffle across contexts, and store activations on disk (chunked, resumable, with a manifest).

Pipeline::

    docs (sae.corpus) --encode_documents--> context rows (tokens, roles, turns, doc ids; <= context_len)
      --batch_contexts--> ContextBatch [B, T] (left padded, attention mask, token keep mask)
      --harvest--> ActivationBatch (kept tokens only: acts[(site, layer)] [n, D] float32 + metadata)
      --ShuffleBuffer--> shuffled training batches          (streaming mode: `stream_batches`)
      --harvest_to_store--> ActivationStore on disk          (store mode: `ActivationStore.batches`)

Token selection is a mask: the forward always sees the whole (padded) context; `TokenFilter` only
decides which positions are returned. Role ids follow `psm_jax.chat.Role` (TEMPLATE=0, SYSTEM=1,
USER=2, ASSISTANT=3; padding -1) plus TEXT=4 for plain-text documents (no chat template); turn ids
follow psm_jax.chat (message index, -1 after the last message, -2 for a system prompt the template
inserted by itself, -3 for padding).

Context modes (`mode`):
  * "truncate" (default): one context per document, its first `context_len` tokens (left padded);
  * "split": every document cut into consecutive windows of `context_len` tokens (last one padded);
  * "pack": documents concatenated into full windows (no padding except the last), a document may
    continue in the next context; attention crosses document boundaries (as in SAELens).

Store layout (`ActivationStore`)::

    <dir>/manifest.json                   written last, atomically (temp + fsync + rename)
    <dir>/docs.json                       corpus document ids (index -> id) and the corpus report
    <dir>/chunks/chunk_000000/<site>.<layer>.npy, roles.npy, turns.npy, tokens.npy,
                               doc_ids.npy, pos.npy, context.npy

A chunk directory is built under a temporary name and renamed into place; only chunks listed in the
manifest exist for readers. A harvest killed at any point (even by SIGKILL: tests/test_kill_store.py)
resumes after the last listed chunk (a chunk directory without a manifest entry is deleted and
rewritten) and writes chunk files bit-identical to an uninterrupted harvest. The manifest records the
size, xxh3_64 and sha256 of every chunk file; readers check the xxh3_64 hash (a fast non-cryptographic
hash, from the xxhash package `datasets` depends on) the first time a store object loads a file
(`verify`), so flipped bytes raise ChunkError instead of feeding garbage to training.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

# Role ids (mirror psm_jax.chat.Role; TEXT is this module's addition for plain-text documents).
ROLE_PAD = -1
ROLE_TEMPLATE = 0
ROLE_SYSTEM = 1
ROLE_USER = 2
ROLE_ASSISTANT = 3
ROLE_TEXT = 4
TURN_PAD = -3  # psm_jax.chat.TURN_PAD
TURN_AFTER = -1  # psm_jax.chat.TURN_AFTER: tokens after the last message
TURN_DEFAULT_SYSTEM = -2  # psm_jax.chat.TURN_DEFAULT_SYSTEM: a system prompt the template inserted
ROLE_NAMES = {"template": ROLE_TEMPLATE, "system": ROLE_SYSTEM, "user": ROLE_USER,
              "assistant": ROLE_ASSISTANT, "text": ROLE_TEXT}

MODES = ("truncate", "split", "pack")
META_FIELDS = ("roles", "turns", "tokens", "doc_ids", "pos", "context")
META_DTYPES = {"roles": np.int8, "turns": np.int32, "tokens": np.int32, "doc_ids": np.int32,
               "pos": np.int32, "context": np.int64}
STORE_FORMAT = "psm-jax-activation-store"
STORE_VERSION = 1
STORE_DTYPES = ("float32", "float16")
VERIFY_MODES = ("checksum", "sha256", "size", "none")


class ActivationError(ValueError):
    """Bad request or bad data in the activation pipeline (message names what and where)."""


class ChunkError(ActivationError):
    """A store chunk is missing or corrupt (message names the file)."""


class NonFiniteActivationError(ActivationError):
    """The model produced NaN/inf activations at harvest (message names the hook point and the document)."""


def role_id(r: int | str) -> int:
    if isinstance(r, str):
        if r.lower() not in ROLE_NAMES:
            raise ActivationError(f"unknown role {r!r}; expected one of {sorted(ROLE_NAMES)}")
        return ROLE_NAMES[r.lower()]
    r = int(r)
    if r not in ROLE_NAMES.values():
        raise ActivationError(f"unknown role id {r}; expected one of {sorted(ROLE_NAMES.values())}")
    return r


def site_key(site: str, layer: int) -> str:
    """File/manifest name of one (site, layer), e.g. "resid_post.15"."""
    return f"{site}.{int(layer)}"


# ----------------------------------------------------------------------------------------------
# Token selection


@dataclasses.dataclass(frozen=True)
class TokenFilter:
    """Which positions of a context are returned (a mask; the forward sees everything).

    roles: keep only these roles (names or ids), e.g. ("assistant",); None keeps every role.
    exclude_bos: drop tokens equal to the tokenizer's BOS id.
    exclude_template: drop chat-template tokens (role TEMPLATE: <|im_start|>, role headers, ...).
    exclude_special: drop every id in `special_ids` (the tokenizer's special tokens).
    exclude_default_system: drop the system prompt a template inserts by itself (turn id -2, e.g.
        SmolLM2's "You are a helpful AI assistant named SmolLM..."): it is the same text at the same
        positions in every conversation, so its activations would be exact duplicates.
    skip_first: drop the first n real tokens of each context (attention sinks carry outlier norms).
    """

    roles: tuple[int, ...] | None = None
    exclude_bos: bool = True
    exclude_template: bool = False
    exclude_special: bool = False
    exclude_default_system: bool = True
    skip_first: int = 1

    def __post_init__(self):
        if self.roles is not None:
            rs = (self.roles,) if isinstance(self.roles, (str, int)) else self.roles
            object.__setattr__(self, "roles", tuple(sorted({role_id(r) for r in rs})))
            if not self.roles:
                raise ActivationError("TokenFilter.roles is empty: no token would be kept")
        if self.skip_first < 0:
            raise ActivationError(f"skip_first={self.skip_first}; expected >= 0")

    def to_dict(self) -> dict:
        return dict(roles=None if self.roles is None else list(self.roles), exclude_bos=self.exclude_bos,
                    exclude_template=self.exclude_template, exclude_special=self.exclude_special,
                    exclude_default_system=self.exclude_default_system, skip_first=self.skip_first)

    def keep_mask(self, tokens: np.ndarray, roles: np.ndarray, valid: np.ndarray, *, turns: np.ndarray | None = None,
                  bos_id: int | None = None, special_ids: Sequence[int] = ()) -> np.ndarray:
        """bool mask, same shape as tokens ([..., T]); valid is the attention mask (False = padding)."""
        keep = valid.copy()
        if self.exclude_default_system and turns is not None:
            keep &= turns != TURN_DEFAULT_SYSTEM
        if self.roles is not None:
            keep &= np.isin(roles, np.asarray(self.roles, roles.dtype))
        if self.exclude_template:
            keep &= roles != ROLE_TEMPLATE
        if self.exclude_bos and bos_id is not None:
            keep &= tokens != bos_id
        if self.exclude_special and len(special_ids):
            keep &= ~np.isin(tokens, np.asarray(list(special_ids), tokens.dtype))
        if self.skip_first:
            rank = np.cumsum(valid, axis=-1)  # 1 for the first real token
            keep &= rank > self.skip_first
        return keep


# ----------------------------------------------------------------------------------------------
# Tokenisation into fixed-length contexts


@dataclasses.dataclass
class Encoded:
    tokens: np.ndarray  # int32 [n]
    roles: np.ndarray  # int8 [n]
    turns: np.ndarray  # int32 [n]


def default_encoder(tokenizer, chat_template: str | None = None) -> Callable[[Any], Encoded]:
    """Document -> Encoded: message lists through psm_jax.chat.encode_chat, strings through the tokenizer."""

    def encode(doc) -> Encoded:
        if isinstance(doc, str):
            ids = tokenizer(doc, add_special_tokens=True)["input_ids"]
            n = len(ids)
            return Encoded(np.asarray(ids, np.int32), np.full(n, ROLE_TEXT, np.int8), np.zeros(n, np.int32))
        from psm_jax.chat import encode_chat

        enc = encode_chat(tokenizer, doc, add_generation_prompt=False, chat_template=chat_template)
        return Encoded(np.asarray(enc.tokens, np.int32), np.asarray(enc.roles, np.int8),
                       np.asarray(enc.turns, np.int32))

    return encode


@dataclasses.dataclass
class ContextRow:
    """One context before padding (length <= context_len)."""

    index: int  # global context index (deterministic for a corpus + options)
    tokens: np.ndarray
    roles: np.ndarray
    turns: np.ndarray
    doc_ids: np.ndarray  # int32 corpus index per token


def _truncate_chars(doc, limit: int):
    """Cut a document to `limit` characters in total (messages past the limit dropped)."""
    if isinstance(doc, str):
        return (doc[:limit], True) if len(doc) > limit else (doc, False)
    if sum(len(m["content"]) for m in doc) <= limit:
        return doc, False
    out, budget = [], limit
    for m in doc:
        if budget <= 0:
            break
        c = m["content"][:budget]
        budget -= len(c)
        out.append({**m, "content": c})
    return out, True


def encode_documents(documents: Iterable, context_len: int, encode: Callable[[Any], Encoded], *,
                     mode: str = "truncate", start_context: int = 0, doc_index_offset: int = 0,
                     chars_per_token: int = 12) -> Iterator[ContextRow]:
    """Yield context rows (each <= context_len tokens) in a deterministic order.

    `start_context` skips rows before that global index (resume). In "truncate" mode, documents are
    cut to `context_len * chars_per_token` characters before tokenising (a speed-up for very long
    conversations); if the cut text yields fewer than `context_len + 16` tokens the full document is
    encoded instead, so the first `context_len` tokens never depend on the cut.
    """
    if mode not in MODES:
        raise ActivationError(f"mode={mode!r}; expected one of {MODES}")
    if context_len < 2:
        raise ActivationError(f"context_len={context_len}; expected >= 2")
    T = context_len
    idx = 0  # next global context index ("truncate": the document index)
    pack_buf: list[tuple[np.ndarray, ...]] = []
    pack_len = 0
    for d, doc in enumerate(documents):
        doc_id = d + doc_index_offset
        if mode == "truncate":
            idx = d
            if d < start_context:  # resume: no need to tokenise skipped documents
                continue
            cut, was_cut = _truncate_chars(doc, T * chars_per_token)
            enc = encode(cut)
            if was_cut and len(enc.tokens) < T + 16:
                enc = encode(doc)
        else:
            enc = encode(doc)
        n = len(enc.tokens)
        if not (len(enc.roles) == n and len(enc.turns) == n):
            raise ActivationError(f"encoder returned mismatched lengths for document {doc_id}")
        if n == 0:
            continue
        dids = np.full(n, doc_id, np.int32)
        parts = (np.asarray(enc.tokens, np.int32), np.asarray(enc.roles, np.int8),
                 np.asarray(enc.turns, np.int32), dids)
        if mode == "truncate":
            yield ContextRow(idx, *(a[:T] for a in parts))
        elif mode == "split":
            for s in range(0, n, T):
                if idx >= start_context:
                    yield ContextRow(idx, *(a[s:s + T] for a in parts))
                idx += 1
        else:  # pack
            pack_buf.append(parts)
            pack_len += n
            if pack_len >= T:
                cat = [np.concatenate([p[k] for p in pack_buf]) for k in range(4)]
                full = pack_len // T
                for w in range(full):
                    if idx >= start_context:
                        yield ContextRow(idx, *(c[w * T:(w + 1) * T] for c in cat))
                    idx += 1
                rest = tuple(c[full * T:] for c in cat)
                pack_len = len(rest[0])
                pack_buf = [rest] if pack_len else []
    if mode == "pack" and pack_len:
        cat = [np.concatenate([p[k] for p in pack_buf]) for k in range(4)]
        if idx >= start_context:
            yield ContextRow(idx, *cat)


@dataclasses.dataclass
class ContextBatch:
    """Static-shape batch of contexts, left padded. Rows past `n_rows` are empty filler."""

    tokens: np.ndarray  # int32 [B, T]
    attention_mask: np.ndarray  # bool [B, T]
    roles: np.ndarray  # int8 [B, T], -1 for padding
    turns: np.ndarray  # int32 [B, T], TURN_PAD (-3) for padding
    doc_ids: np.ndarray  # int32 [B, T], -1 for padding
    pos: np.ndarray  # int32 [B, T]: position of the token in its context (0 = first real token)
    context: np.ndarray  # int64 [B]: global context index (-1 for filler rows)
    keep: np.ndarray  # bool [B, T]
    n_rows: int
    context_end: int  # global index one past the last context in this batch


def batch_contexts(rows: Iterable[ContextRow], batch_size: int, context_len: int, pad_id: int,
                   token_filter: TokenFilter = TokenFilter(), *, bos_id: int | None = None,
                   special_ids: Sequence[int] = ()) -> Iterator[ContextBatch]:
    """Group rows into left-padded [batch_size, context_len] batches with the token keep mask."""
    if batch_size < 1:
        raise ActivationError(f"batch_size={batch_size}; expected >= 1")
    B, T = batch_size, context_len
    buf: list[ContextRow] = []

    def build(rs: list[ContextRow]) -> ContextBatch:
        tokens = np.full((B, T), pad_id, np.int32)
        mask = np.zeros((B, T), bool)
        roles = np.full((B, T), ROLE_PAD, np.int8)
        turns = np.full((B, T), TURN_PAD, np.int32)
        dids = np.full((B, T), -1, np.int32)
        pos = np.zeros((B, T), np.int32)
        ctx = np.full(B, -1, np.int64)
        for i, r in enumerate(rs):
            n = len(r.tokens)
            tokens[i, T - n:] = r.tokens
            mask[i, T - n:] = True
            roles[i, T - n:] = r.roles
            turns[i, T - n:] = r.turns
            dids[i, T - n:] = r.doc_ids
            pos[i, T - n:] = np.arange(n)
            ctx[i] = r.index
        keep = token_filter.keep_mask(tokens, roles, mask, turns=turns, bos_id=bos_id, special_ids=special_ids)
        # filler rows get one attended (discarded) token so no attention row is fully masked
        mask[len(rs):, T - 1] = True
        return ContextBatch(tokens, mask, roles, turns, dids, pos, ctx, keep, len(rs), rs[-1].index + 1)

    for r in rows:
        buf.append(r)
        if len(buf) == B:
            yield build(buf)
            buf = []
    if buf:
        yield build(buf)


# ----------------------------------------------------------------------------------------------
# Harvesting


@dataclasses.dataclass
class ActivationBatch:
    """Kept tokens of some contexts: activations per (site, layer) and aligned metadata."""

    acts: dict  # (site, layer) -> float32 [n, D]
    roles: np.ndarray
    turns: np.ndarray
    tokens: np.ndarray
    doc_ids: np.ndarray
    pos: np.ndarray
    context: np.ndarray
    context_end: int = 0  # contexts [0, context_end) are fully harvested after this batch

    def __len__(self) -> int:
        if self.acts:
            return len(next(iter(self.acts.values())))
        return len(self.roles)

    def meta(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in META_FIELDS}

    def take(self, idx) -> "ActivationBatch":
        return ActivationBatch({k: v[idx] for k, v in self.acts.items()},
                               *(getattr(self, k)[idx] for k in META_FIELDS), context_end=self.context_end)

    @staticmethod
    def concat(batches: Sequence["ActivationBatch"]) -> "ActivationBatch":
        if not batches:
            raise ActivationError("nothing to concatenate")
        keys = list(batches[0].acts)
        return ActivationBatch({k: np.concatenate([b.acts[k] for b in batches]) for k in keys},
                               *(np.concatenate([getattr(b, f) for b in batches]) for f in META_FIELDS),
                               context_end=max(b.context_end for b in batches))


def _normalize_sites_layers(sites_layers, n_layers: int | None = None) -> list[tuple[str, int]]:
    from psm_jax.edits import SITES

    if not sites_layers:
        raise ActivationError("sites_layers is empty; expected e.g. [('resid_post', 15)]")
    out = []
    for item in sites_layers:
        try:
            site, layer = item
        except (TypeError, ValueError):
            raise ActivationError(f"bad sites_layers entry {item!r}; expected (site, layer)") from None
        if site not in SITES:
            raise ActivationError(f"unknown site {site!r}; expected one of {SITES}")
        if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool):
            raise ActivationError(f"layer {layer!r} for site {site!r} is not an int")
        layer = int(layer)
        if n_layers is not None and not 0 <= layer < n_layers:
            raise ActivationError(f"layer {layer} for site {site!r} is out of range; the model has "
                                  f"{n_layers} layers (0..{n_layers - 1})")
        if (site, layer) not in out:
            out.append((site, layer))
    return out


def truncated_model(params: dict, config, n_layers: int):
    """Params/config keeping only the first `n_layers` layers (captures below them are unchanged)."""
    import jax

    if n_layers >= config.n_layers:
        return params, config
    cfg = dataclasses.replace(config, n_layers=n_layers,
                              sliding_layers=tuple(config.sliding_layers[:n_layers]) if config.sliding_layers else ())
    p = dict(params)
    p["layers"] = jax.tree_util.tree_map(lambda x: x[:n_layers], params["layers"])
    return p, cfg


_STEP_CACHE: dict = {}


def make_capture_step(config, pairs: Sequence[tuple[str, int]]):
    """One jitted function (params, tokens, mask) -> tuple of float32 [B*T, D] per (site, layer)."""
    import jax
    import jax.numpy as jnp

    from psm_jax.model import Capture, forward

    pairs = tuple(pairs)
    key = (config, pairs)
    if key in _STEP_CACHE:
        return _STEP_CACHE[key]
    sites = tuple(dict.fromkeys(s for s, _ in pairs))
    layers = tuple(sorted({l for _, l in pairs}))
    capture = Capture(sites=sites, layers=layers)

    def step(params, tokens, mask):
        out = forward(params, config, tokens, attention_mask=mask, capture=capture, return_logits=False)
        b, t = tokens.shape
        res = []
        for s, l in pairs:
            a = out.captured[s][layers.index(l)]
            res.append(a.reshape(b * t, -1).astype(jnp.float32))
        return tuple(res)

    fn = jax.jit(step)
    _STEP_CACHE[key] = fn
    return fn


def _background(it: Iterator, depth: int) -> Iterator:
    """Run a (deterministic) producer iterator in a daemon thread, `depth` items ahead."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in it:
                if not put((True, item)):
                    return
            put((True, done))
        except BaseException as e:  # re-raised in the consumer
            put((False, e))

    t = threading.Thread(target=work, name="harvest-tokenize", daemon=True)
    t.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()


def _model_parts(model):
    params, config = model.params, model.config
    tokenizer = getattr(model, "tokenizer", None)
    return params, config, tokenizer


def _special_ids(tokenizer) -> tuple[list[int], int | None, int]:
    special = list(getattr(tokenizer, "all_special_ids", []) or [])
    bos = getattr(tokenizer, "bos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return special, bos, 0 if pad is None else int(pad)


def _documents(documents) -> list:
    docs = getattr(documents, "documents", documents)
    return docs


def harvest(model, documents, sites_layers, *, context_len: int = 256, batch_size: int = 8,
            mode: str = "truncate", token_filter: TokenFilter = TokenFilter(), start_context: int = 0,
            truncate_layers: bool = True, encode: Callable[[Any], Encoded] | None = None,
            max_tokens: int | None = None, progress: bool = False, prefetch: int = 2) -> Iterator[ActivationBatch]:
    """Yield an ActivationBatch per forward batch, holding only the kept tokens.

    model: a LoadedModel (params, config, tokenizer) or anything with those attributes.
    documents: a sae.corpus.Corpus or a list of message lists / strings.
    sites_layers: [(site, layer), ...]; all captured by ONE jitted forward per batch (the model is cut
        after the deepest requested layer when `truncate_layers`); one device->host copy per batch.
    encode: document -> Encoded (default: psm_jax.chat.encode_chat with the model's tokenizer).
    max_tokens: stop after the batch that reaches this many kept tokens.
    truncate_layers: run only layers 0..max(layer) (a persistent sliced copy of those layers' params
        is held while harvesting; pass False to avoid the copy for very large models).
    prefetch: tokenise up to this many batches ahead in a background thread (0: inline).
    A batch may hold no kept token (e.g. assistant-only filter on user-only contexts); it is still
    yielded so that `context_end` advances.
    """
    import jax

    params, config, tokenizer = _model_parts(model)
    pairs = _normalize_sites_layers(sites_layers, config.n_layers)
    if context_len > config.max_position:
        raise ActivationError(f"context_len={context_len} exceeds the model's max_position={config.max_position}")
    docs = _documents(documents)
    if len(docs) == 0:
        raise ActivationError("the corpus is empty (nothing to harvest)")
    special, bos, pad = _special_ids(tokenizer) if tokenizer is not None else ([], None, 0)
    if bos is None:
        bos = config.bos_token_id
    if encode is None:
        if tokenizer is None:
            raise ActivationError("the model has no tokenizer; pass `encode=`")
        encode = default_encoder(tokenizer, getattr(model, "chat_template", None))
    if truncate_layers:
        params, config = truncated_model(params, config, max(l for _, l in pairs) + 1)
    from psm_jax.native.amx import kernel_layout
    params = dict(params, layers=kernel_layout(params["layers"]))  # bf16 on AMX: weights as kernel bits, once
    step = make_capture_step(config, pairs)
    doc_names = getattr(documents, "ids", None)

    rows = encode_documents(docs, context_len, encode, mode=mode, start_context=start_context)
    batches = batch_contexts(rows, batch_size, context_len, pad, token_filter, bos_id=bos, special_ids=special)
    if prefetch:
        batches = _background(batches, prefetch)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(unit="tok", desc="harvest")

    def finish(out, cb: ContextBatch) -> ActivationBatch:
        host = jax.device_get(out)  # one transfer for every (site, layer)
        flat = np.flatnonzero(cb.keep.reshape(-1))
        acts = {p: np.asarray(h)[flat] for p, h in zip(pairs, host)}
        rowi = flat // context_len
        meta = dict(roles=cb.roles.reshape(-1)[flat], turns=cb.turns.reshape(-1)[flat],
                    tokens=cb.tokens.reshape(-1)[flat], doc_ids=cb.doc_ids.reshape(-1)[flat],
                    pos=cb.pos.reshape(-1)[flat], context=cb.context[rowi])
        _check_finite(acts, meta, doc_names)
        return ActivationBatch(acts, **meta, context_end=cb.context_end)

    total = 0

    def counted(ab: ActivationBatch) -> ActivationBatch:
        nonlocal total
        total += len(ab)
        if bar is not None:
            bar.update(len(ab))
        return ab

    pending = None
    any_batch = False
    for cb in batches:
        any_batch = True
        out = step(params, cb.tokens, cb.attention_mask)  # dispatched asynchronously
        if pending is not None:
            yield counted(finish(*pending))
            if max_tokens is not None and total >= max_tokens:
                pending = None
                break
        pending = (out, cb)
    if pending is not None:
        yield counted(finish(*pending))
    if bar is not None:
        bar.close()
    if start_context == 0:
        if not any_batch:
            raise ActivationError("no context could be built from the corpus (every document encoded to 0 tokens)")
        if total == 0:
            raise ActivationError(f"the harvest kept no token: the token filter {token_filter} excludes every "
                                  "token of this corpus (empty corpus after filtering)")


def _check_finite(acts: Mapping[tuple[str, int], np.ndarray], meta: Mapping[str, np.ndarray],
                  doc_names: Sequence[str] | None) -> None:
    """Raise NonFiniteActivationError when a kept activation is NaN/inf, naming every affected hook point (the
    shallowest first) and the first affected document (its corpus index and id), context and position: caught
    here, a broken model or edit never reaches the store or the trainer as a NaN loss."""
    bad = [k for k in sorted(acts, key=lambda k: (k[1], k[0])) if not np.isfinite(acts[k]).all()]
    if not bad:
        return
    rows = ~np.isfinite(acts[bad[0]]).all(axis=1)
    first = int(np.flatnonzero(rows)[0])
    d = int(meta["doc_ids"][first])
    name = doc_names[d] if doc_names is not None and 0 <= d < len(doc_names) else str(d)
    raise NonFiniteActivationError(
        f"non-finite activations (NaN/inf) at hook point(s) {[site_key(*k) for k in bad]}: first at "
        f"{site_key(*bad[0])} in document index {d} (id {name!r}), context {int(meta['context'][first])}, token "
        f"position {int(meta['pos'][first])}; {int(rows.sum())} of {len(rows)} kept tokens of this batch affected. "
        "The model's weights (or an edit) produce NaN/inf on this input.")


# ----------------------------------------------------------------------------------------------
# Shuffling across contexts


class ShuffleBuffer:
    """Fixed-size mixing buffer: fill to `capacity` rows, permute, emit half as batches, refill.

    Rows from many contexts mix before a batch is drawn (`capacity` >> context length). The order
    depends only on the incoming rows and `seed` (a numpy Generator or an int).
    """

    def __init__(self, capacity: int, batch_size: int, seed: int | np.random.Generator = 0):
        if batch_size < 1 or capacity < 2 * batch_size:
            raise ActivationError(f"ShuffleBuffer capacity={capacity} must be >= 2 * batch_size={batch_size}")
        self.capacity, self.batch_size = int(capacity), int(batch_size)
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self._data: dict[Any, np.ndarray] | None = None
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _alloc(self, row: Mapping[Any, np.ndarray]):
        self._data = {k: np.empty((self.capacity,) + v.shape[1:], v.dtype) for k, v in row.items()}

    def add(self, rows: Mapping[Any, np.ndarray]) -> Iterator[dict]:
        """Add aligned arrays (dict key -> [m, ...]); yields batches whenever the buffer fills."""
        m = len(next(iter(rows.values())))
        if self._data is None:
            self._alloc(rows)
        elif set(rows) != set(self._data):
            raise ActivationError(f"ShuffleBuffer got keys {sorted(map(str, rows))}, expected "
                                  f"{sorted(map(str, self._data))}")
        s = 0
        while s < m:
            take = min(m - s, self.capacity - self._n)
            for k, v in rows.items():
                self._data[k][self._n:self._n + take] = v[s:s + take]
            self._n += take
            s += take
            if self._n == self.capacity:
                yield from self._emit(self.capacity // 2)

    def _emit(self, n_rows: int) -> Iterator[dict]:
        perm = self.rng.permutation(self._n)
        nb = n_rows // self.batch_size
        for b in range(nb):
            idx = perm[b * self.batch_size:(b + 1) * self.batch_size]
            yield {k: v[idx] for k, v in self._data.items()}
        rest = np.sort(perm[nb * self.batch_size:])
        for k in self._data:
            self._data[k][:len(rest)] = self._data[k][rest]
        self._n = len(rest)

    def drain(self) -> Iterator[dict]:
        """Emit every full batch left (the final partial batch is dropped)."""
        if self._n:
            yield from self._emit(self._n)


def _batch_to_rows(ab: ActivationBatch) -> dict:
    d = {("act",) + k: v for k, v in ab.acts.items()}
    d.update({("meta", k): v for k, v in ab.meta().items()})
    return d


def _rows_to_batch(rows: dict) -> ActivationBatch:
    acts = {k[1:]: v for k, v in rows.items() if k[0] == "act"}
    return ActivationBatch(acts, *(rows[("meta", f)] for f in META_FIELDS))


def stream_batches(model, documents, sites_layers, batch_size: int, *, buffer_size: int = 1 << 16,
                   seed: int = 0, start_batch: int = 0, forward_batch_size: int = 8, **harvest_kw) -> Iterator[tuple[ActivationBatch, dict]]:
    """Train while harvesting: harvest -> ShuffleBuffer -> (batch, cursor), no disk.

    batch_size: rows per yielded training batch; forward_batch_size: contexts per harvest forward;
    other keywords go to `harvest` (context_len, mode, token_filter, ...).
    Yields ActivationBatch (acts for every requested (site, layer) + metadata) with a cursor
    {"mode": "stream", "batches": i}. Passing `start_batch` replays the harvest deterministically and
    skips that many batches (exact but costs the forward again; use an ActivationStore for cheap
    resume). Ends when the corpus is exhausted (the buffer is drained, last partial batch dropped).
    """
    buf = ShuffleBuffer(buffer_size, batch_size, seed)
    i = 0
    emitted = False

    def out(rows):
        nonlocal i, emitted
        i += 1
        if i > start_batch:
            emitted = True
            return _rows_to_batch(rows), {"mode": "stream", "batches": i, "seed": seed, "batch_size": batch_size}
        return None

    for ab in harvest(model, documents, sites_layers, batch_size=forward_batch_size, **harvest_kw):
        if len(ab) == 0:
            continue
        for rows in buf.add(_batch_to_rows(ab)):
            r = out(rows)
            if r is not None:
                yield r
    for rows in buf.drain():
        r = out(rows)
        if r is not None:
            yield r
    if not emitted and start_batch == 0:
        raise ActivationError(f"the harvest produced fewer than batch_size={batch_size} kept tokens "
                              "(empty corpus after filtering?)")


# ----------------------------------------------------------------------------------------------
# On-disk store


# psm_jax.atomic is imported lazily, like every psm_jax import here: `import sae.activations` stays free of jax.

def _fsync_dir(path: Path):
    from psm_jax.atomic import fsync_dir

    fsync_dir(path)


def _atomic_write_json(path: Path, obj) -> None:
    from psm_jax.atomic import atomic_write_json

    atomic_write_json(path, obj, indent=1, sync_dir=True)


def _kill_point(event: str) -> None:
    from psm_jax.atomic import kill_point

    kill_point(event)


def _checksum(algo: str, data) -> str:
    """Hex digest of a bytes-like object: "xxh3_64" (the cheap default check; benchmarks/store_verify.py measures
    it) or "sha256" (the full audit of `verify()`)."""
    if algo == "xxh3_64":
        import xxhash

        return xxhash.xxh3_64_hexdigest(data)
    return hashlib.sha256(data).hexdigest()


def _read_bytes(path: Path) -> np.ndarray:
    """The whole file as a writable uint8 array (one read, no zero-filled buffer)."""
    buf = np.empty(path.stat().st_size, np.uint8)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        got = 0
        while got < len(buf):
            n = f.readinto(view[got:])
            if not n:
                raise ChunkError(f"{path}: file shrank while it was read ({got} of {len(buf)} bytes)")
            got += n
    return buf


def _parse_npy(buf: np.ndarray) -> np.ndarray:
    """The array of a .npy file held in `buf` (a view of its data when the header allows, else a copy)."""
    import io

    head = io.BytesIO(buf[:1 << 16].tobytes())
    version = np.lib.format.read_magic(head)
    if version not in ((1, 0), (2, 0)):
        return np.load(io.BytesIO(buf.tobytes()), allow_pickle=False)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = reader(head)
    if dtype.hasobject:
        raise ValueError(f"object dtype {dtype} in an activation store file")
    count = int(np.prod(shape, dtype=np.int64))
    data = buf[head.tell():head.tell() + count * dtype.itemsize]
    if len(data) != count * dtype.itemsize:
        raise ValueError(f"{len(data)} data bytes for shape {shape} {dtype}")
    return data.view(dtype).reshape(shape, order="F" if fortran else "C")


def _file_entry(path: Path) -> dict:
    """Manifest entry of a written chunk file: size, xxh3_64 and sha256 of its bytes."""
    buf = _read_bytes(path)
    return {"bytes": len(buf), "xxh3_64": _checksum("xxh3_64", buf), "sha256": _checksum("sha256", buf)}


def _corpus_fingerprint(ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode())
        h.update(b"\0")
    return h.hexdigest()


class ActivationStore:
    """A harvested activation store (read side). Open with `ActivationStore(path)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.is_file():
            raise ActivationError(f"{self.path} is not an activation store (no manifest.json)")
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise ChunkError(f"{mpath}: corrupt manifest ({e})") from e
        if self.manifest.get("format") != STORE_FORMAT:
            raise ActivationError(f"{mpath}: not a {STORE_FORMAT} manifest")
        if self.manifest.get("version") != STORE_VERSION:
            raise ActivationError(f"{mpath}: store version {self.manifest.get('version')}, expected {STORE_VERSION}")
        self._checked: set[str] = set()  # files whose checksum this object verified (verify="checksum")

    # -- description
    @property
    def sites_layers(self) -> list[tuple[str, int]]:
        return [(s, int(l)) for s, l in self.manifest["sites_layers"]]

    @property
    def chunks(self) -> list[dict]:
        return self.manifest["chunks"]

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def d(self, site: str, layer: int) -> int:
        self._check_key(site, layer)
        return int(self.manifest["d"][site_key(site, layer)])

    def _check_key(self, site: str, layer: int, d_in: int | None = None):
        if (site, int(layer)) not in self.sites_layers:
            raise ActivationError(f"({site!r}, {layer}) is not in the store {self.path}; it holds "
                                  f"{self.sites_layers}")
        if d_in is not None:
            d = int(self.manifest["d"][site_key(site, layer)])
            if int(d_in) != d:
                raise ActivationError(f"d_in={d_in} does not match the store's {site}.{layer} width d={d} "
                                      f"({self.path})")

    def doc_ids(self) -> list[str]:
        """Corpus document id for each doc index stored in `doc_ids` arrays."""
        return json.loads((self.path / "docs.json").read_text())["ids"]

    # -- chunk access
    def _file(self, chunk: dict, name: str) -> Path:
        return self.path / "chunks" / chunk["name"] / name

    def read_chunk(self, i: int, keys: Sequence[tuple[str, int]] | None = None, meta: Sequence[str] = META_FIELDS,
                   verify: str = "checksum") -> dict:
        """Arrays of chunk i: {(site, layer): float32 [n, D], "roles": ..., ...}. `verify` as in `iter_batches`."""
        chunk = self.chunks[i]
        keys = self.sites_layers if keys is None else keys
        names = [(k, site_key(*k) + ".npy") for k in keys] + [(m, m + ".npy") for m in meta]
        out = {}
        for k, fname in names:
            arr = self._load(chunk, fname, verify)
            if len(arr) != chunk["n_tokens"]:
                raise ChunkError(f"{self._file(chunk, fname)}: {len(arr)} rows, manifest says {chunk['n_tokens']}")
            if isinstance(k, tuple):
                arr = arr.astype(np.float32, copy=False)
            out[k] = arr
        return out

    def _load(self, chunk: dict, fname: str, verify: str) -> np.ndarray:
        if verify not in VERIFY_MODES:
            raise ActivationError(f"verify={verify!r}; expected one of {VERIFY_MODES}")
        p = self._file(chunk, fname)
        info = chunk["files"].get(fname)
        if info is None:
            raise ChunkError(f"{p}: not listed in the manifest of {self.path}")
        if not p.is_file():
            raise ChunkError(f"{p}: chunk file is missing")
        if verify != "none" and p.stat().st_size != info["bytes"]:
            raise ChunkError(f"{p}: size {p.stat().st_size} bytes, manifest says {info['bytes']} (corrupt chunk)")
        algo = None
        if verify == "sha256":
            algo = "sha256"
        elif verify == "checksum" and str(p) not in self._checked:
            algo = "xxh3_64" if "xxh3_64" in info else "sha256"  # stores written before xxh3_64 was recorded
        buf = _read_bytes(p)
        if algo is not None:
            actual = _checksum(algo, buf)
            if actual != info[algo]:
                raise ChunkError(f"{p}: {algo} {actual}, manifest says {info[algo]} (corrupt chunk: the file has "
                                 "the bytes of another write or flipped bytes; re-harvest it)")
            self._checked.add(str(p))
        try:
            return _parse_npy(buf)
        except Exception as e:
            raise ChunkError(f"{p}: unreadable chunk file ({type(e).__name__}: {e})") from e

    def verify(self) -> None:
        """Check every chunk file against the manifest's sizes and sha256 (raises ChunkError)."""
        for chunk in self.chunks:
            for fname in chunk["files"]:
                self._load(chunk, fname, "sha256")

    # -- shuffled batches
    def _stream_ident(self, keys, batch_size, seed, window_chunks, role_sel) -> dict:
        return dict(seed=int(seed), batch_size=int(batch_size), window_chunks=int(window_chunks),
                    keys=[[s, int(l)] for s, l in keys], roles=role_sel, n_chunks=len(self.chunks),
                    n_tokens=self.n_tokens, store=self.manifest["store_id"])

    def start_cursor(self, keys: Sequence[tuple[str, int]], batch_size: int, seed: int = 0, *,
                     window_chunks: int = 4, roles: Sequence[int | str] | None = None) -> dict:
        """The cursor of a stream's very first batch (what `iter_batches` starts from by default)."""
        role_sel = None if roles is None else sorted({role_id(r) for r in roles})
        return dict(self._stream_ident(keys, batch_size, seed, window_chunks, role_sel), epoch=0, window=0, offset=0)

    def batches(self, site: str, layer: int, batch_size: int, seed: int = 0, start_cursor: dict | None = None,
                **kw) -> Iterator[tuple[np.ndarray, dict]]:
        """Shuffled float32 [batch_size, D] batches of one (site, layer), each with the cursor after it.

        Passing a yielded cursor back as `start_cursor` continues with exactly the next batch.
        Keyword options as in `iter_batches` (epochs, window_chunks, roles, d_in, verify).
        """
        kw.setdefault("with_meta", False)
        for b, cur in self.iter_batches([(site, layer)], batch_size, seed, start_cursor, **kw):
            yield b.acts[(site, int(layer))], cur

    def iter_batches(self, keys: Sequence[tuple[str, int]], batch_size: int, seed: int = 0,
                     start_cursor: dict | None = None, *, epochs: int | None = None, window_chunks: int = 4,
                     roles: Sequence[int | str] | None = None, d_in: int | None = None, with_meta: bool = True,
                     verify: str = "checksum", prefetch: bool = True) -> Iterator[tuple[ActivationBatch, dict]]:
        """Shuffled ActivationBatches holding every key in `keys` (aligned rows), with cursors.

        Order: per epoch e, chunks are permuted with default_rng([seed, e]); consecutive groups of
        `window_chunks` chunks are loaded together and their rows permuted with
        default_rng([seed, e, w]); batches are consecutive slices of that stream (a batch may span
        two windows; the last partial batch of an epoch is dropped). The cursor
        {"epoch", "window", "offset", ...} names the next row; it is plain JSON.
        roles: keep only rows with these roles (applied before the permutation).
        epochs: None for an endless stream.
        prefetch: load the next window in a background thread while the current one is served.
        verify: "checksum" (default: sizes, plus the xxh3_64 hash of each file the first time this store
            object loads it; benchmarks/store_verify.py measures its cost), "sha256" (full hash on every
            load), "size" (sizes only) or "none".
        """
        keys = [(s, int(l)) for s, l in keys]
        for s, l in keys:
            self._check_key(s, l, d_in)
        if batch_size < 1:
            raise ActivationError(f"batch_size={batch_size}; expected >= 1")
        if not self.chunks:
            raise ActivationError(f"the store {self.path} holds no chunks")
        role_sel = None if roles is None else sorted({role_id(r) for r in roles})
        ident = self._stream_ident(keys, batch_size, seed, window_chunks, role_sel)
        epoch, window, offset = 0, 0, 0
        if start_cursor is not None:
            for k, v in ident.items():
                if start_cursor.get(k) != v:
                    raise ActivationError(f"cursor does not match this stream: {k}={start_cursor.get(k)!r}, "
                                          f"expected {v!r}")
            epoch, window, offset = (int(start_cursor[k]) for k in ("epoch", "window", "offset"))
        n_chunks = len(self.chunks)
        n_windows = -(-n_chunks // window_chunks)
        meta = META_FIELDS if with_meta else (("roles",) if role_sel is not None else ())

        def load_window(e: int, w: int) -> dict:
            order = np.random.default_rng([seed, e]).permutation(n_chunks)
            ids = order[w * window_chunks:(w + 1) * window_chunks]
            parts = [self.read_chunk(int(i), keys, meta, verify) for i in ids]
            data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            if role_sel is not None:
                sel = np.isin(data["roles"], role_sel)
                data = {k: v[sel] for k, v in data.items()}
            n = len(data[keys[0]])
            perm = np.random.default_rng([seed, e, w]).permutation(n)
            return {k: v[perm] for k, v in data.items()}

        if window_chunks < 1:
            raise ActivationError(f"window_chunks={window_chunks}; expected >= 1")
        if verify not in VERIFY_MODES:
            raise ActivationError(f"verify={verify!r}; expected one of {VERIFY_MODES}")

        def schedule(e: int, w: int):
            """Windows in stream order from (e, w)."""
            if w >= n_windows:
                e, w = e + 1, 0
            while epochs is None or e < epochs:
                yield e, w
                w += 1
                if w >= n_windows:
                    e, w = e + 1, 0

        pool = None
        if prefetch:
            from concurrent.futures import ThreadPoolExecutor
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-prefetch")
        ahead: dict = {}
        order = schedule(epoch, window)

        def get_window(e: int, w: int) -> dict:
            if pool is None:
                return load_window(e, w)
            while (e, w) not in ahead:
                nxt = next(order, None)
                if nxt is None:
                    return load_window(e, w)
                ahead[nxt] = pool.submit(load_window, *nxt)
            fut = ahead.pop((e, w))
            nxt = next(order, None)  # queue one window ahead
            if nxt is not None:
                ahead[nxt] = pool.submit(load_window, *nxt)
            return fut.result()

        try:
            yield from self._serve(get_window, keys, ident, batch_size, epochs, n_windows, epoch, window, offset,
                                   role_sel)
        finally:
            if pool is not None:
                for f in ahead.values():
                    f.cancel()
                pool.shutdown(wait=True)

    def _serve(self, get_window, keys, ident, batch_size, epochs, n_windows, epoch, window, offset, role_sel):
        while epochs is None or epoch < epochs:
            pieces: list[dict] = []
            have = 0
            epoch_rows = 0
            yielded = False
            fresh = window == 0 and offset == 0
            w, off = window, offset
            while w < n_windows:
                data = get_window(epoch, w)
                n = len(data[keys[0]])
                epoch_rows += n
                while off < n:
                    take = min(batch_size - have, n - off)
                    pieces.append({k: v[off:off + take] for k, v in data.items()})
                    have += take
                    off += take
                    if have == batch_size:
                        cat = {k: np.concatenate([p[k] for p in pieces]) if len(pieces) > 1 else pieces[0][k]
                               for k in pieces[0]}
                        nw, no = (w + 1, 0) if off >= n else (w, off)
                        cursor = dict(ident, epoch=epoch, window=nw, offset=no)
                        yielded = True
                        yield _store_batch(cat, keys), cursor
                        pieces, have = [], 0
                w, off = w + 1, 0
            if fresh and not yielded:
                what = "rows" if role_sel is None else f"rows with roles {role_sel}"
                raise ActivationError(f"the store {self.path} holds {epoch_rows} {what}, fewer than "
                                      f"batch_size={batch_size}")
            epoch, window, offset = epoch + 1, 0, 0


class StoreSource:
    """Iterator of float32 [batch_size, d_in] arrays from a store, with a JSON `cursor` and `seek(cursor)`.

    The data-source protocol of `sae.train.train`: the cursor after each batch is exact, so a resumed run
    sees the very same batch sequence. Several sources (different seeds, SAEs, layers) can read one store.
    """

    def __init__(self, store: "ActivationStore | str | os.PathLike", site: str, layer: int, batch_size: int, *,
                 seed: int = 0, epochs: int | None = None, roles: Sequence[int | str] | None = None,
                 window_chunks: int = 4, d_in: int | None = None, verify: str = "checksum", prefetch: bool = True):
        self.store = store if isinstance(store, ActivationStore) else ActivationStore(store)
        self.store._check_key(site, layer, d_in)
        self.site, self.layer, self.batch_size, self.seed = site, int(layer), int(batch_size), int(seed)
        self._kw = dict(epochs=epochs, roles=roles, window_chunks=window_chunks, verify=verify, prefetch=prefetch)
        self._cursor = self.store.start_cursor([(site, self.layer)], batch_size, seed, window_chunks=window_chunks,
                                               roles=roles)
        self._it = None

    @property
    def d_in(self) -> int:
        return self.store.d(self.site, self.layer)

    @property
    def cursor(self) -> dict:
        return dict(self._cursor)

    def seek(self, cursor: Mapping[str, Any]) -> None:
        self._close()
        self._cursor = dict(cursor)

    def _close(self):
        if self._it is not None:
            self._it.close()
            self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self._it is None:
            self._it = self.store.batches(self.site, self.layer, self.batch_size, self.seed,
                                          start_cursor=self._cursor, **self._kw)
        batch, self._cursor = next(self._it)
        return batch


class StreamSource:
    """Train while harvesting: float32 [batch_size, d_in] arrays of one (site, layer) from `stream_batches`.

    cursor = {"mode": "stream", "batches": n}; `seek` replays the harvest and skips n batches (exact,
    deterministic, but it recomputes the forward: prefer a StoreSource when resuming matters).
    """

    def __init__(self, model, documents, site: str, layer: int, batch_size: int, **stream_kw):
        self._args = (model, documents, [(site, int(layer))], batch_size)
        self._key = (site, int(layer))
        self._kw = stream_kw
        self._n = 0
        self._it = None
        self.d_in = _site_width(model.config, site)

    @property
    def cursor(self) -> dict:
        return {"mode": "stream", "batches": self._n}

    def seek(self, cursor: Mapping[str, Any]) -> None:
        if cursor.get("mode") != "stream":
            raise ActivationError(f"cursor {dict(cursor)!r} is not a streaming cursor")
        if self._it is not None:
            self._it.close()
        self._it, self._n = None, int(cursor["batches"])

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self._it is None:
            self._it = stream_batches(*self._args, start_batch=self._n, **self._kw)
        batch, cur = next(self._it)
        self._n = cur["batches"]
        return batch.acts[self._key]


def _store_batch(cat: dict, keys) -> ActivationBatch:
    acts = {k: cat[k] for k in keys}
    meta = {f: cat.get(f, np.zeros(0, META_DTYPES[f])) for f in META_FIELDS}
    return ActivationBatch(acts, **meta)


def _manifest_config(model, pairs, d, context_len, mode, token_filter, dtype, doc_ids, corpus_report):
    config = model.config
    ident = {"source": str(getattr(model, "source", None)), "family": config.family,
             "n_layers": config.n_layers, "d_model": config.d_model}
    param_dtype = str(np.dtype(model.params["embed"].dtype))
    if param_dtype != "float32":       # a bf16 harvest never resumes into (or mixes with) a float32 one
        ident["param_dtype"] = param_dtype
    return {
        "model": ident,
        "sites_layers": [[s, l] for s, l in pairs],
        "sites": list(dict.fromkeys(s for s, _ in pairs)),
        "layers": sorted({l for _, l in pairs}),
        "d": d,
        "d_model": config.d_model,
        "dtype": dtype,
        "context_len": context_len,
        "mode": mode,
        "token_filter": token_filter.to_dict(),
        "corpus": {"n_documents": len(doc_ids), "fingerprint": _corpus_fingerprint(doc_ids),
                   "report": corpus_report},
    }


_MATCH_KEYS = ("model", "sites_layers", "dtype", "context_len", "mode", "token_filter")


def harvest_to_store(model, documents, path: str | os.PathLike, sites_layers, *, context_len: int = 256,
                     batch_size: int = 8, mode: str = "truncate", token_filter: TokenFilter = TokenFilter(),
                     chunk_tokens: int = 1 << 15, max_tokens: int | None = None, dtype: str = "float32",
                     encode: Callable[[Any], Encoded] | None = None, progress: bool = False,
                     truncate_layers: bool = True, overwrite: bool = False) -> ActivationStore:
    """Harvest into an on-disk store at `path`, resuming an unfinished store there.

    Chunks hold >= chunk_tokens kept tokens (whole forward batches; the last chunk may be smaller).
    Resuming checks that model, sites/layers, context_len, mode, filter, dtype and the corpus match
    the manifest (raises otherwise) and restarts after the last chunk listed in the manifest.
    max_tokens: stop once the store holds at least this many tokens (a later call with a larger
    budget continues the same store). `overwrite=True` deletes an existing store first.
    Crash points named for psm_jax.atomic.kill_point: "store_docs" (docs.json written, no manifest yet),
    "chunk_file" (a chunk file written but not flushed), "chunk_renamed" (a chunk in place, not yet in
    the manifest), "manifest_updated" (a chunk listed in the manifest).
    """
    path = Path(path)
    if dtype not in STORE_DTYPES:
        raise ActivationError(f"dtype={dtype!r}; expected one of {STORE_DTYPES}")
    if chunk_tokens < 1:
        raise ActivationError(f"chunk_tokens={chunk_tokens}; expected >= 1")
    params, config, tokenizer = _model_parts(model)
    pairs = _normalize_sites_layers(sites_layers, config.n_layers)
    corpus_report = getattr(getattr(documents, "report", None), "to_dict", lambda: None)()
    docs = _documents(documents)
    if len(docs) == 0:
        raise ActivationError("the corpus is empty (nothing to harvest)")
    doc_ids = list(getattr(documents, "ids", None) or [str(i) for i in range(len(docs))])
    d = {site_key(s, l): _site_width(config, s) for s, l in pairs}
    cfg = _manifest_config(model, pairs, d, context_len, mode, token_filter, dtype, doc_ids, corpus_report)

    mpath = path / "manifest.json"
    if overwrite and path.exists():
        if path.is_dir() and (mpath.exists() or (path / "chunks").exists() or _only_new_store_files(path)):
            shutil.rmtree(path)
        elif any(path.iterdir()) if path.is_dir() else True:
            raise ActivationError(f"refusing to overwrite {path}: it is not an activation store")
    if mpath.exists():
        manifest = ActivationStore(path).manifest
        for k in _MATCH_KEYS:
            if manifest[k] != cfg[k]:
                raise ActivationError(f"the store at {path} was harvested with a different {k}: "
                                      f"{manifest[k]!r} vs {cfg[k]!r} (use another directory or overwrite=True)")
        if manifest["corpus"]["fingerprint"] != cfg["corpus"]["fingerprint"]:
            raise ActivationError(f"the store at {path} was harvested from a different corpus "
                                  "(document ids differ); use another directory or overwrite=True")
    else:
        if path.exists() and not _only_new_store_files(path):
            raise ActivationError(f"{path} exists, is not empty and has no manifest.json; refusing to write there")
        path.mkdir(parents=True, exist_ok=True)
        _atomic_write_json(path / "docs.json", {"ids": doc_ids, "report": corpus_report})
        _kill_point("store_docs")
        manifest = dict(format=STORE_FORMAT, version=STORE_VERSION, store_id=uuid.uuid4().hex, **cfg,
                        n_tokens=0, n_contexts=0, complete=False, chunks=[], created=time.time())
        _atomic_write_json(mpath, manifest)
    for p in path.glob(".*.tmp"):  # temporary files of an atomic write that was killed
        if p.is_file():
            p.unlink()
    chunks_dir = path / "chunks"
    chunks_dir.mkdir(exist_ok=True)
    listed = {c["name"] for c in manifest["chunks"]}
    for p in chunks_dir.iterdir():  # orphans of a crash: temp dirs and unlisted chunks
        if p.name not in listed:
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    budget_done = max_tokens is not None and manifest["n_tokens"] >= max_tokens
    if manifest["complete"] or budget_done:
        return ActivationStore(path)
    start = manifest["n_contexts"]
    remaining = None if max_tokens is None else max_tokens - manifest["n_tokens"]
    pending: list[ActivationBatch] = []
    pending_n = 0

    def flush(final: bool):
        nonlocal pending, pending_n, manifest
        if not pending:
            return
        ab = ActivationBatch.concat(pending)
        ctx_end = max(b.context_end for b in pending)
        name = f"chunk_{len(manifest['chunks']):06d}"
        tmp = chunks_dir / f".tmp_{name}_{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        files = {}
        arrays = {site_key(*k) + ".npy": v.astype(dtype) for k, v in ab.acts.items()}
        arrays.update({f + ".npy": getattr(ab, f).astype(META_DTYPES[f]) for f in META_FIELDS})
        for fname, arr in arrays.items():
            fp = tmp / fname
            with open(fp, "wb") as f:
                np.save(f, arr, allow_pickle=False)
                _kill_point("chunk_file")
                f.flush()
                os.fsync(f.fileno())
            files[fname] = _file_entry(fp)
        _fsync_dir(tmp)
        final_dir = chunks_dir / name
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.rename(tmp, final_dir)
        _fsync_dir(chunks_dir)
        _kill_point("chunk_renamed")
        entry = {"name": name, "n_tokens": len(ab), "context_start": manifest["n_contexts"],
                 "context_end": int(ctx_end), "files": files}
        manifest = dict(manifest, chunks=manifest["chunks"] + [entry], n_tokens=manifest["n_tokens"] + len(ab),
                        n_contexts=int(ctx_end), updated=time.time())
        _atomic_write_json(mpath, manifest)
        _kill_point("manifest_updated")
        pending, pending_n = [], 0

    exhausted = True
    for ab in harvest(model, documents, pairs, context_len=context_len, batch_size=batch_size, mode=mode,
                      token_filter=token_filter, start_context=start, encode=encode, progress=progress,
                      truncate_layers=truncate_layers):
        pending.append(ab)
        pending_n += len(ab)
        if pending_n >= chunk_tokens:
            flush(False)
        if remaining is not None and manifest["n_tokens"] + pending_n >= max_tokens:
            exhausted = False
            break
    flush(True)
    if exhausted:
        manifest = dict(manifest, complete=True, updated=time.time())
        _atomic_write_json(mpath, manifest)
    if manifest["n_tokens"] == 0:
        raise ActivationError("the harvest kept no token (empty corpus after filtering, or a token filter "
                              f"that excludes everything: {token_filter})")
    return ActivationStore(path)


def _only_new_store_files(path: Path) -> bool:
    """True for a folder holding nothing, or only what a harvest killed before its first manifest leaves
    (docs.json, temporary files of atomic writes): a fresh store may be started there."""
    return path.is_dir() and all(p.name == "docs.json" or (p.name.startswith(".") and p.name.endswith(".tmp"))
                                 for p in path.iterdir())


def _site_width(config, site: str) -> int:
    """Flattened activation width of a site."""
    if site in ("q", "q_prerope"):
        return config.n_heads * config.head_dim
    if site in ("k", "v", "k_prerope"):
        return config.n_kv_heads * config.head_dim
    return config.d_model
