"""Which role responses count toward a role vector: non-empty ones, then (when configured) those the likelihood
adherence filter finds more likely under their role instruction than under an assistant prompt, and those a judge
scores as adherent. Each filter is applied only where its validity check passes on the model: a score the model
cannot tell role answers from default answers by would drop responses at random."""
from __future__ import annotations

import numpy as np

from experiments.assistant_axis.config import Config
from experiments.assistant_axis.rollouts import Prompts

ASSISTANT_SYSTEM = "You are a helpful AI assistant."  # the adherence score's comparison prompt


def _checked_roles(cfg: Config, groups, n_role_objs: int) -> list[int]:
    """The roles whose responses the filters' validity checks compare with default answers."""
    return sorted(set(int(g) for g in groups))[:min(cfg.adherence_check_roles, n_role_objs)]


def _default_pairs(check, groups, questions, default_by_question: dict) -> tuple[np.ndarray, list[str]]:
    """The responses of the checked roles whose question has a default answer, and those default answers: each
    default answer is scored as that response's role would score it, for the filters' validity checks."""
    idx = [i for g in check for i in np.flatnonzero(groups == g) if questions[i] in default_by_question]
    return np.asarray(idx, int), [default_by_question[questions[i]] for i in idx]


def _paired_role_check(role_s, def_s, d_g, groups, check) -> dict:
    """Per checked role, the mean score of its own responses against that of the default answers: the paired check
    over roles (not valid, with NaN effect, under 2 roles with both means). Unscored responses are NaN."""
    from psm_jax.persona.measures import validity

    def mean(x):
        return float(np.mean(x[np.isfinite(x)])) if np.isfinite(x).any() else np.nan

    pos = [mean(role_s[groups == g]) for g in check]
    neg = [mean(def_s[d_g == g]) for g in check]
    ok = [i for i in range(len(check)) if np.isfinite(pos[i]) and np.isfinite(neg[i])]
    return validity([pos[i] for i in ok], [neg[i] for i in ok]) if len(ok) >= 2 else \
        {"effect": float("nan"), "low": float("nan"), "high": float("nan"), "n": len(ok), "valid": False}


def _judge_scores(judge, roleset, role_objs, groups, questions, answers, d_idx, d_answers):
    """The judge's 0-3 adherence scores (NaN where it gives none) of every role response and of the default answers
    `d_answers`, each under the rubric of its role (default answer k under that of response `d_idx[k]`)."""
    role_s, def_s = np.full(len(answers), np.nan), np.full(len(d_idx), np.nan)
    for g, role in enumerate(role_objs):
        role_text = f"{role.name} ({role.description})".replace("{", "{{").replace("}", "}}")
        rubric = roleset.adherence_rubric.replace("{role}", role_text)
        own, dflt = np.flatnonzero(groups == g), np.flatnonzero(groups[d_idx] == g)
        pairs = [(questions[i], answers[i]) for i in own] + [(questions[d_idx[k]], d_answers[k]) for k in dflt]
        got = np.asarray([np.nan if s is None else float(s)
                          for s in judge.rubric_score_many(pairs, rubric=rubric, max_score=3)], float)
        role_s[own], def_s[dflt] = got[:len(own)], got[len(own):]
    return role_s, def_s


