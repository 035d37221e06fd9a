"""The Assistant Axis study's report folder and its lines for benchmarks/results.jsonl: the text is read from the
numbers (`experiments.assistant_axis` computes them; this module only writes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.assistant_axis import ASSISTANT_SYSTEM, AxisResult, Config, drift_ref
from psm_jax.persona.directions import MIN_BOOTSTRAP_ROLES, SITE, random_cosine_band, unit


def _plots(rep, res: AxisResult, drift: dict, n_layers: int):
    """The report's figures: persona space's variance, the axis-PC1 cosine by layer, role loadings, drift."""
    from experiments.report import pyplot

    plt = pyplot()
    _variance_figure(rep, plt, res)
    _pc1_cosine_figure(rep, plt, res, n_layers)
    _loadings_figure(rep, plt, res)
    if drift:
        _drift_figure(rep, plt, res, drift)


def _variance_figure(rep, plt, res: AxisResult) -> None:
    sp = res.space
    ratio = np.asarray(sp["explained_ratio"])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    k = np.arange(1, len(ratio) + 1)
    ax.bar(k, ratio, color="#9bb", label="per PC")
    ax.plot(k, np.cumsum(ratio), "o-", ms=3, color="#155", label="cumulative")
    ax.axhline(res.config.variance_fraction, ls="--", color="gray", lw=1)
    ax.axvline(sp["n_pcs"], ls=":", color="C3", lw=1,
               label=f"{sp['n_pcs']} PCs reach {res.config.variance_fraction:.0%}")
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance ratio")
    ax.set_title(f"Persona space, layer {res.target_layer} ({len(res.role_names)} roles)")
    ax.legend(fontsize=8)
    rep.figure("variance_explained", fig, "Variance explained by the PCs of the mean-centred role vectors.")


def _pc1_cosine_figure(rep, plt, res: AxisResult, n_layers: int) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(np.arange(n_layers), res.cosines, "o-", ms=3)
    ax.axvline(res.target_layer, ls=":", color="gray")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("layer (resid_post)")
    ax.set_ylabel("|cos(axis, PC1)|")
    ax.set_title("Assistant Axis vs PC1 of persona space")
    rep.figure("axis_pc1_cosine", fig, "Cosine between the Assistant Axis and PC1 at every layer.")


def _loadings_figure(rep, plt, res: AxisResult) -> None:
    """Every role's PC1 score as a bar coloured by its category, with the default Assistant's projection."""
    sp = res.space
    scores = np.asarray(sp["scores"])
    order = np.argsort(scores)
    cats = sorted(set(res.role_categories))
    colours = {c: plt.cm.tab10(i % 10) for i, c in enumerate(cats)}
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.16 * len(order) + 1)))
    ax.barh(np.arange(len(order)), scores[order], color=[colours[res.role_categories[i]] for i in order])
    ax.set_yticks(np.arange(len(order)))
    ax.set_yticklabels([res.role_names[i] for i in order], fontsize=6)
    ax.axvline(sp["default_score"], color="k", ls="--", lw=1.2, label="default Assistant")
    if "assistant_role_score" in sp:
        ax.axvline(sp["assistant_role_score"], color="C3", ls=":", lw=1.2, label="'assistant' role")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[c]) for c in cats]
    ax.legend(handles + ax.get_legend_handles_labels()[0], cats + ax.get_legend_handles_labels()[1], fontsize=6,
              loc="lower right")
    ax.set_xlabel("PC1 score (oriented toward the default Assistant)")
    ax.set_title(f"PC1 loadings, layer {res.target_layer}")
    rep.figure("pc1_loadings", fig, "Role scores on PC1; dashed line: the default Assistant's projection.")


def _drift_figure(rep, plt, res: AxisResult, drift: dict) -> None:
    """Per assistant turn, each drift condition's mean projection on the unit axis with its s.e.m. band."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, (proj, _) in drift.items():
        p = proj[:, 0, :]
        mean = np.nanmean(p, axis=0)
        cnt = np.sum(~np.isnan(p), axis=0)
        sem = np.nanstd(p, axis=0) / np.sqrt(np.maximum(cnt, 1))
        x = np.arange(1, p.shape[1] + 1)
        ax.plot(x, mean, "o-", ms=3, label=f"{name} (n={p.shape[0]})")
        ax.fill_between(x, mean - sem, mean + sem, alpha=0.2)
    ax.axhline(drift_ref(res)["default"], color="k", ls="--", lw=1, label="default vector")
    ax.axhline(drift_ref(res)["roles"], color="gray", ls=":", lw=1, label="mean role vector")
    ax.set_xlabel("assistant turn")
    ax.set_ylabel(f"projection on unit axis (layer {res.target_layer})")
    ax.set_title("Multi-turn drift (teacher-forced)")
    ax.legend(fontsize=7)
    rep.figure("drift", fig, "Per-turn mean assistant-token projection on the unit Assistant Axis (mean ± s.e.m.).")


