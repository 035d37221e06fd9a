"""Held-out multiple-choice questions that measure what an edit (such as an activation cap) costs in general
capability.

Strict files put correct answers at every option position, so that a preference for one position cannot pass for
ability.
"""
from __future__ import annotations

import dataclasses

from .checking import PathLike, _norm_text, _open, _src

# Sizes enforced when strict=True.
MIN_QA_ITEMS = 40
QA_OPTIONS = 4


@dataclasses.dataclass(frozen=True)
class QAItem:
    """A four-option multiple-choice question; `answer` indexes `options`."""
    question: str
    options: tuple[str, ...]
    answer: int
    category: str | None

    def prompt(self) -> str:
        """The question with its options listed, as the user turn."""
        letters = "ABCDEFGH"
        listed = "\n".join(f"{letters[i]}) {o}" for i, o in enumerate(self.options))
        return f"{self.question}\n{listed}\nAnswer with the correct option."



def load_qa(path: PathLike | None = None, *, strict: bool = True) -> tuple[QAItem, ...]:
    """Held-out multiple-choice questions (capability/qa.json, or ``path``): QA_OPTIONS distinct options each,
    `answer` in range, no repeated question; strict also needs MIN_QA_ITEMS items with every answer position
    used."""
    src = _src(path, "capability", "qa.json")
    c, d = _open(src)
    raw = c.array(d, "items", min_len=MIN_QA_ITEMS if strict else 1, what="questions")
    out, seen = [], {}
    for i, it in enumerate(raw):
        ctx = f"items[{i}]"
        c.obj(it, ctx, "question, options, answer")
        q = c.string(it, "question", ctx)
        key = _norm_text(q)
        if key in seen:
            c.fail(f"{ctx}.question", f"no duplicates, but it repeats items[{seen[key]}]", repr(q))
        seen[key] = i
        options = c.strings(it, "options", ctx)
        if len(options) != QA_OPTIONS:
            c.fail(f"{ctx}.options", f"exactly {QA_OPTIONS} options", f"{len(options)}")
        ans = c.field(it, "answer", ctx)
        if not isinstance(ans, int) or isinstance(ans, bool) or not 0 <= ans < QA_OPTIONS:
            c.fail(f"{ctx}.answer", f"an index in range 0..{QA_OPTIONS - 1}", repr(ans))
        out.append(QAItem(question=q, options=options, answer=ans, category=c.opt_string(it, "category", ctx)))
    if strict:
        unused = sorted(set(range(QA_OPTIONS)) - {it.answer for it in out})
        if unused:
            c.fail("items", "correct answers at every option position", f"none at {unused}")
    return tuple(out)
