"""Traits: the instruction pairs, extraction and evaluation questions, judge rubric and two-choice items from
which persona vectors are built and scored, plus each trait's stored item validity and held-out graded prompts.

The checks here keep the evaluation honest: evaluation questions must not repeat extraction ones, and the shipped
two-choice items must have length-matched answers with the trait answer's position balanced, so that neither length
nor position can stand in for the trait.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from .checking import (MAX_WORD_GAP, DatasetError, PathLike, _Checker, _is_path, _norm_text, _packaged, _read_json,
                       _typename, _words)

# Sizes enforced when strict=True.
TRAIT_PAIRS = 5
TRAIT_QUESTIONS = 20
TRAIT_BEHAVIOURAL_ITEMS = 24


@dataclasses.dataclass(frozen=True)
class InstructionPair:
    """System instructions that make an assistant show (``pos``) or not show (``neg``) a trait."""
    pos: str
    neg: str


@dataclasses.dataclass(frozen=True)
class GradedPrompt:
    """A system prompt of a stated trait level (-3 strongly against the trait .. +3 strongly for it, never 0)."""
    prompt: str
    level: int


@dataclasses.dataclass(frozen=True)
class BehaviouralItem:
    """A two-choice item; the trait measure is log P(trait choice) - log P(other choice)."""
    prompt: str
    choices: tuple[str, str]
    trait_choice: int

    @property
    def other_choice(self) -> int:
        return 1 - self.trait_choice

    @property
    def trait_text(self) -> str:
        return self.choices[self.trait_choice]

    @property
    def other_text(self) -> str:
        return self.choices[self.other_choice]


@dataclasses.dataclass(frozen=True)
class ItemValidity:
    """The two-choice items' validity check on one model: positive minus negative system-prompt effect (nats per
    token) with its 95% interval over n items; valid when the interval lies above 0."""
    model: str
    effect: float
    low: float
    high: float
    n: int
    valid: bool


@dataclasses.dataclass(frozen=True)
class Trait:
    name: str
    description: str
    instruction_pairs: tuple[InstructionPair, ...]
    extraction_questions: tuple[str, ...]
    evaluation_questions: tuple[str, ...]
    judge_rubric: str
    behavioural_items: tuple[BehaviouralItem, ...]
    schema_version: int
    source: str
    behavioural_validity: tuple[ItemValidity, ...] = ()
    # graded system prompts kept apart from the instruction pairs, for a monitoring test on prompts no layer or
    # analysis choice has seen
    monitor_holdout: tuple[GradedPrompt, ...] = ()

    def items_validity(self, model: str) -> ItemValidity | None:
        """The stored validity check of the two-choice items on `model` (None: never checked there)."""
        return next((v for v in self.behavioural_validity if v.model == model), None)

    def items_are_evidence(self, model: str) -> bool:
        """True only when the items' validity check passed on `model`; otherwise (failed, or never run there) the
        two-choice measure is retired for this trait on that model and results from it are not evidence."""
        check = self.items_validity(model)
        return check is not None and check.valid

    def judge_prompt(self, question: str, answer: str) -> str:
        """The rubric with the question and answer filled in."""
        return self.judge_rubric.format(question=question, answer=answer)

    def instructions(self, polarity: str) -> list[str]:
        """The ``"pos"`` or ``"neg"`` instruction of every pair."""
        if polarity not in ("pos", "neg"):
            raise ValueError(f"polarity must be 'pos' or 'neg', got {polarity!r}")
        return [getattr(p, polarity) for p in self.instruction_pairs]



def list_traits() -> list[str]:
    """Names of the shipped traits (files in data/traits)."""
    folder = _packaged("traits")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_trait(name_or_path: PathLike, *, strict: bool = True) -> Trait:
    """A shipped trait by name (see :func:`list_traits`) or a trait file by path."""
    if _is_path(name_or_path):
        src = Path(name_or_path)
        expect_name = None
    else:
        name = str(name_or_path)
        src = _packaged("traits", f"{name}.json")
        if not src.is_file():
            raise DatasetError(f"unknown trait {name!r}: shipped traits are {list_traits()}; "
                               "pass a path to a .json file to load your own")
        expect_name = name
    return _parse_trait(_read_json(src), str(src), strict=strict, expect_name=expect_name)


def _parse_trait(data: Any, source: str, *, strict: bool, expect_name: str | None = None) -> Trait:
    c = _Checker(source)
    d = c.top(data)
    version = c.version(d)
    name = c.string(d, "trait")
    if expect_name is not None and name != expect_name:
        c.fail("trait", f"{expect_name!r} (the file name)", repr(name))
    description = c.string(d, "description")
    pairs = _parse_instruction_pairs(c, d, strict)
    extraction, evaluation = _parse_questions(c, d, strict)
    rubric = c.string(d, "judge_rubric")
    c.template(rubric, "judge_rubric", ("question", "answer"))
    items = _parse_behavioural_items(c, d, strict)
    return Trait(name=name, description=description, instruction_pairs=pairs,
                 extraction_questions=extraction, evaluation_questions=evaluation, judge_rubric=rubric,
                 behavioural_items=items, schema_version=version, source=source,
                 behavioural_validity=_parse_item_validity(c, d), monitor_holdout=_parse_graded_prompts(c, d))


def _parse_instruction_pairs(c: "_Checker", d: dict, strict: bool) -> tuple[InstructionPair, ...]:
    raw_pairs = c.array(d, "instruction_pairs", min_len=TRAIT_PAIRS if strict else 1, what="{pos, neg} pairs")
    pairs = []
    for i, p in enumerate(raw_pairs):
        ctx = f"instruction_pairs[{i}]"
        c.obj(p, ctx, "'pos' and 'neg'")
        pairs.append(InstructionPair(pos=c.string(p, "pos", ctx), neg=c.string(p, "neg", ctx)))
    return tuple(pairs)


def _parse_questions(c: "_Checker", d: dict, strict: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(extraction, evaluation) questions; an evaluation question that repeats an extraction one (up to case and
    spacing) would score the vector on its own training data, so it is refused."""
    n_q = TRAIT_QUESTIONS if strict else 1
    extraction = c.strings(d, "extraction_questions", min_len=n_q)
    evaluation = c.strings(d, "evaluation_questions", min_len=n_q)
    ext_norm = {_norm_text(q) for q in extraction}
    overlap = [q for q in evaluation if _norm_text(q) in ext_norm]
    if overlap:
        c.fail("evaluation_questions", "questions disjoint from extraction_questions",
               f"{len(overlap)} overlapping: {overlap[:3]!r}")
    return extraction, evaluation


