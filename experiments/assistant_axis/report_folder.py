"""The Assistant Axis report folder: report.md with its sections, tables and plots, metrics.json, config.json, the
axis and the role vectors, all read from a finished `AxisResult` (`pipeline.run`), so that the computation never
writes and the writing never computes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.assistant_axis.report_figures import plots
from experiments.assistant_axis.report_text import (component_text, drift_notes, interval, reading_text, setup_text,
                                                    split_half_text)
from experiments.assistant_axis.result import AxisResult, drift_ref
from psm_jax.persona.directions import SITE, unit


def write_report(res: AxisResult, folder) -> Path:
    """report.md with its tables and plots, axis.safetensors and role_vectors.safetensors, the metrics."""
    from experiments.report import Report

    cfg, m = res.config, res.metrics
    rep = Report(folder, "Assistant Axis and persona space", config=cfg)
    rep.section("Setup", setup_text(res))
    _component_sections(rep, res)
    _diagnostic_sections(rep, m, res.target_layer)
    rep.section("Reading", reading_text(res))
    plots(rep, res, res.drift, m["n_layers"])
    rep.table("PC1 loadings: top and bottom roles", _loading_rows(res))
    rep.table("By category", _category_rows(res))
    rep.table("Axis-PC1 cosine and PCs for the variance fraction, by layer", _layer_rows(res))
    if res.drift_rows:
        rep.table("Multi-turn drift (projection on the unit axis, target layer)", res.drift_rows)
        rep.section("Drift notes", drift_notes(cfg))
    rep.table("Example responses", res.examples)
    _save_vectors(rep, res)
    for key, val in m.items():
        rep.metric(key, val)
    return rep.finish()


def _component_sections(rep, res: AxisResult) -> None:
    """The persona space at the target layer, which PC carries the Assistant (all roles and the human
    archetypes, with bootstrap intervals over roles), against the target."""
    cfg, m, space, target = res.config, res.metrics, res.space, res.target_layer
    rep.table("Persona space (target layer)", [{
        "layer": target, "roles": m["n_roles"], f"PCs for {cfg.variance_fraction:.0%}": int(space["n_pcs"]),
        "PC1 var": float(space["explained_ratio"][0]), "PC2 var": float(space["explained_ratio"][1])
        if len(space["explained_ratio"]) > 1 else float("nan"),
        "|cos(axis, PC1)|": float(space["axis_pc1_cosine"]),
        "default on PC1": space["default_score"],
        "roles below default on PC1": f"{space['default_fraction_roles_below']:.0%}",
    }])
    ci = m.get("default_percentile_ci_by_pc"), m.get("axis_abs_cosine_ci_by_pc")
    rep.table("Which component carries the Assistant (target layer; 95% bootstrap intervals over roles)", [
        {"PC": f"PC{k + 1}", "variance": float(space["explained_ratio"][k]), "cos(axis, PC)": cos,
         "|cos| 95% CI": interval(ci[1], k), "roles below the default": pct, "percentile 95% CI": interval(ci[0], k)}
        for k, (cos, pct) in enumerate(zip(space["pc_cosines"], space["pc_percentiles"]))])
    rep.section("The Assistant's component against the target", component_text(res))
    if "human_percentile_by_pc" in m:
        hci = m.get("human_percentile_ci_by_pc"), m.get("human_abs_cosine_ci_by_pc")
        rep.table("Human-archetype subset: components (own axis; 95% bootstrap intervals over roles)", [
            {"PC": f"PC{k + 1}", "cos(axis, PC)": cos, "|cos| 95% CI": interval(hci[1], k),
             "roles below the default": pct, "percentile 95% CI": interval(hci[0], k)}
            for k, (cos, pct) in enumerate(zip(m["human_cosine_by_pc"], m["human_percentile_by_pc"]))])


def _diagnostic_sections(rep, m: dict, target: int) -> None:
    """Why the target is or is not met: sampling noise in the role vectors (split-half) and depth (by layer)."""
    sh = m.get("split_half")
    if sh and sh["reliability"] is not None:
        rep.section("Sampling noise in the role vectors (split-half over questions)", split_half_text(sh, target))
    rows = m.get("carrier_by_layer") or []
    if rows:
        rep.table("The carrying component by layer (no intervals; the target layer is the headline)", [
            {"layer": r["layer"], "carrier": r["pc"], "roles below the default": r["percentile"],
             "|cos(axis, PC)|": abs(r["cosine"]), "|axis| in top-3 span": r["top3_cosine"],
             "target met": "yes" if r["target_met"] else "no"} for r in rows])


def _loading_rows(res: AxisResult) -> list[dict]:
    """The most and least Assistant-like roles by PC1 score, side by side."""
    space = res.space
    order = np.argsort(space["scores"])
    k = min(8, len(order) // 2)
    rows = []
    for i in range(k):
        lo, hi = order[i], order[-1 - i]
        rows.append({"rank": i + 1, "most Assistant-like (top)": f"{res.role_names[hi]} ({space['scores'][hi]:.2f})",
                     "least (bottom)": f"{res.role_names[lo]} ({space['scores'][lo]:.2f})"})
    return rows


def _category_rows(res: AxisResult) -> list[dict]:
    """Mean PC1 score and axis projection per role category, the default Assistant and the 'assistant' role."""
    m, space, target = res.metrics, res.space, res.target_layer
    role_proj, ref = res.role_vectors[:, target] @ unit(res.axis[target]), drift_ref(res)
    cat_rows = []
    for c in sorted(set(res.role_categories)):
        idx = [i for i, rc in enumerate(res.role_categories) if rc == c]
        cat_rows.append({"category": c, "roles": len(idx), "mean PC1 score": float(np.mean(space["scores"][idx])),
                         "mean axis projection": float(np.mean(role_proj[idx]))})
    cat_rows.append({"category": "(default Assistant)", "roles": 0, "mean PC1 score": space["default_score"],
                     "mean axis projection": ref["default"]})
    if "assistant_role_score" in space:
        cat_rows.append({"category": "('assistant' role)", "roles": 1, "mean PC1 score": space["assistant_role_score"],
                         "mean axis projection": m["assistant_role_axis_projection"]})
    return cat_rows


def _layer_rows(res: AxisResult) -> list[dict]:
    """About ten layers (and the last): |cos(axis, PC1)|, PCs for the variance fraction, |axis|."""
    m, cosines, L = res.metrics, res.cosines, res.metrics["n_layers"]
    return ([{"layer": layer, "|cos|": float(cosines[layer]), "PCs": m["pcs_for_fraction_by_layer"][layer],
              "|axis|": m["axis_norm_by_layer"][layer]} for layer in range(0, L, max(1, L // 10))] +
            ([{"layer": L - 1, "|cos|": float(cosines[-1]), "PCs": m["pcs_for_fraction_by_layer"][-1],
               "|axis|": m["axis_norm_by_layer"][-1]}] if (L - 1) % max(1, L // 10) else []))


def _save_vectors(rep, res: AxisResult) -> None:
    """axis.safetensors (every layer) and role_vectors.safetensors, with what they are in their metadata."""
    cfg, m = res.config, res.metrics
    meta = {"model": cfg.model, "site": SITE, "layers": "all", "n_layers": m["n_layers"], "d_model": res.d_model,
            "target_layer": res.target_layer,
            "method": "assistant_axis: mean(default response means) - mean(role vectors)",
            "normalised": False, "n_roles": m["n_roles"], "seed": cfg.seed}
    rep.save_vectors("axis", {"axis": res.axis}, meta)
    assistant = {} if res.assistant_vector is None else {"assistant_role_vector": res.assistant_vector}
    rep.save_vectors("role_vectors", {"role_vectors": res.role_vectors, "default_vector": res.default_vector,
                                      **assistant},
                     {**meta, "method": "role vectors: mean over responses of assistant-content-token means",
                      "role_names": res.role_names, "role_categories": res.role_categories})

