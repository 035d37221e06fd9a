"""Step 1: the persona vector every shift is measured along, from the model's greedy answers to the trait's
extraction questions under its positive minus its negative system prompts, with its split-half reliability over
those questions."""
from __future__ import annotations

import numpy as np

from experiments.finetune.config import Config
from experiments.finetune.data import generation_system, greedy_answers
from experiments.finetune.trait_result import VectorReliability
from psm_jax.persona import rollouts
from psm_jax.persona.directions import SITE, mean_difference, split_half_cosine
from psm_jax.persona.prompts import system_conv


def extraction_activations(model, trait, layer: int, cfg: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean response activation at `layer` of the greedy answers under each positive and each negative system
    prompt, over the first `n_extract_questions` extraction questions: (pos [N, D], neg [N, D], question index of
    each row [N]); row k of pos and of neg share instruction pair and question."""
    if cfg.n_extract_questions > len(trait.extraction_questions):
        raise ValueError(f"n_extract_questions={cfg.n_extract_questions}; trait {trait.name!r} has "
                         f"{len(trait.extraction_questions)} extraction questions")
    qs = list(trait.extraction_questions[:cfg.n_extract_questions])
    rows = [(i, q) for i in range(cfg.n_extract_pairs) for q in qs]
    convs = {pol: [system_conv(generation_system(trait, pol, i, cfg.n_extract_pairs), q) for i, q in rows]
             for pol in ("pos", "neg")}
    answers = greedy_answers(model, convs["pos"] + convs["neg"], cfg)
    full = [list(c) + [{"role": "assistant", "content": a}] for c, a in zip(convs["pos"] + convs["neg"], answers)]
    acts = rollouts.activation_means(model, full, layers=(layer,), site=SITE, batch_size=cfg.gen_batch_size)
    n = len(rows)
    question = np.tile(np.arange(len(qs)), cfg.n_extract_pairs)  # rows run over pairs, then questions
    return acts["response_mean"][:n, 0], acts["response_mean"][n:, 0], question


def persona_vector(model, trait, layer: int, cfg: Config) -> tuple[np.ndarray, VectorReliability | None]:
    """Mean response activation under the positive minus the negative system prompts over the extraction questions
    ([D]), and its split-half reliability over those questions (`directions.split_half_cosine`: the cosine a
    vector from other questions of the same number is expected to share with it; None with one question)."""
    pos, neg, question = extraction_activations(model, trait, layer, cfg)
    rel = split_half_cosine(pos, neg, question, question, seed=cfg.seed)
    if rel is not None:
        rel = {k: float(v) if isinstance(v, np.ndarray) else v for k, v in rel.items()}
    return mean_difference(pos, neg), rel
