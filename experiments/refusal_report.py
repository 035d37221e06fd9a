"""The refusal study's report and records: what `experiments.refusal.run` found, as markdown, plots, metrics.json,
the saved directions and the lines for `benchmarks/results.jsonl`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from experiments.refusal import Config, Result
from psm_jax.persona.refusal import VALIDITY_MIN_PER_SIDE, Prompts, matched_damage_null, pooled_nulls
from psm_jax.persona.stats import bootstrap_ci, null_band, pearson, ranks

NULL_NAMES = {"random": "random directions",
              "shuffled": "label-shuffled difference-in-means directions (same position and layer)"}


def _band_null(res: Result, key: str, how: str) -> str:
    """The null text of a headline: the 95% band of each null's `key` draws (drops, rises or kls), or why there
    is none."""
    if not res.nulls:
        return "0; no null directions in this run (n_random=0, n_shuffled=0)"
    parts = []
    for name, null in res.nulls.items():
        band = null_band(null[key])
        parts.append(f"{len(null[key])} {NULL_NAMES[name]} {how}: 95% band [{band['low']:+.3f}, {band['high']:+.3f}]")
    return "; ".join(parts)


def _drop_null(res: Result) -> str:
    return _band_null(res, "drops", "(unit norm) ablated the same way")


def _rise_null(res: Result) -> str:
    return _band_null(res, "rises", f"at the direction's norm added at L{res.best['layer']}")


def _kl_null(res: Result) -> str:
    return _band_null(res, "kls", "(unit norm) ablated the same way")


def _null_draws(res: Result, key: str) -> dict:
    """Each null's draws of `key`, rounded, as record fields (e.g. random_drops, shuffled_drops)."""
    return {f"{name}_{key}": [round(float(x), 4) for x in null[key]] for name, null in res.nulls.items()}



def write_report(res: Result, folder) -> Path:
    from experiments.report import Report, pyplot

    plt = pyplot()
    cfg, best = res.config, res.best
    rep = Report(folder, "Refusal direction (difference in means, directional ablation)", cfg)
    rep.section("Setup", _setup_text(res))
    rep.section("Baseline refusal", _baseline_text(res.gen["harmful_base"][0], res.gen["harmless_induced"][0])
                + "\n\n" + _validity_text(res))
    rep.table("Selected direction", [dict(position=_candidate_name(best), layer=best["layer"], bypass=best["bypass"],
                                          induce=best["induce"], kl=best["kl"], norm=best["norm"], tier=res.tier)])
    rep.table("Candidates, lowest bypass first (top 15)",
              [dict(candidate=_candidate_name(r), bypass=r["bypass"], induce=r["induce"], kl=r["kl"], kept=r["kept"],
                    dropped_for=r["reason"]) for r in sorted(res.annotated, key=lambda r: r["bypass"])[:15]])
    rep.table(f"Held-out evaluation ({cfg.n_eval} prompts per side)", _heldout_rows(res))
    rep.section("Ablation effect", _ablation_text(res))
    rep.section("Example answers (greedy)", _examples_text(res))
    rep.figure("selection_scores", _selection_figure(plt, res),
               "Selection scores per (position, layer); blank = not evaluated; red star = selected; dashed line = "
               "layer cut.")
    rep.figure("heldout_logodds", _logodds_figure(plt, res.ev),
               "Held-out refusal log-odds before/after ablation and with the direction added.")
    rep.figure("direction_norms", _norms_figure(plt, res), "Norm of the difference in means per layer and position.")
    if res.nulls:
        rep.figure("ablation_damage", _damage_figure(plt, res),
                   "Refusal log-odds drop on the held-out harmful prompts against the KL the same ablation costs on "
                   "the held-out harmless prompts: the selected direction and each null direction.")
    rep.save_vectors("refusal_direction", {"direction": res.direction, "unit": res.unit},
                     dict(model=cfg.model, layer=best["layer"], site="resid_pre", method="diff-in-means",
                          position_offset=best["offset"], position_token=best["token"], d_model=res.d_model))
    rep.save_vectors("candidate_directions", {"mean_diff": res.dirs},
                     dict(model=cfg.model, site="resid_pre", method="diff-in-means", layers="all",
                          position_offsets=res.offsets.tolist(), position_tokens=res.pos_names,
                          shape="position x layer x d_model"))
    for name, value in _metrics(res).items():
        rep.metric(name, value)
    rep.section("Timing", json.dumps({k: round(v, 1) for k, v in res.seconds.items()}))
    return rep.finish()


