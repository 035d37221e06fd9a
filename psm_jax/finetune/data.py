"""Chat fine-tuning data: conversations encoded once into fixed-width arrays, batches drawn by a cursor.

Every conversation is tokenized with its chat template (`psm_jax.chat.encode_chat`, which also gives
each token its role) and padded on the right to one `seq_len`, so every step sees the same shapes
and compiles once; longer conversations are cut at `seq_len` (or refused with truncate=False).

The order is a permutation per epoch drawn from an explicit key (`fold_in(key, epoch)`), so the
whole stream of batches is a function of (key, cursor): the checkpoint stores the cursor
(epoch, index within the epoch's order) and a resumed run draws exactly the batches the
interrupted one would have. A batch never straddles two epochs: the remainder of an epoch that
cannot fill a batch is skipped (static shapes).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from psm_jax.chat import Role, encode_chat, pad_batch

Conversation = Sequence[Mapping[str, Any]]


class Cursor(NamedTuple):
    """Where the next batch starts: the epoch and the index into that epoch's shuffled order."""

    epoch: int = 0
    index: int = 0


def read_chat_jsonl(path: str | os.PathLike) -> list[list[dict]]:
    """Conversations from a JSONL file of `{"messages": [{"role": ..., "content": ...}, ...]}` lines."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n} is not valid JSON ({err}); expected one object per line") from err
        msgs = rec.get("messages") if isinstance(rec, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{path}:{n} has no non-empty 'messages' list; got {line[:120]!r}")
        out.append(msgs)
    if not out:
        raise ValueError(f"{path} holds no conversations; expected JSONL lines with a 'messages' list")
    return out


@dataclasses.dataclass(frozen=True)
class ChatDataset:
    """tokens int32 [N, T], attention_mask bool [N, T], roles int8 [N, T] (ROLE_PAD on padding)."""

    tokens: np.ndarray
    attention_mask: np.ndarray
    roles: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @classmethod
    def from_conversations(cls, tokenizer, conversations: Sequence[Conversation], seq_len: int, pad_id: int, *,
                           truncate: bool = True, chat_template: str | None = None,
                           open_ended: Sequence[bool] | None = None) -> "ChatDataset":
        """Encode `conversations` (lists of messages) with the tokenizer's chat template, padded to `seq_len`.

        open_ended: per conversation, True where its last assistant message was cut short (a sampled answer that hit
        its token limit). Its closing template tokens are dropped, so training on it does not teach the model to end
        its answers at the cut."""
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len={seq_len!r}; expected an int >= 2")
        if isinstance(conversations, (str, os.PathLike)):
            raise TypeError(f"conversations={conversations!r} is a path; expected lists of messages "
                            "(use ChatDataset.from_jsonl for a JSONL file)")
        if not conversations:
            raise ValueError("no conversations; expected at least one list of messages")
        if open_ended is not None and len(open_ended) != len(conversations):
            raise ValueError(f"open_ended has {len(open_ended)} entries for {len(conversations)} conversations; "
                             "expected one per conversation")
        encs = []
        for i, conv in enumerate(conversations):
            enc = encode_chat(tokenizer, conv, chat_template=chat_template)
            if open_ended is not None and open_ended[i]:
                answer = np.flatnonzero(np.asarray(enc.roles) == Role.ASSISTANT)
                if not answer.size:
                    raise ValueError(f"conversation {i} is marked open-ended but has no assistant tokens")
                enc = _first_tokens(enc, int(answer[-1]) + 1)
            if len(enc) > seq_len:
                if not truncate:
                    raise ValueError(f"conversation {i} has {len(enc)} tokens; expected at most seq_len={seq_len} "
                                     "(or pass truncate=True)")
                enc = _first_tokens(enc, seq_len)
            encs.append(enc)
        batch = pad_batch(encs, pad_id, side="right", length=seq_len)
        return cls(batch.tokens, batch.attention_mask, batch.roles)

    @classmethod
    def from_jsonl(cls, tokenizer, path: str | os.PathLike, seq_len: int, pad_id: int, **kw) -> "ChatDataset":
        return cls.from_conversations(tokenizer, read_chat_jsonl(path), seq_len, pad_id, **kw)


def _first_tokens(enc, n: int):
    """An encoded chat cut to its first `n` tokens."""
    return dataclasses.replace(enc, tokens=enc.tokens[:n], roles=enc.roles[:n], turns=enc.turns[:n],
                               offsets=enc.offsets[:n])


def epoch_order(key: jax.Array, epoch: int, n: int) -> np.ndarray:
    """The shuffled order of epoch `epoch` (a permutation of range(n)), a pure function of (key, epoch)."""
    return np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))


def next_batch(data: ChatDataset, key: jax.Array, cursor: Cursor, batch_size: int) -> tuple[dict, Cursor]:
    """The batch at `cursor` (dict of numpy arrays [batch_size, T]) and the cursor after it."""
    n = len(data)
    if batch_size > n:
        raise ValueError(f"batch size {batch_size} exceeds the dataset's {n} conversations; expected at most {n}")
    epoch, index = cursor
    if index + batch_size > n:
        epoch, index = epoch + 1, 0
    rows = epoch_order(key, epoch, n)[index:index + batch_size]
    batch = {"tokens": data.tokens[rows], "attention_mask": data.attention_mask[rows], "roles": data.roles[rows]}
    return batch, Cursor(epoch, index + batch_size)
