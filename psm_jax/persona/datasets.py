"""Typed, schema-checked loaders for the experiment data in ``psm_jax/persona/data``.

Every shipped file is JSON with a ``schema_version`` field. Each loader returns frozen dataclasses
and raises :class:`DatasetError` (a ``ValueError``) naming the file, the field and what was
expected when a file does not fit its schema. Every loader also accepts the path of a file of
the user's own in the same schema.

``strict=True`` (the default) also enforces the sizes the experiments rely on (5 instruction
pairs, 20 + 20 questions and 24 balanced behavioural items per trait, 120 roles with 3
instructions each, 100 role questions, 128 + 32 refusal prompts per side). ``strict=False``
keeps the structural checks only (types, required fields, no role without instructions,
disjoint extraction/evaluation questions, ``trait_choice`` in range), for small custom files.

Loaders::

    list_traits() -> list[str]
    load_trait(name_or_path) -> Trait
    load_roles(path=None) -> RoleSet
    load_default_prompts(model_name, path=None) -> list[str]
    load_role_questions(path=None) -> list[str]
    load_identity_probes(path=None) -> IdentityProbes
    load_refusal(split=None, harmful_path=None, harmless_path=None) -> RefusalSet
    load_refusal_markers(path=None) -> RefusalMarkers
    load_refusal_organism(path=None) -> RefusalOrganismData
    load_conversations(kind_or_path) -> list[Conversation]
    load_persona_jailbreaks(path=None) -> tuple[JailbreakPrompt, ...]
    load_qa(path=None) -> tuple[QAItem, ...]

A trait file may carry ``behavioural_validity``: one entry per model on which the two-choice items' validity check
ran (``benchmarks/trait_items_validity.py`` writes it). ``Trait.items_are_evidence(model)`` is True only where that
check passed; a study must not use the items as evidence elsewhere.

``python -m psm_jax.persona.datasets`` loads every shipped file and prints its counts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import string
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

__all__ = [
    "SCHEMA_VERSION", "DatasetError", "data_root",
    "InstructionPair", "BehaviouralItem", "Trait", "Role", "RoleSet", "IdentityProbes",
    "RefusalPrompt", "RefusalSet", "RefusalMarkers", "RefusalOrganismData", "Message", "Conversation", "ItemValidity",
    "JailbreakPrompt", "QAItem",
    "list_traits", "load_trait", "load_roles", "load_default_prompts", "load_role_questions",
    "load_identity_probes", "load_refusal", "load_refusal_markers", "load_refusal_organism", "load_conversations",
    "load_persona_jailbreaks", "load_qa",
]

SCHEMA_VERSION = 1

# Sizes enforced when strict=True.
TRAIT_PAIRS = 5
TRAIT_QUESTIONS = 20
TRAIT_BEHAVIOURAL_ITEMS = 24
MIN_ROLES = 120
MIN_ROLE_INSTRUCTIONS = 3
MIN_ROLE_QUESTIONS = 100
MIN_DEFAULT_PROMPTS = 5
MIN_IDENTITY_PROBES = 10
REFUSAL_SPLITS = {"train": 128, "val": 32}
ORGANISM_SPLITS = {"train": 64, "val": 16}
MIN_ORGANISM_REFUSALS = 4
MIN_CONVERSATIONS = 6
MIN_EXCHANGES = 3
CONVERSATION_KINDS = ("roleplay", "neutral")
MIN_JAILBREAKS = 24
JAILBREAK_FRAMINGS = ("system", "user")
MAX_WORD_GAP = 3  # paired answers (two-choice items, jailbreak answers) differ by at most this many words
MIN_QA_ITEMS = 40
QA_OPTIONS = 4

PathLike = Union[str, "os.PathLike[str]"]


class DatasetError(ValueError):
    """A data file is missing, unreadable or does not match its schema."""


def data_root():
    """The packaged data folder (an importlib.resources Traversable; a Path for a normal install)."""
    return resources.files("psm_jax.persona").joinpath("data")


# --------------------------------------------------------------------------- dataclasses


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


@dataclasses.dataclass(frozen=True)
class Role:
    name: str
    category: str
    description: str
    instructions: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class RoleSet:
    """Roles in file order. Index by position or by name; ``in`` accepts names."""
    roles: tuple[Role, ...]
    adherence_rubric: str | None
    schema_version: int
    source: str

    def __len__(self) -> int:
        return len(self.roles)

    def __iter__(self) -> Iterator[Role]:
        return iter(self.roles)

    def __getitem__(self, key: int | str) -> Role:
        if isinstance(key, str):
            for r in self.roles:
                if r.name == key:
                    return r
            raise KeyError(f"no role named {key!r} in {self.source}")
        return self.roles[key]

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            return key in self.names
        return key in self.roles

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.roles]

    @property
    def categories(self) -> list[str]:
        """Distinct categories in order of first appearance."""
        return list(dict.fromkeys(r.category for r in self.roles))

    def by_category(self, category: str) -> list[Role]:
        return [r for r in self.roles if r.category == category]

    def adherence_prompt(self, role: str, question: str, answer: str) -> str:
        """The 0-3 role-adherence rubric filled in (``role`` is a name or a description)."""
        if self.adherence_rubric is None:
            raise ValueError(f"{self.source} has no adherence_rubric")
        if role in self:
            role = f"{role} ({self[role].description})"
        return self.adherence_rubric.format(role=role, question=question, answer=answer)


@dataclasses.dataclass(frozen=True)
class IdentityProbes:
    questions: tuple[str, ...]
    assistant_markers: tuple[str, ...]
    rubric: str
    schema_version: int
    source: str

    def marker_hits(self, text: str) -> list[str]:
        """The assistant markers found in ``text`` as whole words, case-insensitively."""
        return [m for m in self.assistant_markers if _word_regex(m).search(text)]

    def is_assistant_answer(self, text: str) -> bool:
        """Simple string scorer: True when any assistant marker occurs in the answer."""
        return bool(self.marker_hits(text))

    def rubric_prompt(self, question: str, answer: str) -> str:
        """The 0-9 rubric (0 = assistant, 9 = fully another persona) filled in."""
        return self.rubric.format(question=question, answer=answer)


@dataclasses.dataclass(frozen=True)
class RefusalPrompt:
    instruction: str
    split: str
    category: str | None


@dataclasses.dataclass(frozen=True)
class RefusalSet:
    """Harmful and harmless instructions, restricted to ``split`` (None = both splits)."""
    harmful: tuple[RefusalPrompt, ...]
    harmless: tuple[RefusalPrompt, ...]
    split: str | None

    @property
    def harmful_texts(self) -> list[str]:
        return [p.instruction for p in self.harmful]

    @property
    def harmless_texts(self) -> list[str]:
        return [p.instruction for p in self.harmless]


@dataclasses.dataclass(frozen=True)
class RefusalMarkers:
    refusal_prefixes: tuple[str, ...]
    score_tokens: tuple[str, ...]
    schema_version: int
    source: str

    def is_refusal(self, text: str, anywhere: bool = False) -> bool:
        """True when ``text`` starts with (or, with ``anywhere``, contains) a refusal phrase."""
        t = _norm_quotes(text).strip().casefold()
        prefixes = [_norm_quotes(p).casefold() for p in self.refusal_prefixes]
        if anywhere:
            return any(p in t for p in prefixes)
        return any(t.startswith(p) for p in prefixes)


@dataclasses.dataclass(frozen=True)
class RefusalOrganismData:
    """Harmful requests a fine-tune teaches a model to decline, the refusal answers it is taught to give, and
    harmless requests of the same form that it keeps answering (so it learns what to refuse, not how requests look).
    Disjoint from the refusal study's sets, so a study on the fine-tuned model is scored on requests it never saw."""
    harmful: tuple[RefusalPrompt, ...]
    harmless: tuple[RefusalPrompt, ...]
    refusals: tuple[str, ...]
    schema_version: int
    source: str

    def texts(self, split: str, side: str = "harmful") -> list[str]:
        if split not in ORGANISM_SPLITS or side not in ("harmful", "harmless"):
            raise ValueError(f"split={split!r}, side={side!r}; expected a split in {sorted(ORGANISM_SPLITS)} and "
                             "side 'harmful' or 'harmless'")
        return [p.instruction for p in getattr(self, side) if p.split == split]


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