def _mean(x) -> float:
    """The mean as a plain float, for report text, tables and metrics.json."""
    return float(np.mean(x))


def _candidate_name(row: dict) -> str:
    """How the report names a candidate: template token (offset) / layer."""
    return f"{row['token']!s} ({row['offset']}) / L{row['layer']}"


def _filter_text(cfg: Config, filt: dict) -> str:
    """How many train prompts passed the score-sign filter and how many each side's direction uses."""
    if not cfg.filter_train:
        return f"the direction uses all {filt['harmful_before']} + {filt['harmless_before']} prompts."
    harmful_kind = "unfiltered" if filt["harmful_unfiltered_fallback"] else "filtered"
    harmless_kind = "unfiltered" if filt["harmless_unfiltered_fallback"] else "filtered"
    return (f"{filt['harmful_passing']} of {filt['harmful_before']} harmful prompts score > 0 and "
            f"{filt['harmless_passing']} of {filt['harmless_before']} harmless prompts score < 0. A side "
            f"with fewer than {cfg.min_filtered} passing prompts stays unfiltered: the direction uses "
            f"{filt['harmful_after']} harmful ({harmful_kind}) and {filt['harmless_after']} harmless "
            f"({harmless_kind}) prompts.")


def _setup_text(res: Result) -> str:
    """The report's Setup section: the prompts, the refusal score and rate, the filtering, the candidates and the
    selection rules, so the numbers below can be read without the code."""
    c, L = res.config, res.n_layers
    fallback_text = ("" if not res.fallback_used else
                     " (no candidate passed the strict rules; the pre-declared relaxations, in order: "
                     "induce >= unsteered harmless mean, then KL rule only, then layer rule only; "
                     "see `select_with_fallback`).")
    return f"""
Model `{c.model}` ({L} layers, d_model {res.d_model}). Harmful/harmless prompts from `psm_jax/persona/data/refusal`
(seeded shuffle, seed {c.seed}): {c.n_train} train per side for the direction, {c.n_val} val per side for the
selection, and {c.n_eval} further *train-split* prompts per side held out for the evaluation (never used for the
direction or the selection). Each prompt is one user turn with the chat template's generation prompt (a template with
a default system prompt inserts it).

Refusal score = log P(S) - log(1 - P(S)) at the last prompt position, S = first tokens of the score markers
{list(res.markers.score_tokens)} with and without a leading space: ids {res.token_ids} = {res.token_strs}.
Refusal rate = fraction of greedy answers ({c.max_new_tokens} new tokens) containing any refusal marker
(substring check; a prefix-only variant is reported alongside).

Filtering of train prompts by score sign: {'on' if c.filter_train else 'off'}; {_filter_text(c, res.filt)}

Post-instruction positions (offsets from the prompt end): {dict(zip(res.offsets.tolist(), res.pos_names))}.
Candidates evaluated: positions {res.cand_pos} x layers {list(res.layers)} = {len(res.candidates)} candidates
(difference in means is computed and saved for all {len(res.offsets)} positions x {L} layers).
Selection: drop layer >= {c.max_layer_frac} * {L}, KL > {c.kl_threshold}, induce < {c.induce_threshold};
lowest bypass wins. Unsteered val means: harmful {res.harmful_val_base:.3f}, harmless {res.harmless_val_base:.3f}.
Selection tier used: **{res.tier}**{fallback_text}
"""


