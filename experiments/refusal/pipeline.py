"""The study's computation: the prompt sets, the candidates' difference in means, the selection, then the held-out
evaluation of the winner with its nulls, answers and CE cost (`run`). No files, no printing."""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable

import numpy as np

from experiments.refusal.candidates import candidate_indices, candidate_layers
from experiments.refusal.config import Config
from experiments.refusal.directions import TrainPrompts, mean_diffs, train_prompts
from experiments.refusal.evaluation import (GreedyAnswers, ablation_damage, answer_validity, chat_ce_cost,
                                            conditions, greedy_answers, heldout_logodds)
from experiments.refusal.nulls import null_effects, null_units
from experiments.refusal.prompts import PromptSets, load_prompt_sets, score_tokens
from experiments.refusal.selection import Selection, select_candidate, selected_direction
from psm_jax.persona.datasets import RefusalMarkers, load_refusal_markers
from psm_jax.persona.refusal import Prompts, condition_edits, orthogonalized_check


@dataclasses.dataclass
class Result:
    """Everything the report shows: the candidates and their scores, the selected direction, its held-out
    evaluation against the nulls, the CE check and the timings."""

    config: Config
    n_layers: int
    d_model: int
    markers: RefusalMarkers  # the refusal phrases of the rate and the score's marker tokens
    score_token_ids: list[int]  # the tokens whose probability the refusal log-odds reads
    score_token_strings: list[str]
    position_offsets: np.ndarray  # every post-instruction offset from the prompt end (negative)
    position_tokens: list[str]  # the template token at each offset
    candidate_layers: tuple[int, ...]
    candidate_offsets: list[int]
    candidate_indices: list[tuple[int, int]]  # (position index, layer) of every scored candidate
    mean_diffs: np.ndarray  # [position, layer, d_model] float64: the difference in means at every offset and layer
    filtering: dict[str, int | bool]  # the score-sign filter's counts (`directions.sign_filter`)
    candidate_scores: list[dict]  # bypass, induce, KL, norm per candidate, annotated by the configured rule
    selected: dict  # the winning candidate's row
    selection_tier: str  # "strict", the fallback tier that found it, or "matched_damage"
    fallback_used: bool
    selection_nulls: dict[str, np.ndarray] | None  # matched_damage: the val random directions' drops and kls
    harmful_val_logodds: float  # mean unedited refusal log-odds on the val prompts
    harmless_val_logodds: float
    direction: np.ndarray  # the selected difference in means, float64: added in the induce condition
    unit_direction: np.ndarray  # its unit vector: ablated
    heldout_harmful: Prompts
    heldout_harmless: Prompts
    heldout_logodds: dict[str, np.ndarray]  # per condition (`evaluation.conditions`), per held-out prompt
    heldout_answers: dict[str, GreedyAnswers]  # per condition
    logodds_drop: float  # mean held-out harmful log-odds, unedited minus ablated
    ablation_kl: np.ndarray  # per held-out harmless prompt: KL(unedited || ablated)
    nulls: dict[str, dict[str, np.ndarray]]  # "random" / "shuffled": drops, rises and kls, one per null direction
    orthogonalized_max_logit_diff: float  # runtime ablation vs orthogonalised weights, held-out harmful prompts
    orthogonalized_logodds: np.ndarray  # held-out harmful log-odds with the orthogonalised weights
    validity: dict | None  # the refusal score's AUROC for the refusing answers (`score_validity`)
    chat_ce: dict  # the CE cost on held-out ShareGPT chat (`measures.chat_fluency_cost`); {} when n_ce = 0
    seconds: dict[str, float]  # wall-clock seconds per step, and the total


@dataclasses.dataclass(frozen=True)
class _LogOdds:
    """The held-out log-odds step's numbers (timed as one)."""

    logodds: dict[str, np.ndarray]
    drop: float
    ablation_kl: np.ndarray
    nulls: dict[str, dict[str, np.ndarray]]
    orthogonalized_max_logit_diff: float
    orthogonalized_logodds: np.ndarray


@contextlib.contextmanager
def _timed(seconds: dict, name: str):
    """Records the wall-clock seconds of the block under `name` (the report's timing line)."""
    t = time.time()
    yield
    seconds[name] = time.time() - t