# --------------------------------------------------------------------------- helpers


def _norm_quotes(s: str) -> str:
    return s.replace("\u2019", "'").replace("\u2018", "'")


def _word_regex(word: str) -> re.Pattern[str]:
    return re.compile(r"(?<![A-Za-z0-9])" + re.escape(word) + r"(?![A-Za-z0-9])", re.IGNORECASE)


def _norm_text(s: str) -> str:
    return " ".join(s.split()).casefold()


def _is_path(x: Any) -> bool:
    if isinstance(x, os.PathLike):
        return True
    return isinstance(x, str) and (x.endswith(".json") or "/" in x or os.sep in x)


def _packaged(*parts: str):
    node = data_root()
    for p in parts:
        node = node.joinpath(p)
    return node


def _read_json(src) -> Any:
    name = str(src)
    try:
        if not src.is_file():
            raise DatasetError(f"{name}: file not found")
        text = src.read_text(encoding="utf-8")
    except OSError as e:
        raise DatasetError(f"{name}: cannot read file: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{name}: invalid JSON: {e}") from e


def _typename(x: Any) -> str:
    return type(x).__name__


class _Checker:
    """Schema checks that raise DatasetError('<file>: field '<path>': expected ..., got ...')."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, field: str, expected: str, got: Any = dataclasses.MISSING) -> None:
        msg = f"{self.source}: field '{field}': expected {expected}"
        if got is not dataclasses.MISSING:
            msg += f", got {got}"
        raise DatasetError(msg)

    def top(self, data: Any) -> dict:
        if not isinstance(data, dict):
            raise DatasetError(f"{self.source}: expected a JSON object at top level, got {_typename(data)}")
        self.version(data)
        return data

    def version(self, d: dict) -> int:
        if "schema_version" not in d:
            raise DatasetError(f"{self.source}: field 'schema_version' is missing (required: an integer "
                               f"from 1 to {SCHEMA_VERSION})")
        v = d["schema_version"]
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= SCHEMA_VERSION:
            self.fail("schema_version", f"an integer from 1 to {SCHEMA_VERSION}", repr(v))
        return v

    def field(self, d: dict, key: str, ctx: str = "") -> Any:
        path = f"{ctx}.{key}" if ctx else key
        if not isinstance(d, dict):
            self.fail(ctx or key, "an object", _typename(d))
        if key not in d:
            raise DatasetError(f"{self.source}: field '{path}' is missing (required)")
        return d[key]

    def string(self, d: dict, key: str, ctx: str = "", allow_empty: bool = False) -> str:
        path = f"{ctx}.{key}" if ctx else key
        v = self.field(d, key, ctx)
        if not isinstance(v, str):
            self.fail(path, "a string", _typename(v))
        if not allow_empty and not v.strip():
            self.fail(path, "a non-empty string", "an empty string")
        return v

    def opt_string(self, d: dict, key: str, ctx: str = "") -> str | None:
        if key not in d or d[key] is None:
            return None
        return self.string(d, key, ctx)

    def array(self, d: dict, key: str, ctx: str = "", min_len: int = 0, what: str = "items") -> list:
        path = f"{ctx}.{key}" if ctx else key
        v = self.field(d, key, ctx)
        if not isinstance(v, list):
            self.fail(path, f"a list of {what}", _typename(v))
        if len(v) < min_len:
            self.fail(path, f"at least {min_len} {what}", f"{len(v)}")
        return v

    def strings(self, d: dict, key: str, ctx: str = "", min_len: int = 0, unique: bool = True,
                allow_empty: bool = False) -> tuple[str, ...]:
        path = f"{ctx}.{key}" if ctx else key
        v = self.array(d, key, ctx, min_len, "strings")
        seen: dict[str, int] = {}
        for i, s in enumerate(v):
            if not isinstance(s, str):
                self.fail(f"{path}[{i}]", "a string", _typename(s))
            if not allow_empty and not s.strip():
                self.fail(f"{path}[{i}]", "a non-empty string", "an empty string")
            k = _norm_text(s)
            if unique and k in seen:
                self.fail(f"{path}[{i}]", f"no duplicates, but it repeats item {seen[k]}", repr(s))
            seen[k] = i
        return tuple(v)

    def template(self, text: str, field: str, required: Sequence[str], allowed: Sequence[str] | None = None) -> None:
        """``text`` must format with str.format using exactly the named placeholders."""
        allowed = set(required if allowed is None else allowed)
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
        except ValueError as e:
            self.fail(field, f"a str.format template with placeholders {sorted(required)}", f"a malformed template ({e})")
        missing = [r for r in required if r not in names]
        if missing:
            self.fail(field, "a template containing " + ", ".join("{" + r + "}" for r in required),
                      "no " + ", ".join("{" + m + "}" for m in missing))
        extra = sorted(n for n in names if n not in allowed)
        if extra:
            self.fail(field, "only the placeholders " + ", ".join("{" + a + "}" for a in sorted(allowed))
                      + " (write literal braces as {{ and }})",
                      ", ".join("{" + e + "}" for e in extra))


# --------------------------------------------------------------------------- traits


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
        if not isinstance(p, dict):
            c.fail(ctx, "an object with 'pos' and 'neg'", _typename(p))
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
    if not isinstance(it, dict):
        c.fail(ctx, "an object with prompt, choices, trait_choice", _typename(it))
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
        if not isinstance(g, dict):
            c.fail(ctx, "an object with prompt and level", _typename(g))
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
        if not isinstance(v, dict):
            c.fail(ctx, "an object with model, effect, low, high, n, valid", _typename(v))
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


# --------------------------------------------------------------------------- roles


def _src(path: PathLike | None, *default: str):
    return Path(path) if path is not None else _packaged(*default)


def load_roles(path: PathLike | None = None, *, strict: bool = True) -> RoleSet:
    """Role archetypes (roles/roles.json, or ``path``)."""
    src = _src(path, "roles", "roles.json")
    source = str(src)
    c = _Checker(source)
    d = c.top(_read_json(src))
    version = c.version(d)
    raw = c.array(d, "roles", min_len=MIN_ROLES if strict else 1, what="roles")
    roles, seen = [], set()
    for i, r in enumerate(raw):
        ctx = f"roles[{i}]"
        if not isinstance(r, dict):
            c.fail(ctx, "an object with name, category, description, instructions", _typename(r))
        name = c.string(r, "name", ctx)
        ctx = f"roles[{i}] ({name!r})"
        if name in seen:
            c.fail(f"{ctx}.name", "a unique role name", "a duplicate")
        seen.add(name)
        category = c.string(r, "category", ctx)
        description = c.string(r, "description", ctx)
        n_min = MIN_ROLE_INSTRUCTIONS if strict else 1
        instr = c.strings(r, "instructions", ctx, min_len=n_min)
        roles.append(Role(name=name, category=category, description=description, instructions=instr))
    if strict and "assistant" not in seen:
        c.fail("roles", "a role named 'assistant'", "none")
    rubric = c.opt_string(d, "adherence_rubric")
    if rubric is not None:
        c.template(rubric, "adherence_rubric", ("role", "question", "answer"))
    return RoleSet(roles=tuple(roles), adherence_rubric=rubric, schema_version=version, source=source)


def load_default_prompts(model_name: str, path: PathLike | None = None, *, strict: bool = True) -> list[str]:
    """The neutral "default" system prompts with ``{model_name}`` filled in ("" means no system prompt)."""
    if not isinstance(model_name, str) or not model_name.strip():
        raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
    src = _src(path, "roles", "default_prompts.json")
    c = _Checker(str(src))
    d = c.top(_read_json(src))
    prompts = c.strings(d, "prompts", min_len=MIN_DEFAULT_PROMPTS if strict else 1, allow_empty=True)
    for i, p in enumerate(prompts):
        c.template(p, f"prompts[{i}]", (), allowed=("model_name",))
    if strict and "" not in prompts:
        c.fail("prompts", 'the empty prompt "" among the defaults', "none")
    return [p.format(model_name=model_name) for p in prompts]


def load_role_questions(path: PathLike | None = None, *, strict: bool = True) -> list[str]:
    """The shared extraction questions asked to every role."""
    src = _src(path, "roles", "questions.json")
    c = _Checker(str(src))
    d = c.top(_read_json(src))
    return list(c.strings(d, "questions", min_len=MIN_ROLE_QUESTIONS if strict else 1))


def load_identity_probes(path: PathLike | None = None, *, strict: bool = True) -> IdentityProbes:
    """Identity questions, assistant-identity keyword markers and the 0-9 persona rubric."""
    src = _src(path, "roles", "identity_probes.json")
    source = str(src)
    c = _Checker(source)
    d = c.top(_read_json(src))
    version = c.version(d)
    questions = c.strings(d, "questions", min_len=MIN_IDENTITY_PROBES if strict else 1)
    markers = c.strings(d, "assistant_markers", min_len=1)
    rubric = c.string(d, "rubric")
    c.template(rubric, "rubric", ("question", "answer"))
    return IdentityProbes(questions=questions, assistant_markers=markers, rubric=rubric,
                          schema_version=version, source=source)


# --------------------------------------------------------------------------- refusal


def _parse_refusal_file(src, kind: str, strict: bool, sizes: dict = REFUSAL_SPLITS,
                        field: str = "instructions") -> tuple[RefusalPrompt, ...]:
    c = _Checker(str(src))
    d = c.top(_read_json(src))
    if "kind" in d and d["kind"] != kind:
        c.fail("kind", repr(kind), repr(d["kind"]))
    raw = c.array(d, field, min_len=1, what="instructions")
    out, seen = [], {}
    for i, it in enumerate(raw):
        ctx = f"{field}[{i}]"
        if not isinstance(it, dict):
            c.fail(ctx, "an object with 'instruction' and 'split'", _typename(it))
        text = c.string(it, "instruction", ctx)
        split = c.string(it, "split", ctx)
        if split not in sizes:
            c.fail(f"{ctx}.split", f"one of {sorted(sizes)}", repr(split))
        key = _norm_text(text)
        if key in seen:
            c.fail(f"{ctx}.instruction", f"no duplicates, but it repeats instructions[{seen[key]}]", repr(text))
        seen[key] = i
        out.append(RefusalPrompt(instruction=text, split=split, category=c.opt_string(it, "category", ctx)))
    if strict:
        for split, n in sizes.items():
            k = sum(p.split == split for p in out)
            if k < n:
                c.fail(field, f"at least {n} with split '{split}'", f"{k}")
    return tuple(out)


def load_refusal(split: str | None = None, *, harmful_path: PathLike | None = None,
                 harmless_path: PathLike | None = None, strict: bool = True) -> RefusalSet:
    """Harmful/harmless instruction sets; ``split`` is "train", "val" or None (both)."""
    if split is not None and split not in REFUSAL_SPLITS:
        raise ValueError(f"split must be None or one of {sorted(REFUSAL_SPLITS)}, got {split!r}")
    hsrc = _src(harmful_path, "refusal", "harmful.json")
    ssrc = _src(harmless_path, "refusal", "harmless.json")
    harmful = _parse_refusal_file(hsrc, "harmful", strict)
    harmless = _parse_refusal_file(ssrc, "harmless", strict)
    both = {_norm_text(p.instruction) for p in harmful} & {_norm_text(p.instruction) for p in harmless}
    if both:
        raise DatasetError(f"{hsrc} and {ssrc}: field 'instructions': expected disjoint harmful and harmless sets, "
                           f"got {len(both)} shared: {sorted(both)[:3]!r}")
    if split is not None:
        harmful = tuple(p for p in harmful if p.split == split)
        harmless = tuple(p for p in harmless if p.split == split)
    return RefusalSet(harmful=harmful, harmless=harmless, split=split)


def load_refusal_markers(path: PathLike | None = None) -> RefusalMarkers:
    """Refusal-answer prefixes (refusal rate) and the token strings of the refusal score."""
    src = _src(path, "refusal", "refusal_markers.json")
    source = str(src)
    c = _Checker(source)
    d = c.top(_read_json(src))
    return RefusalMarkers(refusal_prefixes=c.strings(d, "refusal_prefixes", min_len=1),
                          score_tokens=c.strings(d, "score_tokens", min_len=1),
                          schema_version=c.version(d), source=source)


def load_refusal_organism(path: PathLike | None = None, *, strict: bool = True) -> RefusalOrganismData:
    """The refusal organism's training requests and refusal answers; an error if a request is also in the
    packaged refusal study's harmful or harmless set (its evaluation data must stay unseen)."""
    src = _src(path, "refusal", "organism.json")
    harmful = _parse_refusal_file(src, "organism", strict, ORGANISM_SPLITS)
    harmless = _parse_refusal_file(src, "organism", strict, ORGANISM_SPLITS, field="harmless")
    c = _Checker(str(src))
    d = c.top(_read_json(src))
    refusals = c.strings(d, "refusals", min_len=MIN_ORGANISM_REFUSALS if strict else 1)
    study = load_refusal()
    seen = {_norm_text(t) for t in study.harmful_texts + study.harmless_texts}
    for field, prompts in (("instructions", harmful), ("harmless", harmless)):
        shared = sorted(p.instruction for p in prompts if _norm_text(p.instruction) in seen)
        if shared:
            raise DatasetError(f"{src}: field '{field}': expected requests outside the refusal study's sets, got "
                               f"{len(shared)} shared: {shared[:3]!r}")
    both = {_norm_text(p.instruction) for p in harmful} & {_norm_text(p.instruction) for p in harmless}
    if both:
        raise DatasetError(f"{src}: fields 'instructions' and 'harmless': expected disjoint sets, got {len(both)} "
                           f"shared: {sorted(both)[:3]!r}")
    return RefusalOrganismData(harmful=harmful, harmless=harmless, refusals=refusals, schema_version=c.version(d),
                               source=str(src))