def _heldout_rows(res: Result) -> list[dict]:
    """One table row per held-out condition: mean refusal log-odds and both refusal rates."""
    labels = {"harmful_base": ("harmful held-out", "baseline"), "harmful_ablated": ("harmful held-out", "ablated"),
              "harmless_base": ("harmless held-out", "baseline"),
              "harmless_induced": ("harmless held-out", f"+1x direction at L{res.best['layer']}")}
    return [dict(prompts=prompts, condition=condition, refusal_logodds=_mean(res.ev[k]), refusal_rate=res.gen[k][0],
                 prefix_rate=res.gen[k][1]) for k, (prompts, condition) in labels.items()]


def _ablation_text(res: Result) -> str:
    """The report's Ablation effect section: the log-odds drop, the weight-edit check and the CE cost."""
    c, ev, ce = res.config, res.ev, res.ce
    frac_lower = float(np.mean(ev["harmful_ablated"] < ev["harmful_base"]))
    return f"""
Mean refusal log-odds drop on held-out harmful prompts: **{res.drop:.3f} nats**
({_mean(ev['harmful_base']):.3f} -> {_mean(ev['harmful_ablated']):.3f}); lower for {frac_lower:.0%} of the prompts.
Null: {_drop_null(res)}.
Adding the direction to the held-out harmless prompts raises their refusal log-odds by
**{_mean(ev['harmless_induced'] - ev['harmless_base']):.3f} nats**; null: {_rise_null(res)}.
{_damage_text(res)}
Weight orthogonalisation (embedding, o_proj, down_proj; untied unembedding) vs runtime ablation:
max |logit difference| at the last position over {len(res.e_harm)} prompts = {res.orth_diff:.3g};
refusal log-odds with orthogonalised weights {_mean(res.orth_scores):.3f}.
""" + (f"""
{_ce_text(c, ce)}
""" if ce else "")


def _damage_text(res: Result) -> str:
    """What the ablation costs where refusal is not wanted (the selection rule's KL, on the held-out harmless
    prompts), against the nulls' costs, and how the nulls' drops follow their costs."""
    ci = bootstrap_ci(res.ablation_kl, seed=res.config.seed)
    text = (f"The ablation costs KL **{ci['estimate']:.4f} nats** on the next token after the held-out harmless "
            f"prompts (95% interval over prompts [{ci['low']:.4f}, {ci['high']:.4f}]; the selection rule's threshold "
            f"is {res.config.kl_threshold:g}); null: {_kl_null(res)}.")
    for name, null in res.nulls.items():
        text += (f" Over the {NULL_NAMES[name]}, the rank correlation of drop with KL is "
                 f"{_rank_r(null['drops'], null['kls']):+.2f}.")
    if res.nulls and ci["estimate"] > 0:
        m = matched_damage_null(res.drop, ci["estimate"], *pooled_nulls(res.nulls))
        text += (f" At matched damage ({m['n_matched']} null directions whose KL lies within a factor "
                 f"{m['factor']:g} of this one's), {m['n_at_least']} drop refusal at least as much: rank p = "
                 f"{m['p']:.3f}" + ("" if m["enough"] else " (too few matched directions for p <= 0.1)") + ".")
    return text


def _rank_r(x, y) -> float:
    """Spearman's rank correlation (descriptive: how far a null's drops follow the damage its ablations do)."""
    return pearson(ranks(x), ranks(y))


