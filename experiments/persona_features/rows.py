"""The conversations the contrasts compare, as rows (group, question, split, messages): a trait's positive and
negative system prompts, role-play prompts against the default Assistant's. Every row is labelled with its half
(discovery or validation) by question, so that no question both ranks latents and checks them."""
from __future__ import annotations

from typing import Sequence

from experiments.persona_features.config import Config
from sae.features.discovery import DISCOVERY, VALIDATION


def trait_rows(trait, n_pairs: int, n_questions: int, n_samples: int = 1) -> list[dict]:
    """Pos and neg conversations for pairs x questions x samples; split = discovery (first half of the
    questions) / validation (second half)."""
    from psm_jax.persona.prompts import trait_system_prompt

    if n_questions > len(trait.extraction_questions):
        raise ValueError(f"n_questions={n_questions}; trait {trait.name!r} has {len(trait.extraction_questions)}")
    if n_pairs > len(trait.instruction_pairs):
        raise ValueError(f"n_pairs={n_pairs}; trait {trait.name!r} has {len(trait.instruction_pairs)}")
    half = n_questions // 2
    rows = []
    for pol in ("pos", "neg"):
        for p, pair in enumerate(trait.instruction_pairs[:n_pairs]):
            system = trait_system_prompt(trait.name, pol, getattr(pair, pol))
            for q, question in enumerate(trait.extraction_questions[:n_questions]):
                for s in range(n_samples):
                    rows.append({"group": pol, "pair": p, "question": q, "sample": s,
                                 "split": DISCOVERY if q < half else VALIDATION,
                                 "messages": [{"role": "system", "content": system},
                                              {"role": "user", "content": question}]})
    return rows


def role_rows(cfg: Config, model_display_name: str = "SmolLM") -> tuple[list[dict], list[str]]:
    """Role-played conversations (`role_instructions` instructions of each of `n_roles` sampled roles) and the
    default Assistant's (every default prompt), over the same `role_questions` sampled questions, split into halves
    like the trait rows; with the sampled role names."""
    from psm_jax.persona import datasets
    from psm_jax.persona.prompts import sample_questions, select_roles, system_conv

    roles = select_roles(datasets.load_roles().roles, cfg.n_roles, cfg.seed)
    questions = sample_questions(datasets.load_role_questions(), cfg.role_questions, cfg.seed)
    defaults = datasets.load_default_prompts(model_display_name)
    half = len(questions) // 2
    rows = []
    for r in roles:
        for instr in r.instructions[:cfg.role_instructions]:
            for q, question in enumerate(questions):
                rows.append({"group": "role", "role": r.name, "question": q,
                             "split": DISCOVERY if q < half else VALIDATION, "messages": system_conv(instr, question)})
    for p in defaults:
        for q, question in enumerate(questions):
            rows.append({"group": "default", "role": "default", "question": q,
                         "split": DISCOVERY if q < half else VALIDATION, "messages": system_conv(p, question)})
    return rows, [r.name for r in roles]


def labels(rows: Sequence[dict]) -> tuple[list, list, list]:
    """The rows' group, split and question labels (the parallel sequences sae.features.discovery reads)."""
    return [r["group"] for r in rows], [r["split"] for r in rows], [r["question"] for r in rows]
