"""Long scripted role-play conversations, without and with capping: whether the persona takes over as the
conversation goes on (identity log-odds after k scripted exchanges), how the scripted replies drift along the axis,
and the identity answers at the end."""
from __future__ import annotations

import dataclasses

import numpy as np

from experiments.capping.config import Config
from experiments.capping.identity import keyword_rate, logodds
from psm_jax.persona.axis import per_turn_projections
from psm_jax.persona.datasets import Conversation
from psm_jax.persona.prompts import role_phrase
from psm_jax.persona.rollouts import Rollout


@dataclasses.dataclass(frozen=True)
class RolePlay:
    """The role-play step's outputs; the defaults stand for the step not run (`Config.roleplay` off)."""

    conversations: list[Conversation] = dataclasses.field(default_factory=list)  # the scripted role-plays
    # identity log-odds by the number of scripted exchanges before the probe
    rows: list[dict] = dataclasses.field(default_factory=list)
    keyword_rate: dict[str, float] = dataclasses.field(default_factory=dict)  # end answers, "plain" and "capped"
    # each whole conversation followed by each role-play probe, and the greedy answers without and with capping
    end_prompts: list[list[dict]] = dataclasses.field(default_factory=list)
    end_answers_plain: list[Rollout] = dataclasses.field(default_factory=list)
    end_answers_capped: list[Rollout] = dataclasses.field(default_factory=list)
    # per_turn_projections at the readout layer, without and with capping: [conversation, 1, assistant turn]
    drift_plain: np.ndarray | None = None
    drift_capped: np.ndarray | None = None
    logodds_plain: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))  # per probe prompt
    logodds_capped: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))


def _probe_prompts(cfg: Config, rp) -> tuple[list, list, list, np.ndarray]:
    """Every conversation cut after k = 0..n scripted exchanges, each cut followed by each role-play probe: the
    prompts, the assistant and persona answers they score, and k per prompt."""
    rp_prompts, rp_a, rp_b, rp_k = [], [], [], []
    for c in rp:
        msgs = c.as_dicts()
        persona = cfg.persona_answer.format(role=role_phrase(c.role or c.id))
        sys_n = 1 if msgs and msgs[0]["role"] == "system" else 0
        for k in range(c.n_exchanges + 1):
            hist = msgs[:sys_n + 2 * k]
            for q in cfg.roleplay_probes:
                rp_prompts.append(hist + [{"role": "user", "content": q}])
                rp_a.append(cfg.assistant_answer)
                rp_b.append(persona)
                rp_k.append(k)
    return rp_prompts, rp_a, rp_b, np.asarray(rp_k)


def _roleplay_logodds(cfg: Config, model, rp, cap_fn) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """Identity log-odds after k = 0..n scripted exchanges of each role-play conversation, without and with capping:
    whether the persona takes over as the conversation goes on. (rows by k, plain, capped)."""
    rp_prompts, rp_a, rp_b, rp_k = _probe_prompts(cfg, rp)
    rp_plain = logodds(model, rp_prompts, rp_a, rp_b, None, cfg.batch_size)
    rp_cap = logodds(model, rp_prompts, rp_a, rp_b, cap_fn, cfg.batch_size)
    rp_rows = []
    for k in sorted(set(rp_k.tolist())):
        rp_rows.append({"exchanges before probe": k, "log-odds (no cap)": float(rp_plain[rp_k == k].mean()),
                        "log-odds (capped)": float(rp_cap[rp_k == k].mean()),
                        "gain": float((rp_cap - rp_plain)[rp_k == k].mean())})
    return rp_rows, rp_plain, rp_cap


def roleplay_step(cfg: Config, model, axis, readout: int, probes, cap_fn, progress: bool) -> RolePlay:
    """Long scripted role-play conversations without and with capping: identity log-odds by exchange, the drift of
    the scripted replies along the axis, and identity answers at the end."""
    from psm_jax.persona import datasets
    from psm_jax.persona.rollouts import generate_responses

    rp = datasets.load_conversations("roleplay")
    rp_rows, rp_plain, rp_cap = _roleplay_logodds(cfg, model, rp, cap_fn)
    rp_full = [c.as_dicts() for c in rp]
    d_plain, _ = per_turn_projections(model, rp_full, axis[[readout]], layers=(readout,), batch_size=4,
                                      progress=progress, desc="role-play drift")
    d_cap, _ = per_turn_projections(model, rp_full, axis[[readout]], layers=(readout,), batch_size=4,
                                    edits_fn=cap_fn, progress=progress, desc="role-play drift (capped)")
    end_convs = [c.as_dicts() + [{"role": "user", "content": q}] for c in rp for q in cfg.roleplay_probes]
    end_plain = generate_responses(model, end_convs, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                   progress=progress)
    end_cap = generate_responses(model, end_convs, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                 edits_fn=cap_fn, progress=progress)
    rp_kw = {"plain": keyword_rate(probes, end_plain), "capped": keyword_rate(probes, end_cap)}
    return RolePlay(conversations=rp, rows=rp_rows, keyword_rate=rp_kw, end_prompts=end_convs,
                    end_answers_plain=end_plain, end_answers_capped=end_cap, drift_plain=d_plain, drift_capped=d_cap,
                    logodds_plain=rp_plain, logodds_capped=rp_cap)