def _diagnostic_sections(rep, m: dict, target: int) -> None:
    """Why the target is or is not met: sampling noise in the role vectors (split-half) and depth (by layer)."""
    sh = m.get("split_half")
    if sh and sh["reliability"] is not None:
        halves = "; ".join(f"half {i + 1}: {h['pc']}, above {h['percentile']:.0%} of roles, |cos| "
                           f"{abs(h['cosine']):.2f}" for i, h in enumerate(sh["halves"]))
        rep.section("Sampling noise in the role vectors (split-half over questions)", f"""
Role vectors rebuilt from the even-indexed and from the odd-indexed questions ({sh['n_roles']} roles, layer
{target}): the two halves' mean-centred role vectors correlate at r = {sh['half_correlation']:.2f}, a split-half
reliability (Spearman-Brown) of {sh['reliability']:.2f} for the full question set; the rest of the role-to-role
spread is sampling noise, which spreads the roles along every component and pulls the default Assistant toward
the middle of them. With half the responses per role the carrier is: {halves}.
""")
    rows = m.get("carrier_by_layer") or []
    if rows:
        rep.table("The carrying component by layer (no intervals; the target layer is the headline)", [
            {"layer": r["layer"], "carrier": r["pc"], "roles below the default": r["percentile"],
             "|cos(axis, PC)|": abs(r["cosine"]), "|axis| in top-3 span": r["top3_cosine"],
             "target met": "yes" if r["target_met"] else "no"} for r in rows])


def _assistant_check(m: dict) -> str:
    if "assistant_role_axis_projection" not in m:
        return ""
    return (f" Held-out check: the 'assistant' role (not in the role mean) projects at "
            f"{m['assistant_role_axis_projection']:.2f} on the unit axis, against "
            f"{m['default_axis_projection']:.2f} for "
            f"the default vector and {m['mean_role_axis_projection']:.2f} for the mean role vector.")


def _interval(intervals, k: int) -> str:
    """'[low, high]' of the k-th interval, 'n/a' where none was computed (fewer roles than components)."""
    return f"[{intervals[k][0]:.2f}, {intervals[k][1]:.2f}]" if intervals and k < len(intervals) else "n/a"


def _ci_text(ci, fmt: str) -> str:
    return f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else " (no interval: fewer than %d roles)" % MIN_BOOTSTRAP_ROLES


def _adherence_text(cfg: Config, m: dict) -> str:
    if cfg.adherence == "none":
        return "Adherence filter: off."
    v = m["adherence_validity"]
    check = (f"validity check (role responses vs default answers scored under the role's instruction, paired over "
             f"{v['n']} roles): effect {v['effect']:.3f} [{v['low']:.3f}, {v['high']:.3f}] nats/token, "
             f"{'passed' if v['valid'] else 'NOT passed'}")
    act = (f"applied: {m['adherence_dropped']} of {m['adherence_scored']} scored role responses dropped (score <= "
           f"{cfg.adherence_min:g})" if m["adherence_applied"] else
           f"not applied, since the check did not pass: no responses dropped (it would have dropped "
           f"{m['adherence_would_drop']} of {m['adherence_scored']})")
    return (f"Adherence filter (judge-free likelihood: per-token log P(response | role instruction) - log P(response | "
            f"'{ASSISTANT_SYSTEM}'); mean {m['adherence_mean_score']:.3f}): {check}; {act}.")


def carrier_text(label: str, c: dict) -> str:
    """The sentence naming the component that carries the Assistant for one role set, with its intervals, whether
    the target is met, and, when it is not, which number falls short."""
    head = (f"{label} ({c['n_roles']} roles): {c['pc']} carries the Assistant (the top-3 component most aligned with "
            f"the axis): |cos(axis, {c['pc']})| = {abs(c['cosine']):.2f}{_ci_text(c['abs_cosine_ci'], '.2f')}; the "
            f"default Assistant lies above {c['percentile']:.0%}{_ci_text(c['percentile_ci'], '.0%')} of the roles on it.")
    if c["target_met"]:
        return head + " Target (beyond 95% of roles, |cos| > 0.6): met."
    short = []
    if c["percentile"] <= 0.95:
        short.append(f"the default is above only {c['percentile']:.0%} of the roles on {c['pc']}, not > 95%")
    if abs(c["cosine"]) <= 0.6:
        short.append(f"|cos| = {abs(c['cosine']):.2f} <= 0.6: the axis is not aligned with any single top-3 component")
        short.append(f"along the axis itself the default lies above {c['roles_below_default_on_axis']:.0%} of the roles, "
                     f"yet the top 3 PCs hold only {c['top3_cosine']:.2f} of its length, so the Assistant direction is "
                     "not the main direction of role-to-role variance in this role set")
    other = " Another top-3 component meets both conditions." if c["any_top3_met"] else ""
    return head + " Target not met: " + "; ".join(short) + "." + other


