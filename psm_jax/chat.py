"""Chat messages -> tokens with a role id and a turn id per token.

Persona methods need to know which tokens the model *wrote* (assistant content), which it was
told (user/system content) and which are chat-template scaffolding (`<|im_start|>assistant\\n`).
The role masks are derived from the model's own chat template, never from hand-written rules:

1. the conversation is rendered once with every message's content replaced by a unique marker;
   the text between markers is the template's own text, so the real rendering must be
   `piece_0 + content_0 + piece_1 + ... + piece_n`, which pins every content's character span
   (templates that trim content are handled; anything else is reported as an error);
2. turn boundaries come from prefix differences: the rendering of `messages[:k]` ends where
   message k's block starts (with a fallback for templates whose prefixes are not prefixes);
3. the full text is tokenized once with character offsets, exactly as the model will see it,
   and each token takes the role of the content it overlaps, or Role.TEMPLATE.

A system prompt the template inserts by itself (SmolLM2: "You are a helpful AI assistant named
SmolLM, ...") is detected by rendering with an explicit system message; its content tokens get
Role.SYSTEM and, like its scaffolding, turn id TURN_DEFAULT_SYSTEM (-2) so that turn ids >= 0
always index the caller's `messages`.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np


class Role(enum.IntEnum):
    TEMPLATE = 0
    SYSTEM = 1
    USER = 2
    ASSISTANT = 3


ROLE_PAD = -1  # role id of padding positions in pad_batch
TURN_AFTER = -1  # tokens after the last message (e.g. the generation prompt)
TURN_DEFAULT_SYSTEM = -2  # a system prompt the template inserted by itself
TURN_PAD = -3  # turn id of padding positions in pad_batch

_ROLE_BY_NAME = {"system": Role.SYSTEM, "user": Role.USER, "assistant": Role.ASSISTANT}
_MARK = "\ue000psm{}\ue001"  # private-use characters: never trimmed, never in real text


@dataclasses.dataclass(frozen=True)
class ChatEncoding:
    """One conversation, tokenized as the model sees it, with per-token roles and turns."""

    tokens: np.ndarray  # int32 [T]
    roles: np.ndarray  # int8 [T], Role values
    turns: np.ndarray  # int32 [T]: message index, TURN_AFTER or TURN_DEFAULT_SYSTEM
    text: str  # the rendered chat text
    offsets: np.ndarray  # int32 [T, 2] character span of each token in `text`
    spans: tuple[tuple[int, int], ...]  # character span of each message's content in `text`
    default_system: str | None = None  # the system prompt the template inserted, if any

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


class ChatTemplateError(ValueError):
    """The chat template cannot be mapped back to per-message spans."""


def _template_of(tokenizer, chat_template: str | None) -> str:
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):  # named templates: use the default one
        template = template.get("default")
    if not template:
        raise ChatTemplateError("no chat template: the tokenizer has none and none was passed (chat_template=...)")
    return template


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in _ROLE_BY_NAME:
            raise ValueError(f"message {i} has role {role!r}; expected one of {sorted(_ROLE_BY_NAME)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} content must be a string, got {type(content).__name__}")
        out.append(dict(m))
    return out


def _render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _with_contents(messages: list[dict], contents: Sequence[str]) -> list[dict]:
    return [{**m, "content": c} for m, c in zip(messages, contents)]


def _detect_default_system(tokenizer, template, messages, agp, full) -> str | None:
    """The system prompt the template inserts when none is given, or None.

    Rendering [system: MARK] + messages must equal the plain rendering with MARK replaced by one
    string D; then D is what the template inserted, and rendering [system: D] + messages checks it.
    """
    if messages and messages[0]["role"] == "system":
        return None
    mark = _MARK.format("sys")
    try:
        with_sys = _render(tokenizer, template, [{"role": "system", "content": mark}] + messages, agp)
    except Exception:  # noqa: BLE001 - templates may reject system messages: then none is inserted
        return None
    if with_sys.count(mark) != 1:
        return None
    head, tail = with_sys.split(mark)
    if not (full.startswith(head) and full.endswith(tail) and len(full) > len(head) + len(tail)):
        return None
    default = full[len(head): len(full) - len(tail)]
    try:
        again = _render(tokenizer, template, [{"role": "system", "content": default}] + messages, agp)
    except Exception:  # noqa: BLE001
        return None
    return default if again == full else None


def _content_spans(tokenizer, template, messages, agp, full) -> list[tuple[int, int]]:
    """Character span of each message's content in `full` (see the module docstring, step 1)."""
    marks = [_MARK.format(i) for i in range(len(messages))]
    marked = _render(tokenizer, template, _with_contents(messages, marks), agp)
    pieces, rest = [], marked
    for i, mark in enumerate(marks):
        if rest.count(mark) != 1:
            raise ChatTemplateError(
                f"the chat template renders message {i}'s content {rest.count(mark)} times (expected once); "
                "role masks cannot be derived from it"
            )
        before, rest = rest.split(mark)
        pieces.append(before)
    pieces.append(rest)

    spans, pos = [], 0
    for i, m in enumerate(messages):
        if not full.startswith(pieces[i], pos):
            raise ChatTemplateError(
                f"the chat template renders differently around message {i} when its content changes; "
                "role masks cannot be derived from it"
            )
        pos += len(pieces[i])
        content = m["content"]
        for cand in dict.fromkeys((content, content.strip(), content.rstrip(), content.lstrip())):
            if full.startswith(cand, pos) and full.startswith(pieces[i + 1], pos + len(cand)):
                break
        else:
            raise ChatTemplateError(
                f"content of message {i} ({m['role']}) was not found where the chat template puts it "
                "(the template transforms content beyond trimming whitespace)"
            )
        spans.append((pos, pos + len(cand)))
        pos += len(cand)
    if full[pos:] != pieces[-1]:
        raise ChatTemplateError("the chat template's text after the last message does not match its rendering")
    return spans


