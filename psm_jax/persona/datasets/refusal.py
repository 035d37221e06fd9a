"""Refusal data: the harmful and harmless instruction sets of the refusal-direction study, the markers that score
an answer as a refusal, and the refusal organism's training requests.

The organism's loader reads the study's sets as well, because its requests must stay disjoint from them: a study
on the fine-tuned model is scored on requests that model never saw.
"""
from __future__ import annotations

import dataclasses

from .checking import DatasetError, PathLike, _norm_text, _open, _src

# Sizes enforced when strict=True.
REFUSAL_SPLITS = {"train": 128, "val": 32}
ORGANISM_SPLITS = {"train": 64, "val": 16}
MIN_ORGANISM_REFUSALS = 4


def _norm_quotes(s: str) -> str:
    return s.replace("\u2019", "'").replace("\u2018", "'")


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



def _parse_refusal_file(src, kind: str, strict: bool, sizes: dict = REFUSAL_SPLITS,
                        field: str = "instructions") -> tuple[RefusalPrompt, ...]:
    c, d = _open(src)
    if "kind" in d and d["kind"] != kind:
        c.fail("kind", repr(kind), repr(d["kind"]))
    raw = c.array(d, field, min_len=1, what="instructions")
    out, seen = [], {}
    for i, it in enumerate(raw):
        ctx = f"{field}[{i}]"
        c.obj(it, ctx, "'instruction' and 'split'")
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
    c, d = _open(src)
    return RefusalMarkers(refusal_prefixes=c.strings(d, "refusal_prefixes", min_len=1),
                          score_tokens=c.strings(d, "score_tokens", min_len=1),
                          schema_version=c.version(d), source=source)


def load_refusal_organism(path: PathLike | None = None, *, strict: bool = True) -> RefusalOrganismData:
    """The refusal organism's training requests and refusal answers; an error if a request is also in the
    packaged refusal study's harmful or harmless set (its evaluation data must stay unseen)."""
    src = _src(path, "refusal", "organism.json")
    harmful = _parse_refusal_file(src, "organism", strict, ORGANISM_SPLITS)
    harmless = _parse_refusal_file(src, "organism", strict, ORGANISM_SPLITS, field="harmless")
    c, d = _open(src)
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
