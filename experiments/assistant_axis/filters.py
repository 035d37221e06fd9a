"""Which role responses count toward a role vector: non-empty ones, then (when configured) those the likelihood
adherence filter finds more likely under their role instruction than under an assistant prompt, and those a judge
scores as adherent. The adherence filter is applied only where its validity check passes on the model: a score the
model cannot tell role answers from default answers by would drop responses at random."""
from __future__ import annotations

import numpy as np

from experiments.assistant_axis.config import Config
from experiments.assistant_axis.rollouts import Prompts

ASSISTANT_SYSTEM = "You are a helpful AI assistant."  # the adherence score's comparison prompt


def _judge_keep(model, cfg: Config, roleset, role_objs, convs, groups, rolls, progress: bool):
    """Rubric filtering: keep responses the judge scores >= judge_min_score (0-3 adherence rubric)."""
    from psm_jax.persona.judge import make_judge

    judge = make_judge(cfg.judge, model)
    if roleset.adherence_rubric is None:
        raise ValueError(f"{roleset.source} has no adherence_rubric; judge filtering needs one")
    keep = np.zeros(len(convs), bool)
    scores = np.full(len(convs), -1)
    for g, role in enumerate(role_objs):
        idx = [i for i, gg in enumerate(groups) if gg == g]
        role_text = f"{role.name} ({role.description})".replace("{", "{{").replace("}", "}}")
        rubric = roleset.adherence_rubric.replace("{role}", role_text)
        pairs = [(convs[i][-1]["content"], rolls[i].response) for i in idx]
        got = judge.rubric_score_many(pairs, rubric=rubric, max_score=3)
        for i, s in zip(idx, got):
            scores[i] = -1 if s is None else int(s)
            keep[i] = s is not None and s >= cfg.judge_min_score
    return keep, scores


def _default_rescoring(check, groups, systems, questions, default_by_question: dict):
    """The default answers to each checked role's questions, to be scored under that role's instruction: (systems,
    questions, answers, role of each)."""
    d_sys, d_q, d_a, d_g = [], [], [], []
    for g in check:
        for i in np.flatnonzero(groups == g):
            if questions[i] in default_by_question:
                d_sys.append(systems[i]), d_q.append(questions[i]), d_a.append(default_by_question[questions[i]])
                d_g.append(g)
    return d_sys, d_q, d_a, d_g


def _adherence_validity(role_s, def_s, d_g, groups, check) -> dict:
    """Per checked role, the mean score of its own responses against that of the default answers: the paired check
    over roles (not valid, with NaN effect, under 2 roles with both means)."""
    from psm_jax.persona.measures import validity

    pos = [np.nanmean(role_s[groups == g]) for g in check]
    neg = [np.nanmean(def_s[d_g == g]) if (d_g == g).any() else np.nan for g in check]
    ok = [i for i in range(len(check)) if np.isfinite(pos[i]) and np.isfinite(neg[i])]
    return validity([pos[i] for i in ok], [neg[i] for i in ok]) if len(ok) >= 2 else \
        {"effect": float("nan"), "low": float("nan"), "high": float("nan"), "n": len(ok), "valid": False}


def _adherence(model, cfg: Config, convs, groups, rolls, n_role_objs: int, default_by_question: dict):
    """Likelihood adherence filter on role responses, with its validity check.

    Score of a response: per-token log P(response | its role instruction, q) - log P(response | ASSISTANT_SYSTEM, q).
    Validity check (per role, the independent unit): the role's own responses must score higher under its
    instruction than default-prompt answers to the same questions do; a paired bootstrap interval over the first
    `adherence_check_roles` roles. The filter (score > adherence_min) is applied only when the check passes.
    Returns (keep [len(convs)], info)."""
    from psm_jax.persona.axis import adherence_scores

    systems = [c[0]["content"] if c[0]["role"] == "system" else "" for c in convs]
    questions = [c[-1]["content"] for c in convs]
    answers = [r.response for r in rolls]
    check = sorted(set(int(g) for g in groups))[:min(cfg.adherence_check_roles, n_role_objs)]
    d_sys, d_q, d_a, d_g = _default_rescoring(check, groups, systems, questions, default_by_question)
    scores = adherence_scores(model, systems + d_sys, questions + d_q, answers + d_a, ASSISTANT_SYSTEM,
                              batch_size=cfg.batch_size)
    role_s, def_s, d_g = scores[:len(convs)], scores[len(convs):], np.asarray(d_g)
    check_res = _adherence_validity(role_s, def_s, d_g, groups, check)
    keep = np.isfinite(role_s)
    if check_res["valid"]:
        keep &= role_s > cfg.adherence_min
    info = {"adherence_validity": check_res, "adherence_applied": bool(check_res["valid"]),
            "adherence_dropped": int(np.isfinite(role_s).sum() - keep.sum()),
            "adherence_scored": int(np.isfinite(role_s).sum()),
            "adherence_would_drop": int(np.sum(role_s[np.isfinite(role_s)] <= cfg.adherence_min)),
            "adherence_mean_score": float(np.nanmean(role_s)), "adherence_scores": [float(x) for x in role_s]}
    return keep, info


def response_filter(model, cfg: Config, pr: Prompts, rolls, ntok, bars: bool):
    """Which role responses count: non-empty, then the adherence filter and the judge where configured.
    Returns (keep [n role responses], adherence summary, judge scores or None)."""
    n = len(pr.convs)
    keep = ntok[:n] > 0
    adherence = {}
    if cfg.adherence == "likelihood":
        ds = cfg.default_samples
        by_q = {q: rolls[n + qi * ds].response for qi, q in enumerate(pr.questions)}  # first prompt, first sample
        akeep, adherence = _adherence(model, cfg, pr.convs, pr.groups, rolls[:n], len(pr.role_objs), by_q)
        keep &= akeep
    judge_scores = None
    if cfg.judge != "none":
        jkeep, judge_scores = _judge_keep(model, cfg, pr.roleset, pr.role_objs, pr.convs, list(pr.groups), rolls[:n],
                                          bars)
        keep &= jkeep
    return keep, adherence, judge_scores