def _block_starts(tokenizer, template, messages, full, spans) -> list[int]:
    """b[k] = where message k's block starts in `full`; b[n] = end of the last block (step 2)."""
    n = len(messages)
    starts = [0]
    for k in range(1, n + 1):
        lo = spans[k - 1][1]
        hi = spans[k][0] if k < n else len(full)
        try:
            prefix = _render(tokenizer, template, messages[:k], False)
        except Exception:  # noqa: BLE001 - e.g. templates that demand a final user turn
            prefix = None
        if prefix is not None and full.startswith(prefix) and lo <= len(prefix) <= hi:
            starts.append(len(prefix))
            continue
        boundary = lo
        if prefix is not None:
            # Align the prefix rendering on the end of message k-1's content; the common text
            # after it is message k-1's closing scaffolding.
            content = full[spans[k - 1][0]:lo]
            at = prefix.rfind(content) if content else -1
            if at >= 0:
                tail = prefix[at + len(content):]
                common = 0
                while common < min(len(tail), hi - lo) and tail[common] == full[lo + common]:
                    common += 1
                boundary = lo + common
        starts.append(boundary)
    return starts


def encode_chat(
    tokenizer,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    chat_template: str | None = None,
) -> ChatEncoding:
    """Tokenize a conversation with its chat template; return tokens with per-token roles and turns.

    Turn ids: index into `messages` for the tokens of each message's block (template scaffolding
    included), TURN_AFTER (-1) for tokens after the last message (the generation prompt), and
    TURN_DEFAULT_SYSTEM (-2) for a system prompt the template inserted by itself.
    Raises ChatTemplateError (a ValueError) when the template gives no way to find the contents.
    """
    template = _template_of(tokenizer, chat_template)
    msgs = _check_messages(messages)
    agp = bool(add_generation_prompt)
    full = _render(tokenizer, template, msgs, agp)

    default = _detect_default_system(tokenizer, template, msgs, agp, full)
    work = ([{"role": "system", "content": default}] + msgs) if default is not None else msgs
    turn_ids = ([TURN_DEFAULT_SYSTEM] if default is not None else []) + list(range(len(msgs)))

    spans = _content_spans(tokenizer, template, work, agp, full)
    starts = _block_starts(tokenizer, template, work, full, spans)

    n_chars = len(full)
    char_role = np.zeros(n_chars + 1, np.int8)
    char_turn = np.full(n_chars + 1, TURN_AFTER, np.int32)
    for k, m in enumerate(work):
        char_turn[starts[k]:starts[k + 1]] = turn_ids[k]
        s, e = spans[k]
        char_role[s:e] = _ROLE_BY_NAME[m["role"]]

    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    if "offset_mapping" not in enc:
        raise ValueError("encode_chat needs a fast (Rust) tokenizer that returns offset mappings")
    tokens = np.asarray(enc["input_ids"], np.int32)
    offsets = np.asarray(enc["offset_mapping"], np.int32).reshape(-1, 2)
    first = np.clip(offsets[:, 0], 0, n_chars)
    last = np.clip(np.maximum(offsets[:, 1] - 1, offsets[:, 0]), 0, n_chars)
    # A token that overlaps content (at either end) carries that content's role and turn.
    use_last = (char_role[first] == Role.TEMPLATE) & (char_role[last] != Role.TEMPLATE)
    pick = np.where(use_last, last, first)
    roles = char_role[pick].astype(np.int8)
    turns = char_turn[pick].astype(np.int32)

    user_spans = [sp for sp, k in zip(spans, turn_ids) if k != TURN_DEFAULT_SYSTEM]
    return ChatEncoding(
        tokens=tokens, roles=roles, turns=turns, text=full, offsets=offsets,
        spans=tuple(user_spans), default_system=default,
    )


