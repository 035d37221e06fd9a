"""Prompt construction for persona studies: trait system prompts, graded prompts for monitoring, role prompts.

The shipped data (traits, roles, questions, conversations, refusal sets) and their schema-checked loaders are in
`psm_jax.persona.datasets`; this module turns them into message lists. Conversations are lists of
{"role", "content"} dicts; an empty or None system prompt means no system message (the template's default).
"""
from __future__ import annotations

from typing import Collection, Sequence

import numpy as np

POLARITIES = ("pos", "neg")


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def trait_system_prompt(trait_name: str, polarity: str, instruction: str) -> str:
    """The persona-vectors recipe: "You are a/an {trait} assistant. {pos}" or "You are a helpful assistant. {neg}"."""
    if polarity == "pos":
        return f"You are {article(trait_name)} {trait_name} assistant. {instruction}"
    if polarity == "neg":
        return f"You are a helpful assistant. {instruction}"
    raise ValueError(f"polarity {polarity!r}; expected 'pos' or 'neg'")


def system_conv(system: str | None, question: str) -> list[dict]:
    """[system?, user]."""
    msgs = [] if not system else [{"role": "system", "content": system}]
    return msgs + [{"role": "user", "content": question}]


def with_answer(messages: Sequence[dict], answer: str) -> list[dict]:
    """`messages` followed by the assistant's `answer`: a prompt made into a scored or training conversation."""
    return list(messages) + [{"role": "assistant", "content": answer}]


def answered_conv(question: str, answer: str, system: str | None = None) -> list[dict]:
    """[system?, user, assistant]: one answered exchange, e.g. a fine-tuning example."""
    return with_answer(system_conv(system, question), answer)


def role_phrase(name: str) -> str:
    """'pirate_captain' -> 'a pirate captain'."""
    words = name.replace("_", " ")
    return f"{article(words)} {words}"


def load_traits(names: Sequence[str]):
    """Trait objects for shipped names (strict schema) or paths to user files (structural checks only)."""
    from psm_jax.persona.datasets import load_trait

    out = []
    for name in names:
        strict = not (str(name).endswith(".json") or "/" in str(name))
        out.append(load_trait(name, strict=strict))
    return out


def extraction_rows(trait, n_pairs: int, n_questions: int, n_samples: int) -> list[dict]:
    """One row per response to generate: polarity, pair, question index, sample, messages."""
    if n_questions > len(trait.extraction_questions):
        raise ValueError(f"n_questions={n_questions}; trait {trait.name!r} has {len(trait.extraction_questions)}")
    if n_pairs > len(trait.instruction_pairs):
        raise ValueError(f"n_pairs={n_pairs}; trait {trait.name!r} has {len(trait.instruction_pairs)}")
    rows = []
    for polarity in POLARITIES:
        for p, pair in enumerate(trait.instruction_pairs[:n_pairs]):
            sys_prompt = trait_system_prompt(trait.name, polarity, getattr(pair, polarity))
            for q, question in enumerate(trait.extraction_questions[:n_questions]):
                for s in range(n_samples):
                    rows.append(dict(polarity=polarity, pair=p, question=q, sample=s, question_text=question,
                                     messages=system_conv(sys_prompt, question)))
    return rows


def response_slots(trait, n_questions: int, n_pairs: int) -> list[dict]:
    """Reference-answer slots: for each of the first `n_questions` evaluation questions q, instruction pairs
    (q + k) % n_instruction_pairs for k < n_pairs. Each slot gets a pos and a neg answer."""
    n_total = len(trait.instruction_pairs)
    if n_questions > len(trait.evaluation_questions):
        raise ValueError(f"n_response_questions={n_questions}; trait {trait.name!r} has "
                         f"{len(trait.evaluation_questions)} evaluation questions")
    if n_pairs > n_total:
        raise ValueError(f"n_response_pairs={n_pairs}; trait {trait.name!r} has {n_total} instruction pairs")
    return [{"question_index": q, "question": trait.evaluation_questions[q], "pair": (q + k) % n_total}
            for q in range(n_questions) for k in range(n_pairs)]


def split_items(items):
    """Balanced halves (selection, held-out) of two-choice items: alternate within each trait_choice group."""
    sel, held = [], []
    for choice in (0, 1):
        group = [it for it in items if it.trait_choice == choice]
        sel += group[0::2]
        held += group[1::2]
    if not sel or not held:
        raise ValueError(f"need at least 2 behavioural items per trait to split; got {len(items)}")
    return sel, held


