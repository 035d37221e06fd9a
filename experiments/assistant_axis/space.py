"""The Assistant Axis and persona space. axis[l] = default[l] - mean_r(role_r[l]) (unnormalised, toward the
Assistant); persona space at a layer is the PCA of the mean-centred role vectors, PC signs oriented so that the
default Assistant scores positive. Its summary names the component that carries the Assistant (the top-3 PC most
aligned with the axis), the default's percentile among the roles on it and the axis cosine, with bootstrap
intervals over roles where there are enough roles, against the target (beyond 95% of roles, |cos| > 0.6)."""
from __future__ import annotations

import numpy as np

from experiments.assistant_axis.config import Config
from experiments.assistant_axis.vectors import Vectors
from psm_jax.persona.directions import (MIN_BOOTSTRAP_ROLES, axis_from_vectors, axis_pc1_cosines, persona_space,
                                        persona_space_intervals, unit)
from psm_jax.reductions import components_for_variance, pca


def axis_and_space(cfg: Config, vv: Vectors, target: int, n_layers: int):
    """The axis at every layer, persona space at the target layer (with the "assistant" role's PC1 score when it
    was sampled), |cos(axis, PC1)| and the PCs for the variance fraction at every layer. Returns (axis [L, D],
    space, cosines [L], PCs by layer)."""
    axis = axis_from_vectors(vv.default_vec, vv.role_vecs)
    space = persona_space(vv.role_vecs[:, target], vv.default_vec[target], axis[target], cfg.variance_fraction)
    if vv.assistant_vec is not None:
        space["assistant_role_score"] = float((vv.assistant_vec[target] - space["mean"]) @ space["pc1"])
    cosines = axis_pc1_cosines(vv.role_vecs, axis)
    n_pcs_by_layer = [components_for_variance(pca(vv.role_vecs[:, layer])["explained_ratio"], cfg.variance_fraction)
                      for layer in range(n_layers)]
    return axis, space, cosines, n_pcs_by_layer


def _target_met(percentile, cosine) -> bool:
    """The paper's picture at one component: the default beyond 95% of the roles on it, and |cos(axis, PC)| > 0.6."""
    return bool(percentile > 0.95 and abs(cosine) > 0.6)


def space_summary(role_vecs_l, default_l, fraction: float, seed: int) -> dict:
    """Persona space of one role set at one layer with its own axis, bootstrap intervals over roles when there are
    enough, and the component that carries the Assistant (`carrier`: among the top 3, the most axis-aligned)."""
    axis_l = axis_from_vectors(default_l, role_vecs_l)
    space = persona_space(role_vecs_l, default_l, axis_l, fraction)
    ci = (persona_space_intervals(role_vecs_l, default_l, axis_l, seed=seed)
          if len(role_vecs_l) >= MIN_BOOTSTRAP_ROLES else None)
    k = int(np.argmax(np.abs(space["pc_cosines"][:3])))
    u = unit(axis_l)
    below_on_axis = float(np.mean(np.asarray(role_vecs_l, np.float64) @ u < np.asarray(default_l, np.float64) @ u))
    return {"space": space, "ci": ci, "carrier": k, "n_roles": len(role_vecs_l), "top3_cosine": space["top3_cosine"],
            "roles_below_default_on_axis": below_on_axis,
            "percentile": space["pc_percentiles"][k], "cosine": space["pc_cosines"][k],
            "percentile_ci": ci["pc_percentile_ci"][k] if ci else None,
            "abs_cosine_ci": ci["pc_abs_cosine_ci"][k] if ci else None,
            "target_met": _target_met(space["pc_percentiles"][k], space["pc_cosines"][k]),
            "any_top3_met": bool(any(_target_met(p, c) for p, c in
                                     zip(space["pc_percentiles"][:3], space["pc_cosines"][:3])))}


def carrier_by_layer(role_vecs, default_vec, fraction: float, seed: int, layers) -> list[dict]:
    """The carrier summary (no intervals) at each of `layers`: where along depth the Assistant separates."""
    out = []
    for layer in layers:
        axis_l = axis_from_vectors(default_vec[layer], role_vecs[:, layer])
        sp = persona_space(role_vecs[:, layer], default_vec[layer], axis_l, fraction)
        k = int(np.argmax(np.abs(sp["pc_cosines"][:3])))
        out.append({"layer": int(layer), "pc": f"PC{k + 1}", "percentile": sp["pc_percentiles"][k],
                    "cosine": sp["pc_cosines"][k], "top3_cosine": sp["top3_cosine"],
                    "target_met": _target_met(sp["pc_percentiles"][k], sp["pc_cosines"][k])})
    return out
