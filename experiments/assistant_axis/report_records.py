"""The Assistant Axis study's lines for benchmarks/results.jsonl: PCs for 70% of the variance, and per top PC the
default Assistant's percentile among the roles and the axis cosine, each with its interval over roles and its null.
A run restricted to some role categories keys its lines by them and records the whole set only."""
from __future__ import annotations

from experiments.assistant_axis.result import AxisResult
from psm_jax.persona.directions import random_cosine_band


def _role_sets(m: dict, restricted: str) -> list[tuple]:
    """The role sets with record lines: (analysis, role set name, key prefix, percentiles, cosines, their intervals,
    roles). The whole set always; the human archetypes where analysed, unless the run is restricted."""
    sets = [("all", restricted or "all", f"{restricted}/" if restricted else "", m["default_percentile_by_pc"],
             m["axis_cosine_by_pc"], m.get("default_percentile_ci_by_pc"), m.get("axis_abs_cosine_ci_by_pc"),
             m["n_roles"])]
    if "human_percentile_by_pc" in m and not restricted:
        sets.append(("human", "human", "human/", m["human_percentile_by_pc"], m["human_cosine_by_pc"],
                     m.get("human_percentile_ci_by_pc"), m.get("human_abs_cosine_ci_by_pc"),
                     m["carrier_human"]["n_roles"]))
    return sets


def _pc_lines(res: AxisResult, ref: str, role_set_row: tuple, cos_null: float) -> list[dict]:
    """Per PC of one role set: the default Assistant's percentile and the axis cosine, marked where the PC carries
    the Assistant."""
    analysis, role_set, prefix, pcts, coss, pct_ci, cos_ci, n = role_set_row
    carrier = res.metrics[f"carrier_{analysis}"]["pc"]
    out = []
    for k, (pct, cos) in enumerate(zip(pcts, coss)):
        pc = f"PC{k + 1}"
        extra = dict(pc=pc, key=prefix + pc, role_set=role_set, n_roles=n, carrier=pc == carrier)
        out.append(dict(metric="axis_assistant_pc_percentile", value=round(pct, 4), unit="fraction of roles below",
                        reference=ref + f"; role set {role_set} ({n} roles)", target="> 0.95 on one of the top-3 PCs",
                        null="the default exchangeable with the roles: percentile uniform, above 0.95 in 5% of "
                             "draws",
                        **extra, **({"ci": [round(x, 4) for x in pct_ci[k]]} if pct_ci and k < len(pct_ci) else {})))
        out.append(dict(metric="axis_assistant_pc_cosine", value=round(cos, 4), unit="cosine",
                        reference=ref + f"; role set {role_set} ({n} roles)",
                        target="|cos| > 0.6 for that PC (Lu et al. 2026: > 0.71 with PC1)",
                        null=f"random directions in {res.d_model} dimensions: |cos| below {cos_null:.3f} in 95%",
                        **extra, **({"ci": [round(x, 4) for x in cos_ci[k]], "ci_of": "|cos|"}
                                    if cos_ci and k < len(cos_ci) else {})))
    return out


def result_records(res: AxisResult) -> list[dict]:
    """Headline lines: PCs for 70% variance, and per top PC the default Assistant's percentile and the axis cosine,
    each with its interval over roles and its null."""
    m, cfg = res.metrics, res.config
    ref = f"{cfg.model}; {m['n_roles']} roles, layer {m['target_layer']}, seed {cfg.seed}"
    restricted = "+".join(cfg.role_categories)  # a run over some categories keys its lines by them
    out = [dict(metric="persona_space_pcs_for_70pct", value=int(m["persona_space_pcs_for_70pct"]), unit="PCs",
                reference=ref + "; Lu et al. 2026: 4 / 8 / 19 (Gemma 2 27B / Qwen 3 32B / Llama 3.3 70B; 275 roles)",
                target=None, n_roles=m["n_roles"], layer=m["target_layer"], model=cfg.model,
                null="none: descriptive (compared with the papers' counts)",
                **({"key": restricted, "role_set": restricted} if restricted else {}))]
    cos_null = random_cosine_band(res.d_model, seed=cfg.seed)
    for row in _role_sets(m, restricted):
        out += _pc_lines(res, ref, row, cos_null)
    return out
