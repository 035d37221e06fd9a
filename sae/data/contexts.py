"""Documents into fixed-length contexts: roles and turns of every token, which positions are kept, padding.

    docs (sae.data.corpus) --encode_documents--> context rows (tokens, roles, turns, doc ids; <= context_len)
      --batch_contexts--> ContextBatch [B, T] (left padded, attention mask, token keep mask)

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

Free of jax at import, like every module of sae.data (psm_jax is imported where it is used).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Sequence

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


class ActivationError(ValueError):
    """Bad request or bad data in the activation pipeline (message names what and where)."""



def role_id(r: int | str) -> int:
    if isinstance(r, str):
        if r.lower() not in ROLE_NAMES:
            raise ActivationError(f"unknown role {r!r}; expected one of {sorted(ROLE_NAMES)}")
        return ROLE_NAMES[r.lower()]
    r = int(r)
    if r not in ROLE_NAMES.values():
        raise ActivationError(f"unknown role id {r}; expected one of {sorted(ROLE_NAMES.values())}")
    return r



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
    if mode == "truncate":
        yield from _truncated_rows(documents, context_len, encode, start_context, doc_index_offset, chars_per_token)
        return
    encoded = (_arrays(encode(doc), d + doc_index_offset) for d, doc in enumerate(documents))
    rows = _split_rows if mode == "split" else _packed_rows
    yield from rows((a for a in encoded if a is not None), context_len, start_context)


def _arrays(enc: Encoded, doc_id: int) -> tuple[np.ndarray, ...] | None:
    """(tokens, roles, turns, doc ids) of one encoded document; None when it has no tokens."""
    n = len(enc.tokens)
    if not (len(enc.roles) == n and len(enc.turns) == n):
        raise ActivationError(f"encoder returned mismatched lengths for document {doc_id}")
    if n == 0:
        return None
    return (np.asarray(enc.tokens, np.int32), np.asarray(enc.roles, np.int8), np.asarray(enc.turns, np.int32),
            np.full(n, doc_id, np.int32))


def _truncated_rows(documents, T: int, encode, start_context: int, doc_index_offset: int,
                    chars_per_token: int) -> Iterator[ContextRow]:
    """One row per document (its first T tokens), indexed by the document: resuming skips tokenisation."""
    for d, doc in enumerate(documents):
        if d < start_context:
            continue
        cut, was_cut = _truncate_chars(doc, T * chars_per_token)
        enc = encode(cut)
        if was_cut and len(enc.tokens) < T + 16:
            enc = encode(doc)
        arrays = _arrays(enc, d + doc_index_offset)
        if arrays is not None:
            yield ContextRow(d, *(a[:T] for a in arrays))


def _split_rows(encoded: Iterable[tuple], T: int, start_context: int) -> Iterator[ContextRow]:
    """Each document cut into consecutive rows of T tokens (its last row shorter)."""
    idx = 0
    for arrays in encoded:
        for s in range(0, len(arrays[0]), T):
            if idx >= start_context:
                yield ContextRow(idx, *(a[s:s + T] for a in arrays))
            idx += 1


def _packed_rows(encoded: Iterable[tuple], T: int, start_context: int) -> Iterator[ContextRow]:
    """Documents concatenated and cut into full rows of T tokens; the remainder is the last, shorter row."""
    idx, pending, n_pending = 0, [], 0
    for arrays in encoded:
        pending.append(arrays)
        n_pending += len(arrays[0])
        if n_pending < T:
            continue
        joined = [np.concatenate([p[k] for p in pending]) for k in range(4)]
        full = n_pending // T
        for w in range(full):
            if idx >= start_context:
                yield ContextRow(idx, *(c[w * T:(w + 1) * T] for c in joined))
            idx += 1
        rest = tuple(c[full * T:] for c in joined)
        n_pending = len(rest[0])
        pending = [rest] if n_pending else []
    if n_pending and idx >= start_context:
        yield ContextRow(idx, *(np.concatenate([p[k] for p in pending]) for k in range(4)))


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
