"""The feature-steering study's report and records: the headline against the random band, every edit per trait,
the two-choice items' section, the band plot, and the lines for `benchmarks/results.jsonl`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.feature_steering import MEASURE, Result, is_evidence
from experiments.report import Report, jsonable, pyplot
from experiments.report import fmt_num as _f
from experiments.sae_source import line_key
from psm_jax.persona import measures
from psm_jax.persona.stats import MIN_NULL_DRAWS, null_band


def _ci(e: dict) -> str:
    return f"{_f(e['estimate'], '+.3f')} [{_f(e['low'], '+.3f')}, {_f(e['high'], '+.3f')}]"


def _band(b: dict | None) -> str:
    return "n/a" if b is None else f"[{_f(b['low'], '+.3f')}, {_f(b['high'], '+.3f')}] (n={b['n']})"


def _plot(report: Report, result: Result):
    plt = pyplot()
    names = list(result.traits)
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        r = result.traits[name]
        s = r["edits"][r["best"]]["strength"]
        null = np.asarray(r["random_effects"], np.float64)
        ax.hist(null[np.isfinite(null)], bins=12, color="lightgrey", label=f"random (s={s:g})")
        for k, (label, e) in enumerate(r["edits"].items()):
            ax.axvline(e["effect"]["estimate"], color=f"C{k}", lw=1.5, label=label)
        ax.set_title(f"{name}: measure {'valid' if r['validity']['valid'] else 'NOT valid'}", fontsize=9)
        ax.set_xlabel("change of the judge-free score")
        ax.legend(fontsize=7)
    fig.tight_layout()
    report.figure("steering_band", fig, "The effect of each edit (vertical lines) against the random directions at "
                  "the same norm (histogram).")


def _reading(r: dict) -> str:
    """What the headline row supports: nothing without a valid measure and a band; else where the best latent's
    effect lies against the random band."""
    if not r["validity"]["valid"]:
        return "not evidence (measure NOT valid)"
    best = r["edits"][r["best"]]
    if not is_evidence(r):
        return "not evidence (no random band)"
    return "above the random band" if best["effect"]["estimate"] > best["band"]["high"] else (
        "below the random band" if best["effect"]["estimate"] < best["band"]["low"] else "within the random band")


def _two_choice_section(rep, name: str, tc: dict | None) -> None:
    """The two-choice items: their validity check and, where it passes, each edit's change and the best latent's z;
    or that they did not run (`two_choice=False`)."""
    if tc is None:
        rep.section(f"{name}: two-choice items", "Not run at this size (`two_choice=False`); the judge-free measure "
                    "above is the evidence.")
        return
    st = tc["stored_validity"]
    stored = (f"; stored check for {st['model']}: {'valid' if st['valid'] else 'NOT valid'} (effect "
              f"{st['effect']:.3g} [{st['low']:.3g}, {st['high']:.3g}], n={st['n']})" if st else "")
    if tc["edits"]:
        rep.table(f"{name}: two-choice items, {measures.validity_text(tc['validity'])}{stored}; unsteered "
                  f"{_f(tc['unsteered'], '+.3f')}; best latent's z against the random band {_f(tc.get('z'), '.2f')}",
                  [{"edit": k, "change [95% CI]": _ci(e), "n items": e["n"]} for k, e in tc["edits"].items()])
    else:
        rep.section(f"{name}: two-choice items", f"{measures.validity_text(tc['validity'])}{stored} over "
                    f"{tc['n_items']} items: the check fails on this model, so the items are not used to measure "
                    "steering here (not evidence either way).")


_RANKING_WORDS = {"contrast": "latents ranked by Cohen's d of the trait's positive vs negative prompts",
                  "specific": "latents ranked by their margin over the other traits (the trait-specific ranking)"}


def write_report(result: Result, folder) -> Path:
    """Write report.md, metrics.json, config.json and the band plot into `folder`."""
    cfg = result.config
    rep = Report(folder, "Feature steering with persona latents", cfg)
    first = next(iter(result.traits.values()))
    rep.section("Setup", f"""