# --------------------------------------------------------------------------- conversations


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
    c = _Checker(str(src))
    d = c.top(_read_json(src))
    file_kind = c.string(d, "kind")
    if file_kind not in CONVERSATION_KINDS:
        c.fail("kind", f"one of {list(CONVERSATION_KINDS)}", repr(file_kind))
    if kind is not None and file_kind != kind:
        c.fail("kind", repr(kind), repr(file_kind))
    raw = c.array(d, "conversations", min_len=MIN_CONVERSATIONS if strict else 1, what="conversations")
    out, seen = [], set()
    for i, conv in enumerate(raw):
        ctx = f"conversations[{i}]"
        if not isinstance(conv, dict):
            c.fail(ctx, "an object with id and messages", _typename(conv))
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
        if not isinstance(m, dict):
            c.fail(mctx, "an object with role and content", _typename(m))
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


# --------------------------------------------------------------------------- persona jailbreaks


def _words(text: str) -> int:
    return len(text.split())


def load_persona_jailbreaks(path: PathLike | None = None, *, strict: bool = True) -> tuple[JailbreakPrompt, ...]:
    """Persona-jailbreak prompts (jailbreak/persona_jailbreaks.json, or ``path``). Each names its persona in its
    set-up and in-role identity answer; paired answers differ by at most MAX_WORD_GAP words."""
    src = _src(path, "jailbreak", "persona_jailbreaks.json")
    c = _Checker(str(src))
    d = c.top(_read_json(src))
    c.version(d)
    raw = c.array(d, "items", min_len=MIN_JAILBREAKS if strict else 1, what="jailbreak prompts")
    out, seen = [], set()
    fields = ("id", "persona", "framing", "setup", "request", "assistant_identity", "persona_identity", "comply",
              "decline")
    for i, it in enumerate(raw):
        ctx = f"items[{i}]"
        if not isinstance(it, dict):
            c.fail(ctx, "an object with " + ", ".join(fields), _typename(it))
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