def write_report(res: AxisResult, folder) -> Path:
    from experiments.report import Report

    cfg, m = res.config, res.metrics
    rep = Report(folder, "Assistant Axis and persona space", config=cfg)
    rep.section("Setup", _setup_text(res))
    _component_sections(rep, res)
    _diagnostic_sections(rep, m, res.target_layer)
    rep.section("Reading", _reading_text(res))
    _plots(rep, res, res.drift, m["n_layers"])
    rep.table("PC1 loadings: top and bottom roles", _loading_rows(res))
    rep.table("By category", _category_rows(res))
    rep.table("Axis-PC1 cosine and PCs for the variance fraction, by layer", _layer_rows(res))
    if res.drift_rows:
        rep.table("Multi-turn drift (projection on the unit axis, target layer)", res.drift_rows)
        rep.section("Drift notes", f"""
All conversations are teacher-forced: the assistant text is ShareGPT's (ChatGPT) or the scripted role-play
and neutral replies, not `{cfg.model}`'s own generations, so the curves measure where the model places that text
on its own axis turn by turn. The paper's finding to compare with: therapy-like and philosophical conversations
drift away from the Assistant over turns while coding/writing conversations stay put; role-play text should
sit below neutral text.
""")
    rep.table("Example responses", res.examples)
    _save_vectors(rep, res)
    for key, val in m.items():
        rep.metric(key, val)
    return rep.finish()


def _setup_text(res: AxisResult) -> str:
    """What ran: model, roles, questions, sampling, the vectors' definition, filtering, against the paper's sizes."""
    cfg, m, target, L = res.config, res.metrics, res.target_layer, res.metrics["n_layers"]
    return f"""
Model `{cfg.model}` ({L} layers, d_model {res.d_model}); site `{SITE}` (block output), every layer.
{m["n_roles"]} roles (stratified over categories, seed {cfg.seed}) x {cfg.instructions_per_role} system
instruction(s) x {res.n_questions} extraction questions; default vector from {res.n_default_prompts} default prompts x
the same questions x {cfg.default_samples} sample(s) ({m['n_default_responses']} responses). Sampling: temperature {cfg.temperature}, top_p
{cfg.top_p}, {cfg.max_new_tokens} new tokens (mean {m['mean_response_tokens']:.1f} assistant tokens per response;
{m['finished_fraction']:.0%} ended with EOS). Role vector = mean over the role's responses of the mean
activation over assistant content tokens; axis = default - mean(role vectors). Target layer {target}
(middle). Judge filtering: {cfg.judge} {'(off: every non-empty response counts)' if cfg.judge == 'none' else f'(kept score >= {cfg.judge_min_score})'}.
Dropped roles: {m['dropped_roles'] or 'none'}. Wall time {m['elapsed_s']:.0f} s on CPU.
{_adherence_text(cfg, m)}

Sample size against the paper's (275 roles x 5 instructions x 240 questions, 512 tokens, judge-filtered):
{m["n_roles"]} roles x {cfg.instructions_per_role} x {res.n_questions}, {cfg.max_new_tokens} tokens.
"""


