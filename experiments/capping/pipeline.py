"""The study's computation: the cap (axis, layers, thresholds), then every evaluation of the package doc with and
without it, gathered into the metrics (`run`). No files, no printing."""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from experiments.capping.behaviour import TraitBehaviour, trait_behaviour
from experiments.capping.capability import perplexity_cost, qa_step
from experiments.capping.config import Config
from experiments.capping.identity import (IdentityAnswers, held_out_roles, identity_answers, identity_logodds,
                                          keyword_rate, projections_by_layer)
from experiments.capping.jailbreak import Jailbreaks, jailbreak_step
from experiments.capping.roleplay import RolePlay, roleplay_step
from experiments.capping.summary import metrics
from experiments.capping.thresholds import Thresholds, capped_layers, load_axis, threshold_step
from psm_jax.persona.capping import capping_edit, make_edits_fn
from psm_jax.persona.datasets import IdentityProbes, Role


@dataclasses.dataclass
class Result:
    """What the report shows, grouped by the step of `run` that produced it."""

    config: Config
    n_layers: int  # the model's number of layers
    capped_layers: tuple[int, ...]
    readout_layer: int  # the first layer after the capped range, where the role-play drift is read
    axis: np.ndarray  # [n_layers, d_model]
    # where the axis came from (`load_axis`): "source", the "roles" it was built from, the file's "n_roles" and "seed"
    axis_info: dict[str, Any]  # values of mixed types (str, list[str], int)
    thresholds: Thresholds
    eval_roles: list[Role]  # the held-out roles whose system prompts the evaluation uses
    identity_probes: IdentityProbes
    identity_answers: IdentityAnswers
    identity_keyword_rate: dict[str, float]  # per condition of `identity_answers.answers`
    # per condition of `identity_answers.answers`: each answer's mean projection on the unit axis, [answer, layer]
    answer_projections: dict[str, np.ndarray]
    traits: TraitBehaviour
    roleplay: RolePlay
    jailbreaks: Jailbreaks | None  # None when skipped
    # `qa_cost`: held-out multiple-choice accuracy without and with capping; counts, intervals and the validity flag
    qa_accuracy: dict[str, Any]  # ({} when skipped)
    perplexity: dict[str, Any]  # `perplexity_cost`: counts, perplexities and the change ({} when skipped)
    metrics: dict[str, Any]  # metrics.json: JSON values of every kind, by key


def run(cfg: Config, model, progress=None) -> Result:
    """Thresholds, capped vs uncapped evaluation, role-play drift and the perplexity cost. No files."""
    from psm_jax.persona import datasets

    t0 = time.time()
    progress = progress is not None  # below: whether to show progress bars
    mc = model.config
    layers, readout = capped_layers(cfg, mc)
    axis, axis_info = load_axis(cfg, model)

    # ---- thresholds from default rollouts, and the cap
    th = threshold_step(cfg, model, axis, layers, progress)
    cap_fn = make_edits_fn(capping_edit(mc, axis, layers, th.thresholds, form=cfg.form), cfg.positions)

    # ---- role-inducing system prompts
    eval_roles, instr = held_out_roles(cfg, axis_info)
    probes = datasets.load_identity_probes()
    answers = identity_answers(cfg, model, instr, list(probes.questions[:cfg.n_identity_probes]), cap_fn, progress)
    kw_rate = {k: keyword_rate(probes, v) for k, v in answers.answers.items()}
    proj_layers = projections_by_layer(cfg, model, axis, answers.answers, cap_fn, progress)
    identity = identity_logodds(cfg, model, probes, eval_roles, instr, cap_fn)
    traits = trait_behaviour(cfg, model, instr, cap_fn)

    # ---- long role-play conversations, persona jailbreaks, capability costs
    rpl = roleplay_step(cfg, model, axis, readout, probes, cap_fn, progress) if cfg.roleplay else RolePlay()
    jb = jailbreak_step(cfg, model, layers, th.rollouts, cap_fn)
    qa = qa_step(cfg, model, cap_fn)
    ppl = perplexity_cost(cfg, model, cap_fn, progress)

    m = metrics(cfg, layers=layers, readout=readout, axis_info=axis_info, th=th, eval_roles=eval_roles,
                identity=identity, kw_rate=kw_rate, proj_layers=proj_layers, rpl=rpl, traits=traits, jb=jb, qa=qa,
                ppl=ppl)
    m["elapsed_s"] = round(time.time() - t0, 1)

    return Result(config=cfg, n_layers=mc.n_layers, capped_layers=layers, readout_layer=readout, axis=axis,
                  axis_info=axis_info, thresholds=th, eval_roles=eval_roles, identity_probes=probes,
                  identity_answers=answers, identity_keyword_rate=kw_rate, answer_projections=proj_layers,
                  traits=traits, roleplay=rpl, jailbreaks=jb, qa_accuracy=qa, perplexity=ppl, metrics=m)