def _parse_behavioural_items(c: "_Checker", d: dict, strict: bool) -> tuple[BehaviouralItem, ...]:
    raw_items = c.array(d, "behavioural_items", min_len=TRAIT_BEHAVIOURAL_ITEMS if strict else 1,
                        what="behavioural items")
    items = tuple(_parse_behavioural_item(c, it, f"behavioural_items[{i}]") for i, it in enumerate(raw_items))
    if strict:
        _check_items_matched(c, items)
    return items


def _parse_behavioural_item(c: "_Checker", it: Any, ctx: str) -> BehaviouralItem:
    c.obj(it, ctx, "prompt, choices, trait_choice")
    prompt = c.string(it, "prompt", ctx)
    choices = c.strings(it, "choices", ctx)
    if len(choices) != 2:
        c.fail(f"{ctx}.choices", "exactly 2 choices", f"{len(choices)}")
    tc = c.field(it, "trait_choice", ctx)
    if not isinstance(tc, int) or isinstance(tc, bool):
        c.fail(f"{ctx}.trait_choice", "an integer index into choices (0 or 1)", _typename(tc))
    if not 0 <= tc < len(choices):
        c.fail(f"{ctx}.trait_choice", f"an index in range 0..{len(choices) - 1}", repr(tc))
    return BehaviouralItem(prompt=prompt, choices=(choices[0], choices[1]), trait_choice=tc)


def _check_items_matched(c: "_Checker", items: Sequence[BehaviouralItem]) -> None:
    """The shipped items' two answers have matched lengths and the trait answer's index is balanced, so that
    neither answer length nor answer position can stand in for the trait."""
    for i, it in enumerate(items):
        gap = abs(_words(it.choices[0]) - _words(it.choices[1]))
        if gap > MAX_WORD_GAP:
            c.fail(f"behavioural_items[{i}].choices", f"two answers of matched length (within {MAX_WORD_GAP} "
                   "words)", f"{_words(it.choices[0])} and {_words(it.choices[1])} words")
    n1 = sum(it.trait_choice for it in items)
    n0 = len(items) - n1
    if abs(n0 - n1) > 1:
        c.fail("behavioural_items", "trait_choice balanced between index 0 and 1 (counts differ by at most 1)",
               f"{n0} at index 0 and {n1} at index 1")


def _parse_graded_prompts(c: "_Checker", d: dict) -> tuple[GradedPrompt, ...]:
    if d.get("monitor_holdout") is None:
        return ()
    out = []
    for i, g in enumerate(c.array(d, "monitor_holdout", what="graded system prompts")):
        ctx = f"monitor_holdout[{i}]"
        c.obj(g, ctx, "prompt and level")
        level = c.field(g, "level", ctx)
        if not isinstance(level, int) or isinstance(level, bool) or level == 0 or abs(level) > 3:
            c.fail(f"{ctx}.level", "a non-zero integer from -3 to 3", repr(level))
        out.append(GradedPrompt(prompt=c.string(g, "prompt", ctx), level=level))
    if len({g.prompt for g in out}) < len(out):
        c.fail("monitor_holdout", "distinct prompts", "a repeated prompt")
    return tuple(out)


def _parse_item_validity(c: "_Checker", d: dict) -> tuple[ItemValidity, ...]:
    if d.get("behavioural_validity") is None:
        return ()
    out, seen = [], set()
    for i, v in enumerate(c.array(d, "behavioural_validity", what="validity checks (one per model)")):
        ctx = f"behavioural_validity[{i}]"
        c.obj(v, ctx, "model, effect, low, high, n, valid")
        model = c.string(v, "model", ctx)
        if model in seen:
            c.fail(f"{ctx}.model", "one check per model", f"a second check for {model!r}")
        seen.add(model)
        nums = {}
        for key in ("effect", "low", "high"):
            x = c.field(v, key, ctx)
            if not isinstance(x, (int, float)) or isinstance(x, bool) or x != x:
                c.fail(f"{ctx}.{key}", "a number", repr(x))
            nums[key] = float(x)
        if not nums["low"] <= nums["effect"] <= nums["high"]:
            c.fail(ctx, "low <= effect <= high", f"{nums['low']}, {nums['effect']}, {nums['high']}")
        n = c.field(v, "n", ctx)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            c.fail(f"{ctx}.n", "a positive integer (items)", repr(n))
        valid = c.field(v, "valid", ctx)
        if not isinstance(valid, bool):
            c.fail(f"{ctx}.valid", "true or false", repr(valid))
        if valid and not (n > 1 and nums["low"] > 0):
            c.fail(f"{ctx}.valid", "false when the interval does not lie above 0", "true")
        out.append(ItemValidity(model=model, n=n, valid=valid, **nums))
    return tuple(out)