def _role_set_label(cfg: Config) -> str:
    """How the report names the run's whole role set."""
    return "All roles" if not cfg.role_categories else f"All roles of {', '.join(cfg.role_categories)}"


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
         "|cos| 95% CI": _interval(ci[1], k), "roles below the default": pct, "percentile 95% CI": _interval(ci[0], k)}
        for k, (cos, pct) in enumerate(zip(space["pc_cosines"], space["pc_percentiles"]))])
    n_human = len(m.get("human_roles", []))
    human_txt = (carrier_text("Human archetypes (" + ", ".join(cfg.human_categories) + "; own axis and PCA)",
                              m["carrier_human"]) if "carrier_human" in m else
                 "Human archetypes: every kept role is one, so the line above is theirs." if n_human == m["n_roles"]
                 else f"Human archetypes: fewer than 3 kept roles in {', '.join(cfg.human_categories)}; not analysed.")
    rep.section("The Assistant's component against the target", f"""
|axis| in the span of the top 3 PCs: {space['top3_cosine']:.3f} of its length.

- {carrier_text(_role_set_label(cfg), m["carrier_all"])}
- {human_txt}
{'' if ci[0] else f"No bootstrap intervals for the whole set: fewer than {MIN_BOOTSTRAP_ROLES} roles."}""")
    if "human_percentile_by_pc" in m:
        hci = m.get("human_percentile_ci_by_pc"), m.get("human_abs_cosine_ci_by_pc")
        rep.table("Human-archetype subset: components (own axis; 95% bootstrap intervals over roles)", [
            {"PC": f"PC{k + 1}", "cos(axis, PC)": cos, "|cos| 95% CI": _interval(hci[1], k),
             "roles below the default": pct, "percentile 95% CI": _interval(hci[0], k)}
            for k, (cos, pct) in enumerate(zip(m["human_cosine_by_pc"], m["human_percentile_by_pc"]))])


def _reading_text(res: AxisResult) -> str:
    cfg, m, space, target = res.config, res.metrics, res.space, res.target_layer
    return f"""
Paper (Gemma 2 27B / Qwen 3 32B / Llama 3.3 70B): 4 / 8 / 19 PCs for 70% of the variance, axis-PC1 cosine
> 0.71, the Assistant at one extreme of PC1. Here: {space['n_pcs']} PCs for {cfg.variance_fraction:.0%} with
{m["n_roles"]} roles (at most {m["n_roles"] - 1} non-trivial PCs), |cos(axis, PC1)| = {space['axis_pc1_cosine']:.3f}
at layer {target} (largest over layers: {m['axis_pc1_cosine_max']:.3f} at layer {m['axis_pc1_cosine_argmax_layer']}); the default Assistant's PC1 score is {'beyond every role' if space['default_beyond_all_roles'] else f"above {space['default_fraction_roles_below']:.0%} of the roles"}.
On the axis itself, {m['roles_below_default_on_axis']:.0%} of the role vectors project below the default
vector (true by construction on average, informative per role).{_assistant_check(m)}
"""


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
    return ([{"layer": l, "|cos|": float(cosines[l]), "PCs": m["pcs_for_fraction_by_layer"][l],
              "|axis|": m["axis_norm_by_layer"][l]} for l in range(0, L, max(1, L // 10))] +
            ([{"layer": L - 1, "|cos|": float(cosines[-1]), "PCs": m["pcs_for_fraction_by_layer"][-1],
               "|axis|": m["axis_norm_by_layer"][-1]}] if (L - 1) % max(1, L // 10) else []))


def _save_vectors(rep, res: AxisResult) -> None:
    """axis.safetensors (every layer) and role_vectors.safetensors, with what they are in their metadata."""
    cfg, m = res.config, res.metrics
    meta = {"model": cfg.model, "site": SITE, "layers": "all", "n_layers": m["n_layers"], "d_model": res.d_model,
            "target_layer": res.target_layer, "method": "assistant_axis: mean(default response means) - mean(role vectors)",
            "normalised": False, "n_roles": m["n_roles"], "seed": cfg.seed}
    rep.save_vectors("axis", {"axis": res.axis}, meta)
    assistant = {} if res.assistant_vector is None else {"assistant_role_vector": res.assistant_vector}
    rep.save_vectors("role_vectors", {"role_vectors": res.role_vectors, "default_vector": res.default_vector,
                                      **assistant},
                     {**meta, "method": "role vectors: mean over responses of assistant-content-token means",
                      "role_names": res.role_names, "role_categories": res.role_categories})


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
    sets = [("all", restricted or "all", f"{restricted}/" if restricted else "", m["default_percentile_by_pc"],
             m["axis_cosine_by_pc"], m.get("default_percentile_ci_by_pc"), m.get("axis_abs_cosine_ci_by_pc"),
             m["n_roles"])]
    if "human_percentile_by_pc" in m and not restricted:
        sets.append(("human", "human", "human/", m["human_percentile_by_pc"], m["human_cosine_by_pc"],
                     m.get("human_percentile_ci_by_pc"), m.get("human_abs_cosine_ci_by_pc"),
                     m["carrier_human"]["n_roles"]))
    cos_null = random_cosine_band(res.d_model, seed=cfg.seed)
    for analysis, role_set, prefix, pcts, coss, pct_ci, cos_ci, n in sets:
        carrier = m[f"carrier_{analysis}"]["pc"]
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