def _ce_text(cfg: Config, ce: dict) -> str:
    """The cross-entropy cost of the ablation on held-out chat, with its interval over conversations."""
    ci = ce.get("ce_pct_change_ci")
    interval = f", 95% interval over conversations [{ci[0]:+.2f}%, {ci[1]:+.2f}%]" if ci else ""
    return (f"Cross-entropy on the assistant tokens of {ce['n_conversations']} held-out ShareGPT conversations "
            f"({ce['tokens']} tokens; each cut to its first {cfg.ce_max_messages} messages and {cfg.ce_max_chars} "
            f"characters; seed {cfg.seed}): {ce['ce']:.4f} -> {ce['ce_edited']:.4f} nats "
            f"(**{ce['ce_pct_change']:+.2f}%**{interval}).")


def _answer_pairs(prompts: Prompts, n: int, base: list[str], edited: list[str], label: str) -> list[str]:
    """Markdown items for the first `n` prompts: the baseline answer next to the answer under one edit."""
    return [f"- **{prompts.texts[i]}**\n  - baseline: {base[i]!r}\n  - {label}: {edited[i]!r}"
            for i in range(min(n, len(prompts)))]


def _examples_text(res: Result) -> str:
    """Greedy answers to a few held-out prompts, so the rates can be checked against the text itself."""
    gen = res.gen
    return "\n".join(_answer_pairs(res.e_harm, 6, gen["harmful_base"][2], gen["harmful_ablated"][2], "ablated")
                     + _answer_pairs(res.e_safe, 4, gen["harmless_base"][2], gen["harmless_induced"][2], "+direction"))


def _selection_figure(plt, res: Result):
    """Bypass, induce and KL per (position, layer) with the winner starred and the layer cut dashed: where the
    selection rules found the direction."""
    offsets, pos_names, L, best = res.offsets, res.pos_names, res.n_layers, res.best
    titles = {"bypass": " (harmful val, ablated)", "induce": " (harmless val, +direction)",
              "kl": " (harmless val, ablated vs base, last position)"}
    P = len(offsets)
    grids = {k: np.full((P, L), np.nan) for k in titles}
    for r in res.annotated:
        for k in grids:
            grids[k][r["position"], r["layer"]] = r[k]
    fig, axes = plt.subplots(3, 1, figsize=(10, 7.5), sharex=True)
    for ax, k in zip(axes, grids):
        im = ax.imshow(grids[k], aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(P), [f"{o} {n!r}" for o, n in zip(offsets.tolist(), pos_names)], fontsize=7)
        ax.set_title(k + titles[k], fontsize=9)
        fig.colorbar(im, ax=ax)
        ax.plot([best["layer"]], [best["position"]], "r*", ms=12)
        ax.axvline(res.config.max_layer_frac * L - 0.5, color="w", lw=1, ls="--")
    axes[-1].set_xlabel("layer (resid_pre)")
    return fig