# --------------------------------------------------------------------------- capability QA


def load_qa(path: PathLike | None = None, *, strict: bool = True) -> tuple[QAItem, ...]:
    """Held-out multiple-choice questions (capability/qa.json, or ``path``): QA_OPTIONS distinct options each,
    `answer` in range, no repeated question; strict also needs MIN_QA_ITEMS items with every answer position
    used."""
    src = _src(path, "capability", "qa.json")
    c = _Checker(str(src))
    d = c.top(_read_json(src))
    c.version(d)
    raw = c.array(d, "items", min_len=MIN_QA_ITEMS if strict else 1, what="questions")
    out, seen = [], {}
    for i, it in enumerate(raw):
        ctx = f"items[{i}]"
        if not isinstance(it, dict):
            c.fail(ctx, "an object with question, options, answer", _typename(it))
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


# --------------------------------------------------------------------------- summary


def _summary() -> str:
    lines = []
    for t in list_traits():
        tr = load_trait(t)
        n1 = sum(i.trait_choice for i in tr.behavioural_items)
        lines.append(f"trait {t}: {len(tr.instruction_pairs)} pairs, {len(tr.extraction_questions)}+"
                     f"{len(tr.evaluation_questions)} questions, {len(tr.behavioural_items)} items "
                     f"({len(tr.behavioural_items) - n1} at 0 / {n1} at 1)")
    roles = load_roles()
    lines.append(f"roles: {len(roles)} in {len(roles.categories)} categories {roles.categories}")
    lines.append(f"default prompts: {load_default_prompts('MODEL')}")
    lines.append(f"role questions: {len(load_role_questions())}")
    lines.append(f"identity probes: {len(load_identity_probes().questions)}")
    for s in ("train", "val"):
        rs = load_refusal(s)
        lines.append(f"refusal {s}: {len(rs.harmful)} harmful, {len(rs.harmless)} harmless")
    lines.append(f"refusal markers: {len(load_refusal_markers().refusal_prefixes)} prefixes")
    for k in CONVERSATION_KINDS:
        lines.append(f"conversations {k}: {len(load_conversations(k))}")
    lines.append(f"persona jailbreaks: {len(load_persona_jailbreaks())}")
    lines.append(f"capability QA: {len(load_qa())}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(_summary())
