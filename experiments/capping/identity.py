"""Identity under role-inducing system prompts, without and with capping: the held-out roles, greedy identity
answers (keyword scorer), their axis projection by layer, and the judge-free identity log-odds."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from experiments.capping.config import Config
from psm_jax.persona import measures
from psm_jax.persona.datasets import Role
from psm_jax.persona.directions import SITE, unit
from psm_jax.persona.prompts import role_phrase, select_roles, system_conv
from psm_jax.persona.rollouts import Rollout


class IdentityAnswers(NamedTuple):
    """The greedy identity answers of `identity_answers`."""

    questions: list[str]  # the identity probes asked
    role_prompts: list[list[dict]]  # each held-out role's instruction as the system prompt, then each question
    answers: dict[str, list[Rollout]]  # "default", "role", "role+cap" -> the answers; {} without questions


def held_out_roles(cfg: Config, axis_info: dict) -> tuple[list[Role], list[str]]:
    """Held-out roles (not among the axis's own where possible) with their held-out instruction, so the evaluation
    does not reuse the prompts the axis was built from."""
    from psm_jax.persona import datasets

    roleset = datasets.load_roles()
    axis_roles = set(axis_info.get("roles") or [])
    pool = [r for r in roleset.roles if r.name not in axis_roles and r.name != "assistant"] or \
        [r for r in roleset.roles if r.name != "assistant"]
    roles = select_roles(pool, cfg.n_eval_roles, cfg.seed + 100)
    instr = [r.instructions[min(cfg.eval_instruction, len(r.instructions) - 1)] for r in roles]
    return roles, instr


def identity_answers(cfg: Config, model, instr, gen_probes: list[str], cap_fn, progress: bool) -> IdentityAnswers:
    """Greedy identity answers under the default prompt, the role prompts and the role prompts with capping: the
    generated-text view of whether capping keeps the Assistant's identity. (No answers without probes.)"""
    from psm_jax.persona.rollouts import generate_responses

    role_gen = [system_conv(s, q) for s in instr for q in gen_probes]
    default_gen = [system_conv(None, q) for q in gen_probes]
    if not gen_probes:
        return IdentityAnswers(gen_probes, role_gen, {})
    plain = generate_responses(model, default_gen + role_gen, max_new_tokens=cfg.max_new_tokens,
                               batch_size=cfg.batch_size, progress=progress)
    capped = generate_responses(model, role_gen, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                edits_fn=cap_fn, progress=progress)
    return IdentityAnswers(gen_probes, role_gen, {"default": plain[:len(default_gen)],
                                                  "role": plain[len(default_gen):], "role+cap": capped})


def keyword_rate(probes, rollouts) -> float:
    """The fraction of answers the keyword scorer reads as the Assistant's (no judge)."""
    return float(np.mean([probes.is_assistant_answer(r.response) for r in rollouts]))


def _mean_proj_by_layer(model, conversations, axis, edits_fn, batch_size, progress):
    from psm_jax.persona.rollouts import activation_means

    acts = activation_means(model, conversations, site=SITE, batch_size=batch_size, edits_fn=edits_fn,
                            progress=progress)
    r = acts["response_mean"]  # [N, L, D]
    u = unit(axis)
    proj = np.einsum("nld,ld->nl", r, u)
    return proj[acts["n_response"] > 0]


def projections_by_layer(cfg: Config, model, axis, gen_out: dict[str, list[Rollout]], cap_fn,
                         progress: bool) -> dict[str, np.ndarray]:
    """The identity answers' axis projection at every layer per condition: where along the depth capping moves the
    answers, and whether the shift holds past the capped range."""
    if not gen_out:
        return {}
    return {k: _mean_proj_by_layer(model, [r.conversation() for r in gen_out[k]], axis, fn, cfg.batch_size, progress)
            for k, fn in (("default", None), ("role", None), ("role+cap", cap_fn))}


def logodds(model, prompts, a, b, edits_fn, batch_size: int) -> np.ndarray:
    """Per prompt, total log P(a) - log P(b) as the assistant's answer: the judge-free identity measure shared by the
    role prompts and the role-play conversations."""
    if not prompts:
        return np.zeros(0)
    s = measures.choice_scores(model, prompts, list(zip(a, b)), edits_fn=edits_fn, batch_size=batch_size,
                               per_token=False)
    return s[:, 0] - s[:, 1]


def identity_logodds(cfg: Config, model, probes, roles, instr, cap_fn):
    """Identity log-odds (assistant vs persona answer) under the role prompts without and with capping, and under the
    default prompt as the reference: (default, role, role + capping)."""
    for q in cfg.logprob_probes:
        if q not in probes.questions:
            raise ValueError(f"logprob probe {q!r} is not among the identity probes in {probes.source}")
    lp_prompts, lp_asst, lp_pers = [], [], []
    for r, s in zip(roles, instr):
        for q in cfg.logprob_probes:
            lp_prompts.append(system_conv(s, q))
            lp_asst.append(cfg.assistant_answer)
            lp_pers.append(cfg.persona_answer.format(role=role_phrase(r.name)))
    lo_role = logodds(model, lp_prompts, lp_asst, lp_pers, None, cfg.batch_size)
    lo_cap = logodds(model, lp_prompts, lp_asst, lp_pers, cap_fn, cfg.batch_size)
    dflt_prompts = [system_conv(None, q) for _ in roles for q in cfg.logprob_probes]
    lo_default = logodds(model, dflt_prompts, lp_asst, lp_pers, None, cfg.batch_size)  # same answers, no role prompt
    return lo_default, lo_role, lo_cap
