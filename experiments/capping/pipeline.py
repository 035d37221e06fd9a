"""The study's computation: the cap (axis, layers, thresholds), then every evaluation of the package doc with and
without it, gathered into the metrics (`run`). No files, no printing."""
from __future__ import annotations

import dataclasses
import time
from typing import Any

from experiments.capping.behaviour import trait_behaviour
from experiments.capping.capability import perplexity_cost, qa_step
from experiments.capping.config import Config
from experiments.capping.identity import (held_out_roles, identity_answers, identity_logodds, keyword_rate,
                                          projections_by_layer)
from experiments.capping.jailbreak import jailbreak_step
from experiments.capping.roleplay import RolePlay, roleplay_step
from experiments.capping.summary import metrics
from experiments.capping.thresholds import capped_layers, load_axis, threshold_step
from psm_jax.persona.capping import capping_edit, make_edits_fn


@dataclasses.dataclass
class Result:
    """What the report shows (named as in `run`): thresholds, the evaluation under role prompts with and without
    capping, the role-play conversations, the perplexity cost, and the metrics `m`."""

    config: Config
    L: Any
    axis: Any
    axis_info: Any
    d_cap: Any
    d_plain: Any
    end_cap: Any
    end_convs: Any
    end_plain: Any
    eval_roles: Any
    floors: Any
    frac_below: Any
    gain: Any
    gen_out: Any
    gen_probes: Any
    kw_rate: Any
    layers: Any
    m: Any
    ppl: Any
    probes: Any
    proj_layers: Any
    readout: Any
    role_gen: Any
    rp: Any
    rp_kw: Any
    rp_rows: Any
    tconvs: Any
    trait_rows: Any
    jb: Any = None  # run_jailbreaks(...) or {}
    qa: Any = None  # qa_cost(...) or {}


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
    gen_probes = list(probes.questions[:cfg.n_identity_probes])
    role_gen, gen_out = identity_answers(cfg, model, instr, gen_probes, cap_fn, progress)
    kw_rate = {k: keyword_rate(probes, v) for k, v in gen_out.items()}
    proj_layers = projections_by_layer(cfg, model, axis, gen_out, cap_fn, progress)
    identity = identity_logodds(cfg, model, probes, eval_roles, instr, cap_fn)
    trait_rows, trait_dist = trait_behaviour(cfg, model, instr, cap_fn)

    # ---- long role-play conversations, persona jailbreaks, capability costs
    rpl = roleplay_step(cfg, model, axis, readout, probes, cap_fn, progress) if cfg.roleplay else RolePlay()
    jb = jailbreak_step(cfg, model, layers, th.rollouts, cap_fn)
    qa = qa_step(cfg, model, cap_fn)
    ppl = perplexity_cost(cfg, model, cap_fn, progress)

    m = metrics(cfg, layers=layers, readout=readout, axis_info=axis_info, th=th, eval_roles=eval_roles,
                identity=identity, kw_rate=kw_rate, proj_layers=proj_layers, rpl=rpl,
                traits=(trait_rows, trait_dist), jb=jb, qa=qa, ppl=ppl)
    m["elapsed_s"] = round(time.time() - t0, 1)

    return Result(config=cfg, L=mc.n_layers, axis=axis, axis_info=axis_info, d_cap=rpl.drift_capped,
                  d_plain=rpl.drift_plain, end_cap=rpl.end_cap, end_convs=rpl.end_convs, end_plain=rpl.end_plain,
                  eval_roles=eval_roles, floors=th.floors, frac_below=th.frac_below,
                  gain=m["capping_identity_gain"], gen_out=gen_out, gen_probes=gen_probes, kw_rate=kw_rate,
                  layers=layers, m=m, ppl=ppl, probes=probes, proj_layers=proj_layers, readout=readout,
                  role_gen=role_gen, rp=rpl.conversations, rp_kw=rpl.keyword_rate, rp_rows=rpl.rows,
                  tconvs=th.convs, trait_rows=trait_rows, jb=jb, qa=qa)