def _logodds_figure(plt, ev: dict):
    """Histograms of the held-out refusal log-odds per condition: the ablation's effect prompt by prompt."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = np.linspace(min(min(v.min() for v in ev.values()), -8), max(max(v.max() for v in ev.values()), 2), 40)
    for k, v in ev.items():
        ax.hist(v, bins=bins, alpha=0.5, label=f"{k} (mean {v.mean():.2f})")
    ax.set_xlabel("refusal log-odds (last prompt position)")
    ax.legend(fontsize=7)
    return fig


def _norms_figure(plt, res: Result):
    """The norm of the difference in means per layer, one line per candidate position."""
    fig, ax = plt.subplots(figsize=(7, 3))
    for p in sorted({r["position"] for r in res.annotated}):
        rs = sorted([r for r in res.annotated if r["position"] == p], key=lambda r: r["layer"])
        ax.plot([r["layer"] for r in rs], [r["norm"] for r in rs], marker=".",
                label=f"{res.offsets[p]} {res.pos_names[p]!r}")
    ax.set_xlabel("layer")
    ax.set_ylabel("|mean diff|")
    ax.legend(fontsize=7)
    return fig


def _damage_figure(plt, res: Result):
    """Drop against KL (log scale) for the selected direction and every null direction."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, null), colour in zip(res.nulls.items(), ("grey", "tab:blue")):
        ax.scatter(np.maximum(null["kls"], 1e-6), null["drops"], s=18, color=colour, label=NULL_NAMES[name])
    ax.scatter([max(_mean(res.ablation_kl), 1e-6)], [res.drop], marker="*", s=160, color="red", label="selected")
    ax.axvline(res.config.kl_threshold, ls="--", color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("KL on held-out harmless prompts (nats)")
    ax.set_ylabel("refusal log-odds drop on held-out harmful prompts")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _metrics(res: Result) -> dict:
    """metrics.json, in file order: the headline numbers first, then the selection, the evaluation, timings."""
    ev, gen, ce = res.ev, res.gen, res.ce
    return {"refusal_logodds_drop": res.drop, "refusal_ce_change": ce.get("ce_pct_change"), "ce": ce,
            "score_validity": res.validity,
            "ablation_kl": dict(mean=_mean(res.ablation_kl), values=res.ablation_kl),
            "nulls": {name: {k: [float(x) for x in v] for k, v in null.items()} for name, null in res.nulls.items()},
            "selected": dict(res.best, tier=res.tier),
            "val_baseline_logodds": dict(harmful=res.harmful_val_base, harmless=res.harmless_val_base),
            "candidates": res.annotated, "filtering": res.filt,
            "heldout_logodds": {k: dict(mean=_mean(v), values=v) for k, v in ev.items()},
            "heldout_refusal_rate": {k: dict(substring=v[0], prefix=v[1]) for k, v in gen.items()},
            "answers": {k: v[2] for k, v in gen.items()},
            "orthogonalized_max_abs_logit_diff": res.orth_diff,
            "orthogonalized_logodds_mean": _mean(res.orth_scores),
            "refusal_token_ids": res.token_ids, "seconds": res.seconds}


def _baseline_text(harmful_rate: float, induced_rate: float) -> str:
    """What the ablation result can mean given how often the model refuses harmful prompts unedited."""
    text = (f"The unedited model refuses {harmful_rate:.0%} of the held-out harmful prompts (substring check, no "
            f"judge); adding the direction to harmless prompts (the induce condition) gives {induced_rate:.0%}. ")
    if harmful_rate < 0.2:
        return text + ("It barely refuses at baseline, so the ablation result is a capability null (there is little "
                       "refusal to remove), not a replication of the paper's bypass.")
    return text + "The log-odds drop under ablation below is read against that baseline."


def _validity_text(res: Result) -> str:
    """The refusal score's validity check, as the report states it."""
    v = res.validity
    n = 2 * res.config.n_eval
    if v is None:
        return (f"Validity of the refusal score: not checkable here, since the greedy answers to all {n} held-out "
                "prompts fall on one side (all refuse or none does); the log-odds headlines are read without it.")
    if v["valid"]:
        verdict = "valid"
    elif not v["enough"]:
        verdict = (f"**not valid here**: fewer than {VALIDITY_MIN_PER_SIDE} answers on one side leave the interval "
                   "unsupported, so the log-odds headlines below are not evidence about refusal")
    else:
        verdict = "**not valid**: the log-odds headlines below are not evidence about refusal"
    return (f"Validity of the refusal score: its AUROC for telling the held-out prompts (both sides, n = {v['n']}) "
            f"whose greedy answer refuses ({v['n_pos']}) from the rest is **{v['estimate']:.2f}** (95% interval over "
            f"prompts [{v['low']:.2f}, {v['high']:.2f}]; chance 0.5): {verdict}.")


def _validity_fields(res: Result) -> dict:
    """`measure_valid` for a log-odds record line: the score's check, or None where it could not run."""
    return {"measure_valid": None if res.validity is None else res.validity["valid"]}


def _prompt_ci(diff: np.ndarray, seed: int) -> dict:
    """A 95% bootstrap interval over held-out prompts (the independent units) of a per-prompt difference."""
    ci = bootstrap_ci(np.asarray(diff, np.float64), seed=seed)
    return {"ci": [round(ci["low"], 4), round(ci["high"], 4)], "n": ci["n"]}


def result_records(res: Result) -> list[dict]:
    """The refusal log-odds drop under ablation (and its rise on harmless prompts when the direction is added), each
    with its interval over prompts, and the cross-entropy cost."""
    cfg, sel = res.config, res.best
    ref = (f"{cfg.model}; direction = diff-in-means resid_pre L{sel['layer']} offset {sel['offset']} ({sel['token']}), "
           f"selection tier {res.tier}; {cfg.n_eval} held-out harmful prompts, seed {cfg.seed}")
    out = [dict(metric="refusal_logodds_drop", value=round(res.drop, 4),
                unit="nats (mean refusal log-odds, baseline - ablated)",
                reference=ref + "; Arditi et al. 2024: ablation removes refusal",
                target="> 0 and above the random band",
                null=_drop_null(res), **_null_draws(res, "drops"), **_validity_fields(res),
                **_prompt_ci(res.ev["harmful_base"] - res.ev["harmful_ablated"], cfg.seed)),
           dict(metric="refusal_induce_rise", value=round(float(np.mean(res.ev["harmless_induced"]
                                                                      - res.ev["harmless_base"])), 4),
                unit="nats (mean refusal log-odds, induced - baseline, harmless prompts)",
                reference=ref.replace("harmful prompts", "harmful and harmless prompts")
                + "; Arditi et al. 2024: adding the direction induces refusal", target="> 0 and above the random band",
                null=_rise_null(res), **_null_draws(res, "rises"), **_validity_fields(res),
                **_prompt_ci(res.ev["harmless_induced"] - res.ev["harmless_base"], cfg.seed)),
           dict(metric="refusal_ablation_kl", value=round(_mean(res.ablation_kl), 4),
                unit="nats (mean KL(unedited || ablated) of the next token after held-out harmless prompts)",
                reference=ref.replace("harmful prompts", "harmless prompts")
                + "; Arditi et al. 2024 select directions with KL < 0.1 on harmless prompts",
                target=f"<= {cfg.kl_threshold:g} (the selection rule's threshold)", null=_kl_null(res),
                **_null_draws(res, "kls"), **_prompt_ci(res.ablation_kl, cfg.seed))]
    if res.validity is not None:
        v = res.validity
        out.append(dict(metric="refusal_score_validity", value=round(v["estimate"], 4),
                        unit="AUROC of the unedited refusal log-odds for the held-out prompts whose answer refuses",
                        reference=f"{cfg.model}; {v['n']} held-out prompts (both sides), {v['n_pos']} greedy answers "
                                  f"with a refusal marker; seed {cfg.seed}",
                        target=f"interval above 0.5, with >= {VALIDITY_MIN_PER_SIDE} answers on each side",
                        null="0.5 (a score unrelated to whether the answer refuses)",
                        ci=[round(v["low"], 4), round(v["high"], 4)], n=v["n"], enough=v["enough"],
                        valid=v["valid"]))
    if res.ce:
        ce = res.ce
        out.append(dict(metric="refusal_ce_change", value=round(ce["ce_pct_change"], 4),
                        unit="% (CE ablated vs baseline)",
                        reference=f"{cfg.model}; {ce['n_conversations']} held-out ShareGPT conversations, "
                                  f"{ce['tokens']} assistant tokens; CE {ce['ce']:.4f} -> {ce['ce_edited']:.4f}; "
                                  "Arditi et al. 2024: gemma-2b-it Pile CE 3.506 -> 3.503", target="< 2",
                        null="none: a cost, read against its target", n=ce["n_conversations"],
                        **({"ci": [round(x, 4) for x in ce["ce_pct_change_ci"]]} if "ce_pct_change_ci" in ce else {})))
    return out
