"""The study's metrics (metrics.json, the record lines), one group per step's outputs: counts, the whole role set's
persona space, the responses, the response filters, each role set's carrying component and the diagnostics (carrier
by layer, split-half); the pipeline joins them in that order. Parts skipped by the config leave their keys out."""
from __future__ import annotations

import numpy as np

from experiments.assistant_axis.config import Config
from experiments.assistant_axis.result import AxisResult, drift_ref
from experiments.assistant_axis.rollouts import Prompts
from experiments.assistant_axis.space import carrier_by_layer
from experiments.assistant_axis.vectors import Vectors
from psm_jax.persona.directions import unit


def space_metrics(res: AxisResult, vv: Vectors, cosines, n_pcs_by_layer, space_ci) -> dict:
    """The whole role set's persona-space figures: PCs for the variance fraction, cosines and percentiles per PC."""
    space, axis = res.space, res.axis
    u_t = unit(axis[res.target_layer])
    ref = drift_ref(res)
    m = {
        "persona_space_pcs_for_70pct": int(space["n_pcs"]),
        "explained_ratio": [float(x) for x in space["explained_ratio"]],
        "pc1_explained": float(space["explained_ratio"][0]),
        "axis_pc1_cosine": float(space["axis_pc1_cosine"]),
        "axis_pc1_cosine_by_layer": [float(x) for x in cosines],
        "axis_pc1_cosine_max": float(cosines.max()), "axis_pc1_cosine_argmax_layer": int(cosines.argmax()),
        "pcs_for_fraction_by_layer": n_pcs_by_layer,
        "default_pc1_score": space["default_score"],
        "default_beyond_all_roles_on_pc1": space["default_beyond_all_roles"],
        "default_fraction_roles_below_on_pc1": space["default_fraction_roles_below"],
        "default_percentile_by_pc": space["pc_percentiles"],
        "axis_cosine_by_pc": space["pc_cosines"],
        "axis_top3_cosine": space["top3_cosine"],
        **({"default_percentile_ci_by_pc": space_ci["pc_percentile_ci"],
            "axis_abs_cosine_ci_by_pc": space_ci["pc_abs_cosine_ci"]} if space_ci else {}),
        "axis_norm_by_layer": [float(x) for x in np.linalg.norm(axis, axis=-1)],
        "default_axis_projection": ref["default"], "mean_role_axis_projection": ref["roles"],
        "roles_below_default_on_axis": float(np.mean(vv.role_vecs[:, res.target_layer] @ u_t < ref["default"])),
    }
    if "assistant_role_score" in space:
        m["assistant_role_pc1_score"] = space["assistant_role_score"]
        m["assistant_role_axis_projection"] = float(vv.assistant_vec[res.target_layer] @ u_t)
    return m


def subset_metrics(subsets: dict) -> dict:
    """Per role set: which PC carries the Assistant, and (beyond the whole set) its own percentiles and cosines."""
    m = {}
    for name, sub in subsets.items():
        m[f"carrier_{name}"] = {k: v for k, v in sub.items() if k not in ("space", "ci")}
        m[f"carrier_{name}"]["pc"] = f"PC{sub['carrier'] + 1}"
        if name != "all":
            m[f"{name}_percentile_by_pc"] = sub["space"]["pc_percentiles"]
            m[f"{name}_cosine_by_pc"] = sub["space"]["pc_cosines"]
            m[f"{name}_top3_cosine"] = sub["space"]["top3_cosine"]
            m[f"{name}_n_pcs_for_fraction"] = int(sub["space"]["n_pcs"])
            if sub["ci"]:
                m[f"{name}_percentile_ci_by_pc"] = sub["ci"]["pc_percentile_ci"]
                m[f"{name}_abs_cosine_ci_by_pc"] = sub["ci"]["pc_abs_cosine_ci"]
    return m


def count_metrics(pr: Prompts, vv: Vectors, keep, target: int, n_layers: int) -> dict:
    """How many roles and responses the vectors stand on, and which roles were dropped."""
    return {"n_roles": len(vv.kept_roles), "n_role_responses": int(keep.sum()),
            "n_default_responses": int(vv.default_kept.sum()),
            "dropped_roles": [r.name for r, o in zip(pr.roles, vv.ok) if not o], "target_layer": target,
            "n_layers": n_layers}


def response_metrics(rolls, ntok) -> dict:
    """The sampled responses' mean length in assistant tokens (non-empty ones) and the share that ended with EOS."""
    return {"mean_response_tokens": float(ntok[ntok > 0].mean()),
            "finished_fraction": float(np.mean([r.finished for r in rolls]))}


def filter_metrics(cfg: Config, filtered, n_generated: int) -> dict:
    """What the response filters kept (`filtered`: `response_filter`'s keep, adherence summary and judge summary):
    the judge's check and share when it ran, the adherence filter's summary without its per-response scores."""
    keep, adherence, judge = filtered
    m = {}
    if judge is not None:
        m["judge_kept_fraction"] = float(keep.mean())
        m.update(judge)
    m["adherence"] = cfg.adherence
    m.update({k: v for k, v in adherence.items() if k != "adherence_scores"})
    m["n_role_responses_generated"] = n_generated
    return m


def diagnostic_metrics(cfg: Config, vv: Vectors, human: list[int], halves, n_layers: int) -> dict:
    """The human archetypes' names and why the target is or is not met: the carrier at every layer, and the
    split-half over questions where there was one."""
    m = {"human_roles": [vv.kept_roles[i].name for i in human],
         "carrier_by_layer": carrier_by_layer(vv.role_vecs, vv.default_vec, cfg.variance_fraction, cfg.seed,
                                              range(n_layers))}
    if halves is not None:
        m["split_half"] = halves
    return m
