"""Steps 1-3 and 7 of the pipeline for one trait: the sampled pos/neg extraction conversations, the model's own
greedy answers, the judge with its validity check and the filter it gates, the persona vectors with their steering
scales and reliability, the data screening, and reading a saved vectors file back."""
from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from experiments.persona_vectors.config import Config
from experiments.persona_vectors.trait_result import (ExtractionRow, FilterInfo, JudgeSummary, Screening,
                                                      VectorReliability)
from experiments.report import load_vectors
from psm_jax.persona import measures, monitoring, rollouts
from psm_jax.persona.directions import split_half_cosine, typical_norms
from psm_jax.persona.extraction import (VARIANTS, crossfit_separation, extraction_activations, projection_difference,
                                        vectors_from_activations)
from psm_jax.persona.judge import COHERENCE_RUBRIC
from psm_jax.persona.measures import Validity
from psm_jax.persona.prompts import extraction_rows, system_conv


def sample_extraction_rows(model, trait, cfg: Config, key, progress: bool) -> list[ExtractionRow]:
    """Step 1: the pos/neg extraction conversations with their sampled responses."""
    rows = extraction_rows(trait, cfg.n_pairs, cfg.n_questions, cfg.n_samples)
    rolls = rollouts.generate_responses(model, [r["messages"] for r in rows], max_new_tokens=cfg.max_new_tokens,
                                        temperature=cfg.temperature, top_p=cfg.top_p, key=jax.random.fold_in(key, 1),
                                        batch_size=cfg.batch_size, progress=progress)
    for r, ro in zip(rows, rolls):
        r["response"] = ro.response
    return rows


def greedy_rollouts(model, trait, cfg: Config, progress: bool) -> dict:
    """The model's own greedy answers to the extraction questions (no system prompt: screening, residual norms,
    fluency) and to the monitoring questions under every monitoring system prompt, in one generation."""
    questions = list(trait.extraction_questions[:cfg.n_questions])
    own_prompts = [[{"role": "user", "content": q}] for q in questions]
    systems = monitoring.graded_prompts(trait)
    mon_questions = list(trait.evaluation_questions[:cfg.n_monitor_questions])
    mon_prompts = [system_conv(s.system, q) for s in systems for q in mon_questions]
    greedy = rollouts.generate_responses(model, own_prompts + mon_prompts, max_new_tokens=cfg.monitor_max_new_tokens,
                                         temperature=0.0, batch_size=cfg.batch_size, progress=progress)
    return {"questions": questions, "own_prompts": own_prompts,
            "own_responses": [g.response for g in greedy[:len(own_prompts)]], "systems": systems,
            "mon_questions": mon_questions, "mon_rolls": greedy[len(own_prompts):]}


def judge_rows(judge, rows: list[ExtractionRow], trait,
               cfg: Config) -> tuple[list | None, list | None, JudgeSummary]:
    """Step 2: trait scores of every row, the judge's validity check, and coherence where the trait condition holds
    (only when the filter will run: it needs both), written into the rows; (trait scores, coherence scores, summary
    per polarity and the check under "validity"). No judge: (None, None, {})."""
    if judge is None:
        return None, None, {}
    pairs = [(r["question_text"], r["response"]) for r in rows]
    trait_scores = judge.score_many(pairs, rubric=trait.judge_rubric)
    check = judge_validity(rows, trait_scores)
    trait_ok = [d for d in _rows_by_pair(rows).values()
                if trait_scores[d["pos"]] is not None and trait_scores[d["pos"]] >= cfg.trait_threshold
                and trait_scores[d["neg"]] is not None and trait_scores[d["neg"]] < cfg.trait_threshold]
    need = sorted(i for d in trait_ok for i in (d["pos"], d["neg"])) if cfg.filter and check["valid"] else []
    coh_scores = [None] * len(rows)
    if need:
        for i, c in zip(need, judge.score_many([pairs[i] for i in need], rubric=COHERENCE_RUBRIC)):
            coh_scores[i] = c
    for r, ts, cs in zip(rows, trait_scores, coh_scores):
        r["trait_score"], r["coherence"] = ts, cs
    summary: JudgeSummary = {}
    for pol in ("pos", "neg"):
        sel = [i for i, r in enumerate(rows) if r["polarity"] == pol]
        summary[pol] = {"trait_mean": _nanmean([trait_scores[i] for i in sel]),
                        "coherence_mean": _nanmean([coh_scores[i] for i in sel]),
                        "trait_none": sum(trait_scores[i] is None for i in sel),
                        "coherence_judged": len(set(sel) & set(need)), "n": len(sel)}
    summary["validity"] = check
    return trait_scores, coh_scores, summary


def judge_validity(rows, trait_scores) -> Validity:
    """The judge's validity check: per extraction question, its mean trait score of the positive answers minus
    that of the negative ones (rows it could not score are left out), with a 95% interval over questions."""
    per_q: dict = {}
    for r, s in zip(rows, trait_scores):
        if s is not None:
            per_q.setdefault(r["question"], {"pos": [], "neg": []})[r["polarity"]].append(float(s))
    both = [d for _, d in sorted(per_q.items()) if d["pos"] and d["neg"]]
    return measures.validity([np.mean(d["pos"]) for d in both], [np.mean(d["neg"]) for d in both])


