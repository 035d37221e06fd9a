"""The refusal study's report and records: what `experiments.refusal.run` found, as markdown, plots, metrics.json,
the saved directions and the lines for `benchmarks/results.jsonl`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from experiments.refusal import Config, Result
from psm_jax.persona.refusal import Prompts
from psm_jax.persona.stats import bootstrap_ci, null_band


def _band_null(draws: np.ndarray | None, how: str) -> str:
    """The null text of a headline read against random directions: the band of `draws`, or why there is none."""
    if draws is None:
        return "0; no random-direction control in this run (n_random=0)"
    band = null_band(draws)
    return f"{len(draws)} random directions {how}: 95% band [{band['low']:+.3f}, {band['high']:+.3f}]"


def _drop_null(res: Result) -> str:
    return _band_null(res.random_drops, "(unit norm) ablated the same way")


def _rise_null(res: Result) -> str:
    return _band_null(res.random_rises, f"at the direction's norm added at L{res.best['layer']}")



def write_report(res: Result, folder) -> Path:
    from experiments.report import Report, pyplot

    plt = pyplot()
    cfg, best = res.config, res.best
    rep = Report(folder, "Refusal direction (difference in means, directional ablation)", cfg)
    rep.section("Setup", _setup_text(res))
    rep.section("Baseline refusal", _baseline_text(res.gen["harmful_base"][0], res.gen["harmless_induced"][0]))
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
Weight orthogonalisation (embedding, o_proj, down_proj; untied unembedding) vs runtime ablation:
max |logit difference| at the last position over {len(res.e_harm)} prompts = {res.orth_diff:.3g};
refusal log-odds with orthogonalised weights {_mean(res.orth_scores):.3f}.
""" + (f"""
{_ce_text(c, ce)}
""" if ce else "")


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


def _metrics(res: Result) -> dict:
    """metrics.json, in file order: the headline numbers first, then the selection, the evaluation, timings."""
    ev, gen, ce = res.ev, res.gen, res.ce
    return {"refusal_logodds_drop": res.drop, "refusal_ce_change": ce.get("ce_pct_change"), "ce": ce,
            "random_ablation_drops": None if res.random_drops is None else [float(x) for x in res.random_drops],
            "random_induce_rises": None if res.random_rises is None else [float(x) for x in res.random_rises],
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
                null=_drop_null(res), **({} if res.random_drops is None else
                                         {"random_drops": [round(float(x), 4) for x in res.random_drops]}),
                **_prompt_ci(res.ev["harmful_base"] - res.ev["harmful_ablated"], cfg.seed)),
           dict(metric="refusal_induce_rise", value=round(float(np.mean(res.ev["harmless_induced"]
                                                                      - res.ev["harmless_base"])), 4),
                unit="nats (mean refusal log-odds, induced - baseline, harmless prompts)",
                reference=ref.replace("harmful prompts", "harmful and harmless prompts")
                + "; Arditi et al. 2024: adding the direction induces refusal", target="> 0 and above the random band",
                null=_rise_null(res), **({} if res.random_rises is None else
                                         {"random_rises": [round(float(x), 4) for x in res.random_rises]}),
                **_prompt_ci(res.ev["harmless_induced"] - res.ev["harmless_base"], cfg.seed))]
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
