"""Roles and the Assistant's identity: the role archetypes with their instructions and adherence rubric, the
neutral default system prompts, the questions asked of every role, and the identity probes with their markers.

These are the inputs of the Assistant Axis study (role vectors against the default Assistant); the strict sizes are
the ones that study relies on.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterator

from .checking import PathLike, _open, _src

# Sizes enforced when strict=True.
MIN_ROLES = 120
MIN_ROLE_INSTRUCTIONS = 3
MIN_ROLE_QUESTIONS = 100
MIN_DEFAULT_PROMPTS = 5
MIN_IDENTITY_PROBES = 10


def _word_regex(word: str) -> re.Pattern[str]:
    return re.compile(r"(?<![A-Za-z0-9])" + re.escape(word) + r"(?![A-Za-z0-9])", re.IGNORECASE)


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



def load_roles(path: PathLike | None = None, *, strict: bool = True) -> RoleSet:
    """Role archetypes (roles/roles.json, or ``path``)."""
    src = _src(path, "roles", "roles.json")
    source = str(src)
    c, d = _open(src)
    version = c.version(d)
    raw = c.array(d, "roles", min_len=MIN_ROLES if strict else 1, what="roles")
    roles, seen = [], set()
    for i, r in enumerate(raw):
        ctx = f"roles[{i}]"
        c.obj(r, ctx, "name, category, description, instructions")
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
    c, d = _open(src)
    prompts = c.strings(d, "prompts", min_len=MIN_DEFAULT_PROMPTS if strict else 1, allow_empty=True)
    for i, p in enumerate(prompts):
        c.template(p, f"prompts[{i}]", (), allowed=("model_name",))
    if strict and "" not in prompts:
        c.fail("prompts", 'the empty prompt "" among the defaults', "none")
    return [p.format(model_name=model_name) for p in prompts]


def load_role_questions(path: PathLike | None = None, *, strict: bool = True) -> list[str]:
    """The shared extraction questions asked to every role."""
    src = _src(path, "roles", "questions.json")
    c, d = _open(src)
    return list(c.strings(d, "questions", min_len=MIN_ROLE_QUESTIONS if strict else 1))


def load_identity_probes(path: PathLike | None = None, *, strict: bool = True) -> IdentityProbes:
    """Identity questions, assistant-identity keyword markers and the 0-9 persona rubric."""
    src = _src(path, "roles", "identity_probes.json")
    source = str(src)
    c, d = _open(src)
    version = c.version(d)
    questions = c.strings(d, "questions", min_len=MIN_IDENTITY_PROBES if strict else 1)
    markers = c.strings(d, "assistant_markers", min_len=1)
    rubric = c.string(d, "rubric")
    c.template(rubric, "rubric", ("question", "answer"))
    return IdentityProbes(questions=questions, assistant_markers=markers, rubric=rubric,
                          schema_version=version, source=source)