def _judge_filter(model, cfg: Config, pr: Prompts, answers, default_by_question: dict):
    """Rubric filtering (keep a response the judge scores >= judge_min_score on a 0-3 adherence rubric), with the
    likelihood filter's kind of validity check: the judge must score the checked roles' own responses above default
    answers to the same questions under the same role's rubric, paired over roles. The filter is applied only where
    the check passes: a judge that cannot tell role answers from the Assistant's, or scores nothing (as a small
    model judging itself may), would drop responses at random or all of them. Returns (keep, info)."""
    from psm_jax.persona.judge import make_judge

    if pr.roleset.adherence_rubric is None:
        raise ValueError(f"{pr.roleset.source} has no adherence_rubric; judge filtering needs one")
    groups, questions = np.asarray(pr.groups), [c[-1]["content"] for c in pr.convs]
    check = _checked_roles(cfg, groups, len(pr.role_objs))
    d_idx, d_answers = _default_pairs(check, groups, questions, default_by_question)
    role_s, def_s = _judge_scores(make_judge(cfg.judge, model), pr.roleset, pr.role_objs, groups, questions, answers,
                                  d_idx, d_answers)
    validity = _paired_role_check(role_s, def_s, groups[d_idx], groups, check)
    passes = np.nan_to_num(role_s, nan=-1.0) >= cfg.judge_min_score
    keep = passes if validity["valid"] else np.ones(len(answers), bool)
    return keep, {"judge_validity": validity, "judge_applied": bool(validity["valid"]),
                  "judge_scored": int(np.isfinite(role_s).sum()), "judge_dropped": int((~keep).sum()),
                  "judge_would_drop": int((~passes).sum())}


def _adherence(model, cfg: Config, convs, groups, answers, n_role_objs: int, default_by_question: dict):
    """Likelihood adherence filter on role responses, with its validity check.

    Score of a response: per-token log P(response | its role instruction, q) - log P(response | ASSISTANT_SYSTEM, q).
    Validity check (per role, the independent unit): the role's own responses must score higher under its
    instruction than default-prompt answers to the same questions do; a paired bootstrap interval over the first
    `adherence_check_roles` roles. The filter (score > adherence_min) is applied only when the check passes.
    Returns (keep [len(convs)], info)."""
    from psm_jax.persona.axis import adherence_scores

    systems = [c[0]["content"] if c[0]["role"] == "system" else "" for c in convs]
    questions = [c[-1]["content"] for c in convs]
    check = _checked_roles(cfg, groups, n_role_objs)
    d_idx, d_answers = _default_pairs(check, groups, questions, default_by_question)
    scores = adherence_scores(model, systems + [systems[i] for i in d_idx], questions + [questions[i] for i in d_idx],
                              list(answers) + d_answers, ASSISTANT_SYSTEM, batch_size=cfg.batch_size)
    role_s, def_s = scores[:len(convs)], scores[len(convs):]
    check_res = _paired_role_check(role_s, def_s, groups[d_idx], groups, check)
    keep = np.isfinite(role_s)
    if check_res["valid"]:
        keep &= role_s > cfg.adherence_min
    info = {"adherence_validity": check_res, "adherence_applied": bool(check_res["valid"]),
            "adherence_dropped": int(np.isfinite(role_s).sum() - keep.sum()),
            "adherence_scored": int(np.isfinite(role_s).sum()),
            "adherence_would_drop": int(np.sum(role_s[np.isfinite(role_s)] <= cfg.adherence_min)),
            "adherence_mean_score": float(np.nanmean(role_s)), "adherence_scores": [float(x) for x in role_s]}
    return keep, info


def response_filter(model, cfg: Config, pr: Prompts, rolls, ntok):
    """Which role responses count: non-empty, then the adherence filter and the judge where configured.
    Returns (keep [n role responses], adherence summary, judge summary or None)."""
    n = len(pr.convs)
    keep = ntok[:n] > 0
    answers = [r.response for r in rolls[:n]]
    ds = cfg.default_samples
    by_q = {q: rolls[n + qi * ds].response for qi, q in enumerate(pr.questions)}  # first prompt, first sample
    adherence = {}
    if cfg.adherence == "likelihood":
        akeep, adherence = _adherence(model, cfg, pr.convs, np.asarray(pr.groups), answers, len(pr.role_objs), by_q)
        keep &= akeep
    judge = None
    if cfg.judge != "none":
        jkeep, judge = _judge_filter(model, cfg, pr, answers, by_q)
        keep &= jkeep
    return keep, adherence, judge