def graded_system_prompts(trait) -> list[dict]:
    """System prompts of graded trait strength for monitoring: {prompt, level, polarity}.

    level +2: the five positive instructions; +1: a mild positive ("somewhat {trait}"); 0: no system prompt
    (the model's default); -1: a mild negative; -2: the five negative instructions; plus a few-shot variant of
    the first positive and negative prompt (the instruction repeated as an example exchange). At least 14
    prompts for a trait with five pairs; `polarity` ("pos", "neg", "default") is the cluster that a
    within-polarity correlation conditions on; `pair` is the index of the instruction pair whose wording the
    prompt uses (None for the mild and default prompts), so that a prompt can be kept from scoring answers
    generated under its own instruction."""
    name = trait.name
    out = [dict(prompt=trait_system_prompt(name, "pos", p.pos), level=2, polarity="pos", pair=i)
           for i, p in enumerate(trait.instruction_pairs)]
    out.append(dict(prompt=f"You are a somewhat {name} assistant.", level=1, polarity="pos", pair=None))
    out.append(dict(prompt=None, level=0, polarity="default", pair=None))
    out.append(dict(prompt=f"You are an assistant who is rarely {name}.", level=-1, polarity="neg", pair=None))
    out += [dict(prompt=trait_system_prompt(name, "neg", p.neg), level=-2, polarity="neg", pair=i)
            for i, p in enumerate(trait.instruction_pairs)]
    first = trait.instruction_pairs[0]
    for pol, level in (("pos", 3), ("neg", -3)):
        base = trait_system_prompt(name, pol, getattr(first, pol))
        shot = trait.extraction_questions[0]
        out.append(dict(prompt=f"{base}\n\nExample. User: {shot}\nAssistant: (answers exactly as instructed above)",
                        level=level, polarity=pol, pair=0))
    return out


def holdout_system_prompts(trait) -> list[dict]:
    """The trait's `monitor_holdout` prompts in the form of `graded_system_prompts` (polarity from the level's sign;
    no instruction pair, so every reference answer is scored under them); empty when the trait has none."""
    return [dict(prompt=g.prompt, level=g.level, polarity="pos" if g.level > 0 else "neg", pair=None)
            for g in trait.monitor_holdout]


def role_play_prompts(roles, exclude: Collection[str] = ()) -> list[str]:
    """Every instruction of every role but the default assistant's and those named in `exclude`, in file order:
    role-play system prompts (e.g. to put an SAE's training conversations in persona contexts)."""
    skip = {"assistant", *exclude}
    return [instr for r in roles if r.name not in skip for instr in r.instructions]


def open_role_conversations(roles, questions: Sequence[str], n: int | None, turns: int, seed: int,
                            names: Sequence[str] = ()) -> list:
    """Role-play conversations with no assistant turns yet, for a study to fill with the model's own in-character
    replies: per role, its first instruction as the system prompt and `turns` user questions drawn without
    replacement (seeded per role) from `questions`. The roles are those named in `names` (in that order), else `n`
    of them by `select_roles`. Each is a `datasets.Conversation` whose `role` is the role's name."""
    from psm_jax.persona.datasets import Conversation, Message

    if turns < 1 or turns > len(questions):
        raise ValueError(f"turns={turns}; expected 1..{len(questions)} (the number of questions)")
    if names:
        by_name = {r.name: r for r in roles if r.name != "assistant"}
        missing = [x for x in names if x not in by_name]
        if missing:
            raise ValueError(f"unknown role names {missing}; expected packaged roles other than 'assistant'")
        picked = [by_name[x] for x in names]
    else:
        picked = select_roles(roles, n, seed)
    out = []
    for i, role in enumerate(picked):
        drawn = np.random.default_rng((seed, i)).choice(len(questions), size=turns, replace=False)
        msgs = (Message("system", role.instructions[0]),) + tuple(Message("user", questions[int(q)]) for q in drawn)
        out.append(Conversation(id=role.name, role=role.name, messages=msgs))
    return out


def select_roles(roles, n: int | None, seed: int) -> list:
    """`n` roles (all if None), never "assistant", stratified over categories (seeded round-robin), file order."""
    pool = [r for r in roles if r.name != "assistant"]
    if n is None or n >= len(pool):
        return pool
    rng = np.random.default_rng(seed)
    cats: dict[str, list] = {}
    for r in pool:
        cats.setdefault(r.category, []).append(r)
    queues = {c: [rs[i] for i in rng.permutation(len(rs))] for c, rs in cats.items()}
    picked = []
    while len(picked) < n:
        for c in cats:
            if queues[c] and len(picked) < n:
                picked.append(queues[c].pop(0))
    names = {r.name for r in picked}
    return [r for r in pool if r.name in names]


def sample_questions(questions: Sequence[str], n: int, seed: int) -> list[str]:
    """`n` of `questions`, seeded, in their original order."""
    if n > len(questions):
        raise ValueError(f"asked for {n} questions but only {len(questions)} exist")
    idx = np.random.default_rng(seed + 1).permutation(len(questions))[:n]
    return [questions[i] for i in sorted(idx)]
