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

Each data folder has one module holding its dataclasses, its strict sizes and its loaders; ``checking`` holds what
they share. This package re-exports every public name, so callers import from ``psm_jax.persona.datasets``::

    checking       DatasetError, data_root, JSON reading and the schema checker every loader uses
    traits         data/traits: instruction pairs, questions, two-choice items, item validity, held-out prompts
    roles          data/roles: roles, default system prompts, role questions, identity probes
    refusal        data/refusal: harmful/harmless sets, refusal markers, the refusal organism's requests
    conversations  data/conversations: roleplay and neutral multi-turn conversations
    jailbreak      data/jailbreak: persona-jailbreak prompts with paired answers
    capability     data/capability: multiple-choice capability questions
"""
from __future__ import annotations

from .capability import QAItem, load_qa
from .checking import SCHEMA_VERSION, DatasetError, data_root
from .conversations import Conversation, Message, load_conversations
from .jailbreak import JailbreakPrompt, load_persona_jailbreaks
from .refusal import (RefusalMarkers, RefusalOrganismData, RefusalPrompt, RefusalSet, load_refusal,
                      load_refusal_markers, load_refusal_organism)
from .roles import (IdentityProbes, Role, RoleSet, load_default_prompts, load_identity_probes, load_role_questions,
                    load_roles)
from .traits import BehaviouralItem, InstructionPair, ItemValidity, Trait, list_traits, load_trait

# Public beside __all__: the sizes strict=True enforces, the shared answer-length rule, the path type, GradedPrompt.
from .capability import MIN_QA_ITEMS, QA_OPTIONS  # noqa: F401
from .checking import MAX_WORD_GAP, PathLike  # noqa: F401
from .conversations import CONVERSATION_KINDS, MIN_CONVERSATIONS, MIN_EXCHANGES  # noqa: F401
from .jailbreak import JAILBREAK_FRAMINGS, MIN_JAILBREAKS  # noqa: F401
from .refusal import MIN_ORGANISM_REFUSALS, ORGANISM_SPLITS, REFUSAL_SPLITS  # noqa: F401
from .roles import MIN_DEFAULT_PROMPTS, MIN_IDENTITY_PROBES, MIN_ROLE_INSTRUCTIONS  # noqa: F401
from .roles import MIN_ROLE_QUESTIONS, MIN_ROLES  # noqa: F401
from .traits import TRAIT_BEHAVIOURAL_ITEMS, TRAIT_PAIRS, TRAIT_QUESTIONS, GradedPrompt  # noqa: F401

__all__ = [
    "SCHEMA_VERSION", "DatasetError", "data_root",
    "InstructionPair", "BehaviouralItem", "Trait", "Role", "RoleSet", "IdentityProbes",
    "RefusalPrompt", "RefusalSet", "RefusalMarkers", "RefusalOrganismData", "Message", "Conversation", "ItemValidity",
    "JailbreakPrompt", "QAItem",
    "list_traits", "load_trait", "load_roles", "load_default_prompts", "load_role_questions",
    "load_identity_probes", "load_refusal", "load_refusal_markers", "load_refusal_organism", "load_conversations",
    "load_persona_jailbreaks", "load_qa",
]
