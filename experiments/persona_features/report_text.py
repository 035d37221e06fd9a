"""The sentences and table rows of the persona-features report: the setup, the SAE's training, the rows of the
headline, found and candidate tables, the notes per contrast, the best latents' contexts and the readings of
specificity, each read from a finished run's numbers, so the section writers (`report_folder`) only arrange them."""
from __future__ import annotations

from experiments.persona_features.pipeline import Result
from experiments.persona_features.ranking import best_latent
from experiments.report import fmt_num
from sae.features import label as L


def _f(x, f=".2f"):
    return fmt_num(x, f)


def _example_line(ex: dict, n: int = 160) -> str:
    text = L.example_text(ex).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= n else text[:n] + "..."


def _ci(e: dict, f: str = "+.3f") -> str:
    return f"{_f(e['estimate'], f)} [{_f(e['low'], f)}, {_f(e['high'], f)}]"


def specificity_text(per_trait: dict, d_replicate: float) -> str:
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


def setup_text(result: Result, sae_info: dict) -> str:
    """What ran: model, SAE, traits and sizes, the found rule and its null, the context corpus."""
    cfg, sae, results, role_res = result.config, result.sae, result.results, result.roles
    n_ctx_docs, n_gen, context_tokens = result.n_context_docs, result.n_generated, result.context_tokens
    k_text, source = (f" (k={sae.k})" if sae.k else ""), sae_info.get("source")
    temperature, new_tokens = cfg.temperature, cfg.max_new_tokens
    last_discovery, n_roles = cfg.n_questions // 2 - 1, len(role_res.get("roles", []))
    n_default = role_res.get("n_default_prompts")
    return f"""
Model `{cfg.model}`; SAE on `{sae.site}` of layer {sae.layer} (block output = HF hidden_states[{sae.layer + 1}]),
{sae.d_sae} latents, activation {sae.activation}{k_text}; source: {source}.
Traits: {', '.join(results)}; {cfg.n_pairs} instruction pairs x {cfg.n_questions} extraction questions x
{cfg.n_samples} sampled responses per polarity (temperature {temperature}, {new_tokens} new tokens). Questions
0..{last_discovery} are the discovery half, the rest the validation half. Roles: {n_roles}
sampled roles x {cfg.role_questions} questions vs the {n_default} default prompts (the Assistant).
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


def training_text(cfg, sae, sae_info: dict) -> str:
    """How the SAE was trained here (a run that names its SAE has no such section)."""
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


def headline_row(name: str, m: dict) -> dict:
    """A contrast's best latent over independent units against its nulls (the cosine columns for traits only)."""
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


def found_row(name: str, res: dict, by_latent: dict, per_trait: dict, cfg) -> dict:
    """A contrast's found count against its shuffles, and its best latent's d, label, detection and specificity."""
    best = best_latent(res)
    rec = by_latent.get(best, {})
    det = rec.get("detection") or {}
    return {"contrast": name, "found": res["n_found"],
            f"null found ({cfg.n_shuffles} shuffles)": str(res["null_found"]),
            "r(halves)": _f(res["halves_correlation"]), "best latent": best,
            "d disc": _f(float(res["d_discovery"][best])), "d val": _f(float(res["d_validation"][best])),
            "label": rec.get("label") or "", "detection bal. acc.": _f(det.get("balanced_accuracy")),
            "AUROC": _f(det.get("auroc")),
            "d val on the other traits": ", ".join(
                f"{t} {d:.2f}" for t, d in per_trait[name]["best_d_validation_other_traits"].items()),
            "trait-specific": {True: "yes", False: "no", None: ""}[per_trait[name]["best_specific"]]}


def candidate_row(c: dict, res: dict, by_latent: dict) -> dict:
    """One candidate latent of a contrast: its d on both halves, firing rates, cosine, density, label, detection."""
    rec = by_latent.get(c["latent"], {})
    det = rec.get("detection") or {}
    rr = rec.get("role_rates") or {}
    return {"latent": c["latent"], "d disc": _f(c["d_discovery"]), "d val": _f(c["d_validation"]),
            "found": "yes" if c["found"] else "", "fire a/b": f"{_f(c['fire_a'], '.3f')}/{_f(c['fire_b'], '.3f')}",
            "cos(vector)": _f(res.get("cosine_of_candidates", {}).get(c["latent"]), ".3f"),
            "density": _f(rec.get("density"), ".4f"),
            "rate sys/user/asst": "/".join(_f(rr.get(k), ".3f") for k in ("system", "user", "assistant")),
            "label": rec.get("label") or "", "det. BA": _f(det.get("balanced_accuracy"))}


def trait_notes(res: dict) -> str:
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


def role_notes(role_res: dict) -> str:
    """The sampled roles and the latents whose decoder rows point toward the role end of the Assistant axis."""
    return ("Roles: " + ", ".join(role_res.get("roles", [])) + ". Decoder cosine toward the role end of the axis: "
            + ", ".join(f"{c['latent']} ({_f(c['cosine'], '.3f')})" for c in role_res["cosine_top_toward_roles"]))


def top_contexts(contrasts: list, by_latent: dict) -> str:
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


def specific_rows(per_trait: dict) -> list[dict]:
    """Per trait with a trait-specific ranking: found latents against the shuffled band and the best latent's
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
    return rows


def specific_text(cfg) -> str:
    """The trait-specific ranking's rule and null, with this run's thresholds."""
    return f"""
The ranking above finds what a trait's positive prompts share with every persona prompt. Here latents are ranked
by their **margin**: Cohen's d of the trait's own positive vs negative conversations minus the largest d of any
other trait, on the discovery halves. A latent is a found trait-specific latent when it is in the top
{cfg.n_candidates} by that margin, with own discovery d >= {cfg.d_discover} and a positive discovery margin, and on
the validation halves own d >= {cfg.d_replicate} and above every other trait's d. The null band applies the same
rule with this trait's pos/neg labels shuffled ({cfg.n_shuffles} shuffles) while the other traits keep theirs.
"""