Model `{cfg.model}`; SAE on `{result.sae.get('site')}` of layer {result.layer} ({result.sae.get('d_sae')} latents);
features run `{cfg.features}`, its {_RANKING_WORDS[cfg.ranking]}.
Strength unit: the typical per-token residual norm at layer {result.layer} on
{result.n_ppl_docs} held-out ShareGPT assistant answers ({_f(result.typical_norm, '.2f')}). Every direction (top
{cfg.n_latents} persona latents' unit decoder rows, the persona vector) is steered at one strength per trait: the
largest of {list(cfg.strengths)} at which both the best latent's and the persona vector's perplexity ratio on those
answers is <= {cfg.max_ppl_ratio} (matched norm, both within the perplexity ceiling); {cfg.n_random} random
directions (seed {cfg.seed}) at the same norm form the null band. Units: {len(first['questions'])} evaluation
questions per trait, greedy answers of {cfg.max_new_tokens} new tokens. Measure: {MEASURE}, read by the unsteered
model, with its validity check on this model (answers made under another instruction pair's positive vs negative
prompt). A row is evidence only when that check passes.
""")
    rows, per = [], {}
    for name, r in result.traits.items():
        best, vec = r["edits"][r["best"]], r["edits"]["persona vector"]
        rows.append({"trait": name, "measure validity": measures.validity_text(r["validity"]),
                     "best latent": r["best"], "s": best["strength"], "ppl ratio": _f(best["ppl_ratio"], ".2f"),
                     "effect [95% CI]": _ci(best["effect"]), "n": best["effect"]["n"],
                     "random band": _band(best["band"]), "z": _f(best["z"], ".2f"),
                     "vector effect": _ci(vec["effect"]), "vector s": vec["strength"], "vector z": _f(vec["z"], ".2f"),
                     "reading": _reading(r)})
        per[name] = {k: v for k, v in r.items() if k not in ("edits", "unsteered_answers")}
        per[name]["evidence"] = is_evidence(r)
        per[name]["edits"] = {k: {kk: vv for kk, vv in e.items() if kk != "answers"} for k, e in r["edits"].items()}
    rep.table("Headline: the best latent's effect on the judge-free score vs the random band (z)", rows)
    for name, r in result.traits.items():
        tab = [{"edit": k, "s": e["strength"], "ppl ratio": _f(e["ppl_ratio"], ".2f"),
                "within ceiling": e["ppl_ratio"] <= cfg.max_ppl_ratio, "effect [95% CI]": _ci(e["effect"]),
                "n": e["effect"]["n"],
                "empty answers": e["empty"], "z": _f(e["z"], ".2f"),
                "cos(W_dec, vector)": _f(r["decoder_cosine_with_vector"].get(k), ".3f")} for k, e in r["edits"].items()]
        tab += [{"edit": f"clamp {r['best']} to {c['multiple']:g} x max act", "s": "", "ppl ratio": _f(c["ppl_ratio"], ".2f"),
                 "within ceiling": c["ppl_ratio"] <= cfg.max_ppl_ratio, "effect [95% CI]": _ci(c["effect"]),
                 "n": c["effect"]["n"], "empty answers": "", "z": "", "cos(W_dec, vector)": ""} for c in r["clamp"]]
        rep.table(f"{name}: every edit at s={r['strength']} (ppl ratios over the grid {list(cfg.strengths)} in "
                  f"metrics.json; the random directions' median ratio {_f(r['band_ppl_ratio_median'], '.2f')})", tab)
        _two_choice_section(rep, name, r["two_choice"])
        ex = [f"- unsteered: {r['unsteered_answers'][0][:200]!r}"]
        ex += [f"- {k} (s={e['strength']}): {e['answers'][0][:200]!r}" for k, e in r["edits"].items()]
        rep.section(f"{name}: answers to \"{r['questions'][0]}\"", "\n".join(ex))
    _plot(rep, result)
    rep.metric("traits", per)
    rep.metric("layer", result.layer)
    rep.metric("typical_norm", result.typical_norm)
    rep.metric("seconds", result.seconds)
    return rep.finish()


def result_records(result: Result) -> list[dict]:
    """Per trait: the best latent's effect on the judge-free score as a z against the random band at matched norm,
    with the effect, its interval, n, the persona vector's z and the measure's validity."""
    ref = ("Wang et al. 2025 / Kim et al. 2026: steering along an SAE latent's decoder row moves the behaviour; here "
           "against >= 20 random directions at matched norm, strengths matched by perplexity cost")
    out = []
    for name, r in result.traits.items():
        best, vec = r["edits"][r["best"]], r["edits"]["persona vector"]
        if not np.isfinite(best["z"]):
            continue
        out.append(dict(metric="feature_steering_effect_z", value=float(best["z"]), unit="z (random band)",
                        reference=ref, target="> 1.96 with a valid measure", trait=name,
                        key=line_key(name if result.config.ranking == "contrast" else f"{name}/{result.config.ranking}",
                                     result.layer, result.default_layer),
                        ranking=result.config.ranking,
                        measure="judge-free answer score", measure_valid=bool(r["validity"]["valid"]),
                        validity_effect=r["validity"]["effect"], evidence=is_evidence(r),
                        latent=r["latents"][0], strength=best["strength"], ppl_ratio=best["ppl_ratio"],
                        effect=best["effect"]["estimate"], effect_low=best["effect"]["low"],
                        effect_high=best["effect"]["high"], n=int(best["effect"]["n"]),
                        n_random=int(np.isfinite(r["random_effects"]).sum()),
                        vector_z=float(vec["z"]), vector_effect=vec["effect"]["estimate"], layer=result.layer,
                        model=result.config.model, ci=[best["effect"]["low"], best["effect"]["high"]],
                        ci_of=f"the latent's effect (score change), n = {int(best['effect']['n'])} questions",
                        null=_random_null_text(r["random_effects"])))
    return [jsonable(line) for line in out]  # NaN -> None: strict JSON lines


def _random_null_text(effects) -> str:
    """The random directions' band of effects, the reference of the z."""
    finite = np.asarray(effects, float)
    finite = finite[np.isfinite(finite)]
    if finite.size < MIN_NULL_DRAWS:
        return f"none: {finite.size} random directions, fewer than a band needs ({MIN_NULL_DRAWS})"
    band = null_band(finite)
    return (f"{finite.size} random directions at matched norm and strength: effects' 95% band "
            f"[{band['low']:+.3g}, {band['high']:+.3g}] (z = 0 is their mean)")
