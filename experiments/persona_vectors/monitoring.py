"""Step 5 and the monitoring of step 6b: projections onto a trait's vector against its behavioural measure across
graded system prompts, at the steering layer, at the layer the extraction data fix, and on the held-out graded
prompts; and the same monitoring for a saved vector, so a finished report can be re-analysed."""
from __future__ import annotations

import numpy as np

from experiments.persona_vectors.behaviour import reference_units
from experiments.persona_vectors.config import Config
from experiments.persona_vectors.extraction import greedy_rollouts
from experiments.persona_vectors.trait_result import (GradedMonitoring, HoldoutMonitoring, MonitorStatistics,
                                                      ReferenceAnswer, RuleMonitoring)
from psm_jax.persona import monitoring, rollouts
from psm_jax.persona.directions import SITE
from psm_jax.persona.extraction import rule_layer
from psm_jax.persona.prompts import system_conv
from psm_jax.persona.stats import pearson, within_groups_r


def graded_monitoring(mon_acts, direction, layer: int, systems, behaviour, n_questions: int) -> GradedMonitoring:
    """Step 5: projection vs the items' behavioural measure across the system prompts, and the separation of the
    pos vs neg projections at every layer (`monitoring.separation_by_layer`)."""
    p_last, p_resp = monitoring.prompt_projections(mon_acts, direction, layer, len(systems))
    kind_arr = monitoring.validity_kinds(systems)
    return {"layer": layer, "systems": [{"kind": s.kind, "index": s.pair, "system": s.system, "level": s.level}
                                        for s in systems],
            "behaviour": behaviour, "proj_last_prompt": p_last, "proj_response": p_resp,
            "r_last_prompt": pearson(p_last, behaviour), "r_response": pearson(p_resp, behaviour),
            "n_questions": n_questions,
            "system_prompt_effect": float(behaviour[kind_arr == "pos"].mean() - behaviour[kind_arr == "neg"].mean()),
            "separation_by_layer": monitoring.separation_by_layer(mon_acts, direction, systems)}


def rule_monitoring(per_unit, systems, mon_acts, direction, separations, seed: int) -> RuleMonitoring | None:
    """Monitoring at the layer the extraction-data rule fixes (`crossfit_separation`, `rule_layer`): the same
    statistics as at the steering layer. None when the rule has no layer."""
    layer = rule_layer(separations)
    if layer is None:
        return None
    mon = monitoring.monitor_at_layer(per_unit, systems, mon_acts, direction, layer, seed)
    keep = ("r_last_prompt", "r_response", "monitor_within_polarity", "monitor_within_null", "within_reliability",
            "proj_last_prompt")
    return {"layer": layer, "separation": np.asarray(separations), **{k: mon[k] for k in keep}}


def holdout_monitoring(model, trait, cfg: Config, held: list[ReferenceAnswer], direction, layers: dict, *,
                       progress: bool = False) -> HoldoutMonitoring | None:
    """Monitoring on the trait's held-out graded prompts (`monitor_holdout`), at layers fixed before any of them was
    run ({name: layer}; None skips a name): greedy answers to the monitoring questions under each prompt, the
    response measure per prompt on every held-out unit, the same statistics as the main monitoring, and a check
    that the prompts grade the measure (r of the prompts' stated level with it, overall and within polarity).
    None when the trait has no such prompts."""
    systems = monitoring.holdout_prompts(trait)
    if not systems:
        return None
    questions = list(trait.evaluation_questions[:cfg.n_monitor_questions])
    rolls = rollouts.generate_responses(model, [system_conv(s.system, q) for s in systems for q in questions],
                                        max_new_tokens=cfg.monitor_max_new_tokens, temperature=0.0,
                                        batch_size=cfg.batch_size, progress=progress)
    acts = rollouts.activation_means(model, [r.conversation() for r in rolls], site=SITE, batch_size=cfg.batch_size)
    per_unit, _ = monitoring.measure_per_prompt(model, held, systems, cfg.batch_size)
    m_sys = monitoring.prompt_means(per_unit)
    kinds, levels = monitoring.polarity_kinds(systems), np.asarray([s.level for s in systems], float)
    out = {"systems": [{"kind": s.kind, "level": s.level, "system": s.system} for s in systems],
           "system_measure": m_sys, "n_questions": len(questions),
           "level_check": within_groups_r(levels, m_sys, kinds, seed=cfg.seed,
                                          n_resamples=monitoring.WITHIN_RESAMPLES),
           "within_r_by_layer": monitoring.within_r_by_layer(acts, direction, m_sys, kinds)}
    keep = ("r_last_prompt", "monitor_within_polarity", "monitor_within_null", "within_reliability", "proj_last_prompt")
    for name, layer in layers.items():
        if layer is not None:
            mon = monitoring.monitor_at_layer(per_unit, systems, acts, direction, layer, cfg.seed)
            out[name] = {"layer": int(layer), **{k: mon[k] for k in keep}}
    return out


def monitoring_from_vectors(model, trait, cfg: Config, direction, layers: dict[str, int], *,
                            progress: bool = False) -> dict[str, MonitorStatistics]:
    """The main monitoring with the response measure ({name: layer} -> `monitoring.monitor_statistics`) for a saved
    direction [n_layers, d]: the greedy answers, held-out reference units and per-prompt measure are those that
    `run_trait` computes (all greedy, so the same for the same config and model), so a finished report can be
    re-analysed without sampling its vectors again."""
    greedy = greedy_rollouts(model, trait, cfg, progress)
    systems = greedy["systems"]
    mon_acts = rollouts.activation_means(model, [r.conversation() for r in greedy["mon_rolls"]], site=SITE,
                                         batch_size=cfg.batch_size)
    held = reference_units(model, trait, cfg, progress)[2]
    per_unit, _ = monitoring.measure_per_prompt(model, held, systems, cfg.batch_size)
    return {name: monitoring.monitor_at_layer(per_unit, systems, mon_acts, direction, layer, cfg.seed)
            for name, layer in layers.items()}
