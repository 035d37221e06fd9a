"""The prompts: harmful and harmless instructions split into train, val and held-out sets by seeded shuffles, each
encoded as one user turn with the generation prompt, and the token ids the refusal score reads."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from experiments.refusal.config import Config
from psm_jax.persona.datasets import RefusalMarkers, RefusalSet, load_refusal
from psm_jax.persona.refusal import Prompts, encode_prompts, refusal_token_ids


@dataclasses.dataclass(frozen=True)
class PromptSets:
    """The six encoded sets of a run, padded to one length, and the post-instruction template positions they share."""

    train_harmful: Prompts  # the difference in means (before the score-sign filter)
    train_harmless: Prompts
    val_harmful: Prompts  # the selection
    val_harmless: Prompts
    heldout_harmful: Prompts  # the evaluation: train-split prompts after the first n_train
    heldout_harmless: Prompts
    offsets: np.ndarray  # post-instruction offsets from the prompt end, negative (e.g. [-5..-1])
    position_tokens: list[str]  # the template token at each offset


def _shuffled(texts: Sequence[str], rng: np.random.Generator) -> list[str]:
    texts = list(texts)
    return [texts[i] for i in rng.permutation(len(texts))]


def split_texts(cfg: Config, train: RefusalSet, val: RefusalSet) -> list[list[str]]:
    """Harmful and harmless texts of the train, val and held-out sets, from seeded shuffles: the held-out prompts
    are train-split prompts after the first n_train, so they neither give nor select the direction."""
    rng = np.random.default_rng(cfg.seed)
    harm_train, safe_train = _shuffled(train.harmful_texts, rng), _shuffled(train.harmless_texts, rng)
    harm_val, safe_val = _shuffled(val.harmful_texts, rng), _shuffled(val.harmless_texts, rng)
    need = cfg.n_train + cfg.n_eval
    if len(harm_train) < need or len(safe_train) < need:
        raise ValueError(f"n_train + n_eval = {need} exceeds the training prompts ({len(harm_train)} harmful, "
                         f"{len(safe_train)} harmless)")
    if len(harm_val) < cfg.n_val or len(safe_val) < cfg.n_val:
        raise ValueError(f"n_val = {cfg.n_val} exceeds the validation prompts ({len(harm_val)}, {len(safe_val)})")
    return [harm_train[:cfg.n_train], safe_train[:cfg.n_train], harm_val[:cfg.n_val], safe_val[:cfg.n_val],
            harm_train[cfg.n_train:need], safe_train[cfg.n_train:need]]


def load_prompt_sets(cfg: Config, model) -> PromptSets:
    """The packaged refusal prompts (psm_jax/persona/data/refusal), split and encoded for `model`."""
    texts = split_texts(cfg, load_refusal("train"), load_refusal("val"))
    sets, offsets, position_tokens = encode_prompts(model, texts)
    return PromptSets(*sets, offsets=offsets, position_tokens=position_tokens)


def score_tokens(model, markers: RefusalMarkers) -> tuple[list[int], list[str]]:
    """The refusal score's token ids (the first token of each score marker, with and without a leading space) and
    their token strings, which the report prints so the score can be read."""
    ids = refusal_token_ids(model.tokenizer, markers.score_tokens)
    return ids, [model.tokenizer.convert_ids_to_tokens(i) for i in ids]