def _logodds_step(cfg: Config, model, sets: PromptSets, conds: dict[str, tuple[Prompts, tuple]], token_ids: list[int],
                  base: tuple, train: TrainPrompts, selection: Selection, direction: np.ndarray,
                  unit: np.ndarray) -> _LogOdds:
    """The held-out log-odds per condition, the ablation's KL cost, the nulls measured the same way, and the check
    that orthogonalised weights match the runtime ablation."""
    logodds = heldout_logodds(cfg, model, conds, token_ids)
    kl, harmless_logits = ablation_damage(cfg, model, sets.heldout_harmless, unit, base)
    units = null_units(cfg, model, train, selection.selected)
    nulls = null_effects(cfg, model, units, sets.heldout_harmful, sets.heldout_harmless, token_ids, logodds,
                         float(np.linalg.norm(direction)), selection.selected["layer"], harmless_logits)
    orth_diff, orth_logodds = orthogonalized_check(model.params, model.config, unit, sets.heldout_harmful, token_ids,
                                                   cfg.batch_size)
    return _LogOdds(logodds, float(logodds["harmful_base"].mean() - logodds["harmful_ablated"].mean()), kl, nulls,
                    orth_diff, orth_logodds)


def run(config: Config, model, progress: Callable[[str], None] | None = None) -> Result:
    """The whole pipeline: directions, selection, held-out evaluation, the CE check (`progress`: a callable for
    status lines, or None; when given, progress bars are shown too). No files."""
    t0, seconds, cfg, bars, mc = time.time(), {}, config, progress is not None, model.config
    layers = candidate_layers(cfg, mc)
    base = condition_edits(mc)  # every edit switched off: the same compiled functions as the edited runs
    sets, markers = load_prompt_sets(cfg, model), load_refusal_markers()
    offsets, indices = candidate_indices(cfg, sets.offsets, layers)
    token_ids, token_strings = score_tokens(model, markers)
    with _timed(seconds, "baseline_scores"):
        train = train_prompts(cfg, model, sets, token_ids, base)
    with _timed(seconds, "mean_diff"):
        diffs = mean_diffs(cfg, model, train, sets.offsets, bars)
    with _timed(seconds, "selection"):
        selection = select_candidate(cfg, model, diffs, indices, sets, token_ids, base, bars)
    direction, unit = selected_direction(diffs, selection.selected)
    ablate = condition_edits(mc, unit=unit, ablate=True)
    conds = conditions(sets, base, ablate, condition_edits(mc, vector=direction,
                                                           induce_layer=selection.selected["layer"]))
    with _timed(seconds, "logodds_eval"):
        scored = _logodds_step(cfg, model, sets, conds, token_ids, base, train, selection, direction, unit)
    with _timed(seconds, "generation"):
        answers = greedy_answers(cfg, model, conds, markers)
    validity = answer_validity(cfg, scored.logodds, answers, markers)
    with _timed(seconds, "ce"):
        ce = chat_ce_cost(cfg, model, ablate)
    seconds["total"] = time.time() - t0
    return Result(
        config=cfg, n_layers=mc.n_layers, d_model=mc.d_model, markers=markers, score_token_ids=token_ids,
        score_token_strings=token_strings, position_offsets=sets.offsets, position_tokens=sets.position_tokens,
        candidate_layers=layers, candidate_offsets=offsets, candidate_indices=indices, mean_diffs=diffs,
        filtering=train.filtering, candidate_scores=selection.candidate_scores, selected=selection.selected,
        selection_tier=selection.tier, fallback_used=selection.tier not in ("strict", "matched_damage"),
        selection_nulls=selection.selection_nulls,
        harmful_val_logodds=selection.harmful_val_logodds, harmless_val_logodds=selection.harmless_val_logodds,
        direction=direction, unit_direction=unit, heldout_harmful=sets.heldout_harmful,
        heldout_harmless=sets.heldout_harmless, heldout_logodds=scored.logodds, heldout_answers=answers,
        logodds_drop=scored.drop, ablation_kl=scored.ablation_kl, nulls=scored.nulls,
        orthogonalized_max_logit_diff=scored.orthogonalized_max_logit_diff,
        orthogonalized_logodds=scored.orthogonalized_logodds,
        validity=validity, chat_ce=ce, seconds=seconds)
