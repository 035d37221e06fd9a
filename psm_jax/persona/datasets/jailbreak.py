"""Persona-jailbreak prompts: a persona set-up plus a mild request, with length-matched identity and opening
answers that the capping study scores by likelihood.

The answers of a pair must differ in content but not much in length, so that a likelihood difference reads the
persona and not the answer's length.
"""
from __future__ import annotations

import dataclasses

from .checking import MAX_WORD_GAP, PathLike, _norm_text, _open, _src, _words

# Sizes enforced when strict=True.
MIN_JAILBREAKS = 24
JAILBREAK_FRAMINGS = ("system", "user")


@dataclasses.dataclass(frozen=True)
class JailbreakPrompt:
    """A persona set-up (a system prompt, or a preamble of the user turn) plus a mild request, with two pairs of
    length-matched answers: identity (the Assistant's self-description vs the persona's) and opening (a compliant
    vs a declining first sentence)."""
    id: str
    persona: str
    framing: str  # "system" | "user"
    setup: str
    request: str
    assistant_identity: str
    persona_identity: str
    comply: str
    decline: str

    def persona_messages(self) -> list[dict[str, str]]:
        """The jailbreak conversation: [system: setup, user: request] or [user: setup + request]."""
        if self.framing == "system":
            return [{"role": "system", "content": self.setup}, {"role": "user", "content": self.request}]
        return [{"role": "user", "content": f"{self.setup}\n\n{self.request}"}]

    def default_messages(self) -> list[dict[str, str]]:
        """The same request under the Assistant's default prompt (no persona set-up)."""
        return [{"role": "user", "content": self.request}]



def load_persona_jailbreaks(path: PathLike | None = None, *, strict: bool = True) -> tuple[JailbreakPrompt, ...]:
    """Persona-jailbreak prompts (jailbreak/persona_jailbreaks.json, or ``path``). Each names its persona in its
    set-up and in-role identity answer; paired answers differ by at most MAX_WORD_GAP words."""
    src = _src(path, "jailbreak", "persona_jailbreaks.json")
    c, d = _open(src)
    raw = c.array(d, "items", min_len=MIN_JAILBREAKS if strict else 1, what="jailbreak prompts")
    out, seen = [], set()
    fields = ("id", "persona", "framing", "setup", "request", "assistant_identity", "persona_identity", "comply",
              "decline")
    for i, it in enumerate(raw):
        ctx = f"items[{i}]"
        c.obj(it, ctx, ", ".join(fields))
        v = {k: c.string(it, k, ctx) for k in fields}
        if v["id"] in seen:
            c.fail(f"{ctx}.id", "a unique id", repr(v["id"]))
        seen.add(v["id"])
        if v["framing"] not in JAILBREAK_FRAMINGS:
            c.fail(f"{ctx}.framing", f"one of {list(JAILBREAK_FRAMINGS)}", repr(v["framing"]))
        name = v["persona"].casefold()
        if name not in v["setup"].casefold():
            c.fail(f"{ctx}.setup", f"a set-up that names the persona {v['persona']!r}", repr(v["setup"]))
        if name.split()[-1] not in v["persona_identity"].casefold():
            c.fail(f"{ctx}.persona_identity", f"an in-role self-description naming {v['persona']!r}",
                   repr(v["persona_identity"]))
        for a, b in (("assistant_identity", "persona_identity"), ("comply", "decline")):
            if _norm_text(v[a]) == _norm_text(v[b]):
                c.fail(f"{ctx}.{b}", f"an answer different from {a}", repr(v[b]))
            if abs(_words(v[a]) - _words(v[b])) > MAX_WORD_GAP:
                c.fail(f"{ctx}.{b}", f"an answer within {MAX_WORD_GAP} words of {a} ({_words(v[a])} words)",
                       f"{_words(v[b])} words")
        out.append(JailbreakPrompt(**v))
    return tuple(out)
