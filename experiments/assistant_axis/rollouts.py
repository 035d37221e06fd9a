"""What the study samples: every (role instruction, extraction question) conversation and the default prompts'
conversations on the same questions (`prompts`), the sampled responses with their mean assistant-content activation
at every layer (`rollout_step`), and a few of the responses for the report to show (`examples`)."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import numpy as np

from experiments.assistant_axis.config import Config
from psm_jax.persona.axis import response_means
from psm_jax.persona.datasets import Role, RoleSet
from psm_jax.persona.prompts import sample_questions, select_roles, system_conv


class Prompts(NamedTuple):
    """What is sampled: every (role instruction, question) conversation and the default prompts' conversations."""
    roleset: RoleSet
    roles: list[Role]  # the sampled roles (never "assistant")
    role_objs: list[Role]  # roles, plus the "assistant" role as a reference point when configured
    questions: list[str]
    defaults: list[str]
    convs: list  # role conversations, grouped by role_objs index in `groups`, question index in `qids`
    groups: np.ndarray
    qids: np.ndarray
    dconvs: list  # default-prompt conversations, in (prompt, question, sample) order


def role_pool(roleset: RoleSet, categories: Sequence[str]) -> list[Role]:
    """The roles of `categories` (every role when empty), in file order; an unknown category is an error."""
    if not categories:
        return list(roleset.roles)
    known = sorted({r.category for r in roleset.roles} - {"assistant"})
    unknown = [c for c in categories if c not in known]
    if unknown:
        raise ValueError(f"role_categories={tuple(categories)!r}: unknown {unknown}; expected some of {known}")
    return [r for r in roleset.roles if r.category in categories]


def prompts(cfg: Config) -> Prompts:
    """The roles, questions and conversations of the run (the default prompts get the roles' questions)."""
    from psm_jax.persona import datasets

    roleset = datasets.load_roles()
    roles = select_roles(role_pool(roleset, cfg.role_categories), cfg.n_roles, cfg.seed)
    questions = sample_questions(datasets.load_role_questions(), cfg.n_questions, cfg.seed)
    defaults = datasets.load_default_prompts(cfg.model_display_name)
    role_objs = list(roles) + ([roleset["assistant"]] if cfg.include_assistant_role and "assistant" in roleset else [])
    convs, groups, qids = [], [], []
    for g, role in enumerate(role_objs):
        for instr in role.instructions[:cfg.instructions_per_role]:
            for qi, q in enumerate(questions):
                convs.append(system_conv(instr, q))
                groups.append(g)
                qids.append(qi)
    dconvs = [system_conv(p, q) for p in defaults for q in questions for _ in range(cfg.default_samples)]
    return Prompts(roleset, roles, role_objs, questions, defaults, convs, np.asarray(groups), np.asarray(qids),
                   dconvs)


def rollout_step(cfg: Config, model, pr: Prompts, bars: bool):
    """Sampled responses to the role conversations, then the default ones (one key, so one stream of samples), and
    each response's mean activation over its assistant content tokens. Returns (rollouts, means [N, L, D], token
    counts [N])."""
    from psm_jax.persona.rollouts import generate_responses

    rolls = generate_responses(model, pr.convs + pr.dconvs, max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, top_p=cfg.top_p, key=jax.random.key(cfg.seed),
                               batch_size=cfg.batch_size, progress=bars)
    means, ntok = response_means(model, [r.conversation() for r in rolls], batch_size=cfg.batch_size, progress=bars)
    return rolls, means, ntok


def examples(pr: Prompts, rolls) -> list[dict]:
    """A few sampled answers for the report: the first response of four roles and of the default prompts."""
    rows = []
    for g in sorted(set(pr.groups.tolist()))[:4]:
        i = int(np.flatnonzero(pr.groups == g)[0])
        rows.append({"role": pr.role_objs[g].name, "question": pr.convs[i][-1]["content"],
                     "response": rolls[i].response.replace("\n", " ")[:160]})
    rows.append({"role": "(default)", "question": pr.dconvs[0][-1]["content"],
                 "response": rolls[len(pr.convs)].response.replace("\n", " ")[:160]})
    return rows