def _rows_by_pair(rows) -> dict:
    """{(pair, question, sample): {"pos": row index, "neg": row index}}."""
    by_key: dict = {}
    for i, r in enumerate(rows):
        by_key.setdefault((r["pair"], r["question"], r["sample"]), {})[r["polarity"]] = i
    return by_key


def _nanmean(xs):
    vals = [x for x in xs if x is not None]
    return float(np.mean(vals)) if vals else None


def filter_pairs(rows: list[ExtractionRow], trait_scores, coh_scores, judge_valid: bool,
                 cfg) -> tuple[list[int], list[int], FilterInfo]:
    """Indices of kept pos and neg rows (paired by pair/question/sample) and a summary. The filter applies only
    with a judge whose validity check passed (`judge_valid`)."""
    by_key = _rows_by_pair(rows)
    keys = sorted(by_key)
    all_pos = [by_key[k]["pos"] for k in keys]
    all_neg = [by_key[k]["neg"] for k in keys]
    judged = cfg.filter and trait_scores is not None
    info = {"n_pairs_total": len(keys), "filter": judged and judge_valid, "judge_not_valid": judged and not judge_valid}
    if not info["filter"]:
        info.update(n_pairs_kept=len(keys), fallback=False)
        return all_pos, all_neg, info

    def ok(x, pred):
        return x is not None and pred(x)

    kept = [k for k in keys
            if ok(trait_scores[by_key[k]["pos"]], lambda s: s >= cfg.trait_threshold)
            and ok(trait_scores[by_key[k]["neg"]], lambda s: s < cfg.trait_threshold)
            and ok(coh_scores[by_key[k]["pos"]], lambda s: s >= cfg.coherence_threshold)
            and ok(coh_scores[by_key[k]["neg"]], lambda s: s >= cfg.coherence_threshold)]
    info["n_pairs_kept"] = len(kept)
    if len(kept) < cfg.min_kept_pairs:
        info["fallback"] = True
        return all_pos, all_neg, info
    info["fallback"] = False
    return [by_key[k]["pos"] for k in kept], [by_key[k]["neg"] for k in kept], info


class Extraction(NamedTuple):
    """Step 3's outputs: the persona vectors per variant [n_layers, D], their norms, the typical residual norm per
    layer, the steering unit per layer (c * scales[L] * unit(v[L]); with coef_unit "vector", c = 1 adds v[L]
    itself), the monitoring layer rule's cross-fitted separation per layer (`crossfit_separation`) and the
    response-average vector's split-half reliability per layer (`directions.split_half_cosine` over questions)."""
    vectors: dict
    norms: dict
    typical: np.ndarray
    scales: np.ndarray
    rule_separation: np.ndarray | None
    reliability: VectorReliability | None


def vectors_and_scales(model, rows, pos_idx, neg_idx, greedy: dict, cfg: Config, progress: bool) -> Extraction:
    """Step 3 (`Extraction`)."""
    conv = lambda i: rows[i]["messages"] + [{"role": "assistant", "content": rows[i]["response"]}]  # noqa: E731
    acts = extraction_activations(model, [conv(i) for i in pos_idx], [conv(i) for i in neg_idx],
                                  batch_size=cfg.batch_size, progress=progress)
    vecs = vectors_from_activations(acts)
    pos_q, neg_q = [rows[i]["question"] for i in pos_idx], [rows[i]["question"] for i in neg_idx]
    reliability = split_half_cosine(acts["pos"]["response_mean"], acts["neg"]["response_mean"], pos_q, neg_q,
                                    seed=cfg.seed)
    own_convs = [p + [{"role": "assistant", "content": r}] for p, r in zip(greedy["own_prompts"],
                                                                             greedy["own_responses"])]
    typical = typical_norms(model, own_convs, batch_size=cfg.batch_size)
    norms = {v: np.linalg.norm(vecs[v], axis=-1) for v in VARIANTS}
    scales = norms["response_avg"] if cfg.coef_unit == "vector" else typical
    return Extraction(vecs, norms, typical, scales, crossfit_separation(acts, pos_q, neg_q), reliability)


def screening(model, rows: list[ExtractionRow], pos_idx, neg_idx, own_responses, vector, layer: int,
              batch_size: int) -> Screening:
    """Step 7: projection of the given extraction responses minus the model's own answers (expect pos > 0 > neg)."""
    scr = {}
    for pol, idx in (("pos", pos_idx), ("neg", neg_idx)):
        prompts = [[{"role": "user", "content": rows[i]["question_text"]}] for i in idx]
        d = projection_difference(model, prompts, [rows[i]["response"] for i in idx], vector, layer,
                                  own_responses=[own_responses[rows[i]["question"]] for i in idx],
                                  batch_size=batch_size)
        scr[pol] = {"mean": d["mean"], "std": float(np.std(d["diff"])), "n": len(idx)}
    return scr


def load_persona_vectors(path, model=None, *, model_name: str | None = None):
    """Read a vectors file written by this experiment, checking it fits `model` (width, layer count)."""
    width = model.config.d_model if model is not None else None
    tensors, meta = load_vectors(path, expect_model=model_name, expect_width=width)
    if model is not None:
        for k, v in tensors.items():
            if v.ndim != 2 or v.shape[0] != model.config.n_layers:
                raise ValueError(f"vector {k!r} in {str(path)!r} has shape {v.shape}; expected "
                                 f"[n_layers={model.config.n_layers}, d_model={model.config.d_model}]")
    return tensors, meta
