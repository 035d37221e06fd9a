"""Multi-turn conversations, persona-inducing ("roleplay") and "neutral", whose per-turn activations show drift
away from the Assistant.

The turn checks fix the shape the studies index into: an optional system message, then alternating user and
assistant turns ending with the assistant's, and for roleplay a system message that sets up the persona.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .checking import DatasetError, PathLike, _Checker, _is_path, _open, _packaged

# Sizes enforced when strict=True.
MIN_CONVERSATIONS = 6
MIN_EXCHANGES = 3
CONVERSATION_KINDS = ("roleplay", "neutral")


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclasses.dataclass(frozen=True)
class Conversation:
    id: str
    role: str | None           # the roles.json role the persona corresponds to, if any
    messages: tuple[Message, ...]

    @property
    def system(self) -> str | None:
        return self.messages[0].content if self.messages and self.messages[0].role == "system" else None

    @property
    def n_exchanges(self) -> int:
        return sum(m.role == "user" for m in self.messages)

    def as_dicts(self) -> list[dict[str, str]]:
        """Messages in the ``[{"role": ..., "content": ...}]`` form chat templates take."""
        return [{"role": m.role, "content": m.content} for m in self.messages]



def load_conversations(kind_or_path: PathLike, *, strict: bool = True) -> list[Conversation]:
    """Multi-turn conversations: "roleplay" (persona-inducing) or "neutral", or a file path."""
    if _is_path(kind_or_path):
        src, kind = Path(kind_or_path), None
    else:
        kind = str(kind_or_path)
        if kind not in CONVERSATION_KINDS:
            raise DatasetError(f"unknown conversation kind {kind!r}: expected one of {list(CONVERSATION_KINDS)} "
                               "or a path to a .json file")
        src = _packaged("conversations", f"{kind}.json")
    c, d = _open(src)
    file_kind = c.string(d, "kind")
    if file_kind not in CONVERSATION_KINDS:
        c.fail("kind", f"one of {list(CONVERSATION_KINDS)}", repr(file_kind))
    if kind is not None and file_kind != kind:
        c.fail("kind", repr(kind), repr(file_kind))
    raw = c.array(d, "conversations", min_len=MIN_CONVERSATIONS if strict else 1, what="conversations")
    out, seen = [], set()
    for i, conv in enumerate(raw):
        ctx = f"conversations[{i}]"
        c.obj(conv, ctx, "id and messages")
        cid = c.string(conv, "id", ctx)
        if cid in seen:
            c.fail(f"{ctx}.id", "a unique id", repr(cid))
        seen.add(cid)
        role = c.opt_string(conv, "role", ctx)
        msgs = _parse_messages(c, conv, ctx)
        _check_turns(c, msgs, ctx, strict=strict, roleplay=file_kind == "roleplay")
        out.append(Conversation(id=cid, role=role, messages=tuple(msgs)))
    return out


def _parse_messages(c: "_Checker", conv: dict, ctx: str) -> list[Message]:
    raw_msgs = c.array(conv, "messages", ctx, min_len=2, what="messages")
    msgs = []
    for j, m in enumerate(raw_msgs):
        mctx = f"{ctx}.messages[{j}]"
        c.obj(m, mctx, "role and content")
        r = c.string(m, "role", mctx)
        if r not in ("system", "user", "assistant"):
            c.fail(f"{mctx}.role", "'system', 'user' or 'assistant'", repr(r))
        msgs.append(Message(role=r, content=c.string(m, "content", mctx)))
    return msgs


def _check_turns(c: "_Checker", msgs: list[Message], ctx: str, *, strict: bool, roleplay: bool) -> None:
    """An optional system message, then user/assistant turns alternating and ending with the assistant's; strict
    files need MIN_EXCHANGES exchanges, and a roleplay conversation a system message that sets up the persona."""
    body = msgs[1:] if msgs[0].role == "system" else msgs
    for j, m in enumerate(body):
        want = "user" if j % 2 == 0 else "assistant"
        if m.role != want:
            pos = j + (len(msgs) - len(body))
            c.fail(f"{ctx}.messages[{pos}].role",
                   f"{want!r} (an optional system message first, then alternating user/assistant)", repr(m.role))
    if not body or body[-1].role != "assistant":
        c.fail(f"{ctx}.messages", "a conversation ending with an assistant message", "it does not")
    n_ex = len(body) // 2
    if strict and n_ex < MIN_EXCHANGES:
        c.fail(f"{ctx}.messages", f"at least {MIN_EXCHANGES} user/assistant exchanges", f"{n_ex}")
    if roleplay and msgs[0].role != "system":
        c.fail(f"{ctx}.messages[0]", "a system message establishing the persona (kind 'roleplay')",
               repr(msgs[0].role))