class PaddedBatch(NamedTuple):
    tokens: np.ndarray  # int32 [B, T]
    attention_mask: np.ndarray  # bool [B, T], False = padding
    roles: np.ndarray  # int8 [B, T], ROLE_PAD on padding
    turns: np.ndarray  # int32 [B, T], TURN_PAD on padding


def pad_batch(
    encodings: Sequence[ChatEncoding],
    pad_id: int,
    side: str = "left",
    length: int | None = None,
    multiple_of: int = 1,
) -> PaddedBatch:
    """Stack encodings (`ChatEncoding`s, or anything with tokens / roles / turns arrays) into a batch. Left padding
    keeps every sequence's last token at T-1, which is what generation and "last token" readouts want.

    `length` fixes T (an error if a sequence is longer); `multiple_of` rounds T up so that
    fewer distinct shapes reach a jitted forward.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not encodings:
        raise ValueError("pad_batch needs at least one encoding")
    longest = max(len(e.tokens) for e in encodings)
    T = longest if length is None else int(length)
    if T < longest:
        raise ValueError(f"length={T} is shorter than the longest sequence ({longest} tokens)")
    if multiple_of > 1:
        T = -(-T // multiple_of) * multiple_of
    B = len(encodings)
    tokens = np.full((B, T), pad_id, np.int32)
    mask = np.zeros((B, T), bool)
    roles = np.full((B, T), ROLE_PAD, np.int8)
    turns = np.full((B, T), TURN_PAD, np.int32)
    for b, e in enumerate(encodings):
        n = len(e.tokens)
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        tokens[b, sl] = e.tokens
        mask[b, sl] = True
        roles[b, sl] = e.roles
        turns[b, sl] = e.turns
    return PaddedBatch(tokens, mask, roles, turns)


def pad_id(model) -> int:
    """The id to pad a LoadedModel's batches with: the tokenizer's pad token, else the config's, else the
    tokenizer's EOS, else 0."""
    tok = model.tokenizer
    for cand in (getattr(tok, "pad_token_id", None), getattr(model.config, "pad_token_id", None),
                 getattr(tok, "eos_token_id", None)):
        if cand is not None:
            return int(cand)
    return 0


def post_instruction_positions(enc: ChatEncoding) -> np.ndarray:
    """Positions of the template tokens right after the last user content (e.g. `<|im_end|>\\n
    <|im_start|>assistant\\n`): where the model has read the request but not yet answered."""
    user = np.flatnonzero(enc.roles == Role.USER)
    if user.size == 0:
        raise ValueError("the conversation has no user content")
    pos = []
    for i in range(int(user[-1]) + 1, len(enc)):
        if enc.roles[i] != Role.TEMPLATE:
            break
        pos.append(i)
    return np.asarray(pos, np.int64)


def prompt_length(enc: ChatEncoding) -> int:
    """Number of prompt tokens: where the content of the last message starts when that message is
    an assistant answer (score the answer given the prompt), else len(enc) (e.g. a generation prompt)."""
    last = len(enc.spans) - 1
    content = np.flatnonzero((enc.roles == Role.ASSISTANT) & (enc.turns == last)) if last >= 0 else []
    return int(content[0]) if len(content) else len(enc)


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def messages_from_sharegpt(record: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict]:
    """ShareGPT record (`{"conversations": [{"from", "value"}]}` or the list itself) -> messages.

    "human" -> user, "gpt" -> assistant, "system" -> system; other speakers (e.g. "bing") are
    skipped, as are turns without a string value.
    """
    turns = record.get("conversations", []) if isinstance(record, Mapping) else record
    out = []
    for t in turns:
        role = _SHAREGPT_ROLES.get(str(t.get("from", "")).lower())
        value = t.get("value")
        if role is None or not isinstance(value, str):
            continue
        out.append({"role": role, "content": value})
    return out
