"""The KV-editing study's report folder and its lines for benchmarks/results.jsonl: the text is read from the
numbers (`experiments.kv_editing` computes the rows, `psm_jax.persona.kv_identity` their statistics; this module
only writes)."""
from __future__ import annotations

from pathlib import Path

from experiments.kv_editing import CONVERSATION_SETS, HISTORIES, KINDS, PERSONA_SOURCE, Config, Result
from psm_jax.persona.kv_identity import (MATCHED, condition_means, control_shifts, identity_shifts,
                                         identity_validity)


def _validity_text(v: dict | None) -> str:
    if v is None:
        return "No validity reference was run."
    verdict = ("valid: the measure reads the persona the history carries, so the shifts below can be read as moving "
               "it" if v["valid"] else
               "NOT valid: the measure does not tell the persona history from the Assistant's own, so the shifts "
               "below are not evidence about the persona")
    return (f"Unedited identity log-odds after the conversation's user turns answered by the model as its default "
            f"Assistant ({v['assistant_history_logodds']:+.3f} per token) minus after the persona history "
            f"({v['persona_history_logodds']:+.3f}): {v['effect']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}], paired "
            f"over n={v['n']} conversation x probe units: {verdict}.")


ASSISTANT_TOKENS = {"all_tokens": "on every assistant token",
                    "matched_tokens": "on as many assistant tokens as there are user tokens (a seeded subset)"}


def _assistant_vs_user_text(v: dict) -> str:
    """The user-token control's paired comparisons with the assistant-token edits, read from the numbers."""
    counts = ("" if v["user_tokens"] is None else
              f" Per history {v['assistant_tokens']:.0f} assistant and {v['user_tokens']:.0f} user tokens.")
    parts = []
    for name, d in v["assistant_minus_user"].items():
        parts.append(f" The same edit {ASSISTANT_TOKENS[name]} minus on the user tokens: {d['estimate']:+.3f} "
                     f"[{d['low']:+.3f}, {d['high']:+.3f}], paired over units"
                     + (" (above 0)." if d["low"] > 0 else " (not above 0)."))
    matched = v["assistant_minus_user"].get("matched_tokens")
    verdict = ("" if matched is None else
               " At an equal number of edited positions the assistant turns carry more of the identity than the user "
               "turns." if matched["low"] > 0 else
               " At an equal number of edited positions the assistant turns are not shown to carry more of the "
               "identity than the user turns.")
    return counts + "".join(parts) + verdict


def _edit_null_text(shift: dict, controls: dict) -> str:
    """What an axis edit's shift is compared with: 0, and the band of random directions edited the same way."""
    bands = [c for c in controls.values() if c["kind"] == shift["kind"] and "band_low" in c]
    text = "0 (no shift)"
    if bands:
        c = bands[0]
        text += (f"; {c['n_directions']} random directions at matched norm ({shift['kind']}, direct edit): 95% band "
                 f"[{c['band_low']:+.3f}, {c['band_high']:+.3f}]")
    return text


def _assistant_vs_user_record(v: dict, name: str, d: dict, cfg: Config) -> dict:
    return dict(metric="kv_edit_assistant_minus_user_shift", value=round(d["estimate"], 4),
                unit="nats per token (identity log-odds shift, paired difference)",
                reference=f"the direct edit ({v['kind']}, strength {v['strength']}, layers {v['layers']}) "
                          f"{ASSISTANT_TOKENS[name]} minus the same edit on the user tokens, paired over n={d['n']} "
                          f"conversation x probe units; 95% CI [{d['low']:+.4f}, {d['high']:+.4f}]; tokens per "
                          f"history: assistant {v['assistant_tokens']}, user {v['user_tokens']}; model {cfg.model}, "
                          f"seed {cfg.seed}",
                target="interval above 0 (the persona is carried by the assistant turns)", kind=v["kind"],
                key=f"{name}/{v['kind']}", ci_low=d["low"], ci_high=d["high"], n=d["n"], ci=[d["low"], d["high"]],
                null="0: assistant and user tokens carry the identity alike")


def _validity_record(v: dict, cfg: Config) -> dict:
    return dict(metric="kv_edit_identity_validity", value=round(v["effect"], 4),
                unit="nats per token (unedited identity log-odds: Assistant history minus persona history)",
                reference=f"the conversations' user turns answered by the model as its default Assistant vs the "
                          f"persona histories ({','.join(cfg.histories)}; {cfg.conversation_set} set), paired over "
                          f"n={v['n']} conversation x probe units; {v['assistant_history_logodds']:+.4f} vs "
                          f"{v['persona_history_logodds']:+.4f}; model {cfg.model}, seed {cfg.seed}",
                target="interval above 0 (the measure reads the persona the history carries)", valid=v["valid"],
                key=cfg.conversation_set,
                n=v["n"], ci=[v["low"], v["high"]], ci_of="the paired difference",
                null="0: the measure does not tell the persona history from the Assistant's own")


def _target_text(shifts: dict, controls: dict) -> str:
    """The targets read from the numbers: each axis edit's interval above 0, each control's containing 0; where
    one is not met, which number says why."""
    lines = []
    for key, v in shifts.items():
        ok = v["ci_low"] > 0
        why = "" if ok else (" The interval reaches below 0: " + (
            "the mean shift is itself <= 0, so this edit does not move the identity toward the Assistant here."
            if v["logodds_shift"] <= 0 else
            f"the mean shift is positive but {v['n']} units do not pin it down."))
        lines.append(f"- {key} (strength {v['strength']}, layers {v['layers']}): shift {v['logodds_shift']:+.3f} "
                     f"[{v['ci_low']:+.3f}, {v['ci_high']:+.3f}], n={v['n']}: target (interval above 0) "
                     f"{'met' if ok else 'not met'}.{why}")
    for key, v in controls.items():
        ok = v["ci_low"] <= 0 <= v["ci_high"]
        why = ""
        if not ok:
            why = (" Editing user-token positions moves the identity too: the effect is not specific to the "
                   "assistant turns." if v["control"] == "control_user" else
                   " A random direction at matched norm moves it too: part of the edit's effect is generic "
                   "perturbation.")
        if v.get("assistant_minus_user"):
            why += _assistant_vs_user_text(v)
        band = ""
        if "band_low" in v and v.get("direct_axis_shift") is not None:
            band = (f" Band of {v['n_directions']} random directions: [{v['band_low']:+.3f}, {v['band_high']:+.3f}]; "
                    f"the direct axis edit ({v['direct_axis_shift']:+.3f}) lies "
                    f"{'outside' if v['axis_outside_band'] else 'inside'} it.")
        lines.append(f"- {key}: shift {v['logodds_shift']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}], n={v['n']}: "
                     f"target (interval contains 0) {'met' if ok else 'not met'}.{why}{band}")
    return "\n".join(lines)


def _setup_text(result: Result, histories: list[str]) -> str:
    """The Setup section: units, sampling, edit modes and strength kinds, controls and readout of this run."""
    cfg, n_convs = result.config, len({r["conversation"] for r in result.rows})
    opened = (f"; each role's conversation has {cfg.role_turns} user turn(s) drawn from the role questions (seed "
              f"{cfg.seed})" if cfg.conversation_set == "roles" else "")
    return f"""
Model {cfg.model}; {n_convs} role-play conversation(s) ({CONVERSATION_SETS[cfg.conversation_set]}{opened}) x
{cfg.probes} identity probe(s) = {n_convs * cfg.probes} independent units, each with {len(histories)} history kind(s)
({'; '.join(f'{h}: {HISTORIES[h]}' for h in histories)});
the histories of a unit are averaged before the bootstrap, and the {cfg.samples} sampled answers per unit and condition
(temperature {cfg.temperature}, top-p {cfg.top_p}, {cfg.max_new_tokens} tokens, seed {cfg.seed}) share one edited cache,
so they are not independent either. Edits act on the cached assistant-token positions of the
history only (resid_pre, block inputs of the listed layers), in two modes (recompute: re-run the prefill with the edit;
direct: rebuild K/V at the edited layers only) and strength kind(s) {', '.join(KINDS[cfg.strength_kind])} ("scale":
projection x (1+s); "norm": + s * mean|h| along the unit axis). Negative strengths push toward the persona. Identity
log-odds: per-token log-likelihood of an assistant answer minus that of a persona answer after the probe (length
matched: each answer's mean over its tokens). Controls at the largest strength: the same direct edit on the user-token
positions, compared (paired over units) with the edit on every assistant token and on a seeded subset of as many
assistant tokens as there are user tokens ("{MATCHED}": the edit acts per position, so this comparison edits
equally many positions on both sides); and {cfg.n_random} random directions with the axis edit's mean displacement
per layer (matched norm).
Readout: mean projection of the sampled answer tokens on the unit axis at resid_post[{cfg.readout_layer}]. The
assistant-rate scorer is a keyword check. {PERSONA_SOURCE[cfg.persona_source]} Run time {result.seconds:.0f} s."""


def _effects_figure(plt, agg: list[dict]):
    """Identity log-odds and answer projection against strength: one line per mode, kind and layer range, each
    starting from the unedited cache at strength 0."""
    base = next(a for a in agg if a["mode"] == "none")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, ls in (("recompute", "-"), ("direct", "--")):
        for kind, lr in sorted({(a["kind"], a["layers"]) for a in agg if a["mode"] == mode}):
            pts = sorted([(0.0, base)] + [(a["strength"], a) for a in agg if a["mode"] == mode and a["kind"] == kind
                                          and a["layers"] == lr], key=lambda p: p[0])
            for ax, k in zip(axes, ("identity_logodds", "answer_projection")):
                ax.plot([p[0] for p in pts], [p[1][k] for p in pts], ls, marker="o", label=f"{mode} {kind} L{lr}")
    for ax, k in zip(axes, ("identity log-odds per token (assistant vs persona)", "answer projection on axis")):
        ax.set_xlabel("edit strength")
        ax.set_title(k)
        ax.axvline(0, color="grey", lw=0.5)
    axes[0].legend(fontsize=7)
    return fig


def _by_history(rows: list[dict], seed: int, histories: list[str]) -> list[dict]:
    """The axis edits' and the controls' shifts per history kind, one table row each (condition: mode or control)."""
    return [dict(history=h, condition=v.get("control", v.get("mode")),
                 **{k: x for k, x in v.items() if k not in ("mode", "control")}) for h in histories
            for v in list(identity_shifts(rows, seed, h).values()) + list(control_shifts(rows, seed, h).values())]


def _samples_text(samples: list[tuple]) -> str:
    """The first sampled answers per shown condition, one line each, clipped to 120 characters."""
    return "\n".join(f"- {cid} ({h}) / {mode} {kind} s={s} L{lr}: " + " | ".join(repr(t[:120]) for t in texts)
                     for cid, h, mode, kind, s, lr, texts in samples)


def _histories_text(histories: dict) -> str:
    """The generated assistant turns per conversation, one line each, clipped to 160 characters per turn."""
    return "\n".join(f"- {k}: " + " | ".join(repr(t[:160]) for t in turns) for k, turns in histories.items())


def write_report(result: Result, folder) -> Path:
    """The report folder of a finished run: setup, effects table and figure, the validity check, the shifts against
    their targets and controls, samples and histories; metrics.json holds every number shown."""
    from experiments.report import Report, pyplot

    plt = pyplot()
    cfg, rows = result.config, result.rows
    histories = sorted({r["history"] for r in rows})
    rep = Report(folder, "KV-cache editing of a persisted persona", cfg)
    rep.section("Setup", _setup_text(result, histories))
    agg = condition_means(rows)
    rep.table("Effect of cache edits (mean over rows; n = conversation x probe units)", agg)
    rep.figure("kv_edit_effects", _effects_figure(plt, agg),
               "Identity log-odds and answer projection vs edit strength.")
    shifts, controls = identity_shifts(rows, cfg.seed), control_shifts(rows, cfg.seed)
    validity = identity_validity(rows, result.reference, cfg.seed)
    rep.section("Validity of the identity measure", _validity_text(validity))
    rep.table("Identity log-odds shift at the largest strength (95% bootstrap interval over units)",
              list(shifts.values()))
    if controls:
        rep.table("Control edits at the largest strength (identity log-odds shift, 95% interval over units; expected "
                  "to contain 0)", list(controls.values()))
    rep.section("Targets", _target_text(shifts, controls))
    if len(histories) > 1:
        rep.table("By history kind (largest strength; 95% interval over units)", _by_history(rows, cfg.seed, histories))
    rep.table("Control: capping on assistant tokens only (projection shift at the readout layer)", result.control)
    rep.section("Sample answers (first probe)", _samples_text(result.samples))
    if result.histories:
        rep.section("Generated histories (the model's own in-character turns, first 160 characters each)",
                    _histories_text(result.histories))
    if result.reference_histories:
        rep.section("The Assistant's own replies (the validity reference, first 160 characters each)",
                    _histories_text(result.reference_histories))
    for name, value in (("kv_edit_identity_shift", shifts), ("kv_edit_control_shift", controls),
                        ("identity_validity", validity), ("rows", rows), ("reference", result.reference),
                        ("control", result.control), ("generated_histories", result.histories),
                        ("reference_histories", result.reference_histories), ("seconds", result.seconds)):
        rep.metric(name, value)
    return rep.finish()


def result_records(result: Result) -> list[dict]:
    """The identity measure's validity check; per (mode, kind) the identity shift's interval low (with whether the
    measure passed its check); per (control, kind) the control's interval."""
    cfg = result.config
    out = []
    validity = identity_validity(result.rows, result.reference, cfg.seed)
    if validity is not None:
        out.append(_validity_record(validity, cfg))
    controls = control_shifts(result.rows, cfg.seed)
    for key, v in identity_shifts(result.rows, cfg.seed).items():
        out.append(dict(metric="kv_edit_identity_shift_ci_low", value=round(v["ci_low"], 4),
                        unit="nats per token (identity log-odds shift, 95% CI low)",
                        reference=f"unedited cache; {v['mode']} edit, strength {v['strength']} ({v['kind']}), layers "
                                  f"{v['layers']}, n={v['n']} conversation x probe units ({v['samples_per_unit']} "
                                  f"samples each; histories {','.join(cfg.histories)}), model {cfg.model}, seed "
                                  f"{cfg.seed}; shift {v['logodds_shift']:+.4f} [{v['ci_low']:+.4f}, "
                                  f"{v['ci_high']:+.4f}]",
                        target="> 0 (toward the Assistant)", mode=v["mode"], kind=v["kind"], key=key,
                        measure_valid=None if validity is None else validity["valid"],
                        ci=[v["ci_low"], v["ci_high"]], ci_of="the shift", null=_edit_null_text(v, controls)))
    for key, v in controls.items():
        band = (f"; band of {v['n_directions']} directions [{v['band_low']:+.4f}, {v['band_high']:+.4f}]"
                if "band_low" in v else "")
        out.append(dict(metric="kv_edit_control_shift_ci", value=f"[{v['ci_low']:+.4f}, {v['ci_high']:+.4f}]",
                        unit="nats per token (identity log-odds shift, 95% CI)",
                        reference=f"unedited cache; {v['control']}: direct edit, strength {v['strength']} "
                                  f"({v['kind']}), layers {v['layers']}, n={v['n']} conversation x probe units, "
                                  f"model {cfg.model}, seed {cfg.seed}; shift {v['logodds_shift']:+.4f}{band}",
                        target="contains 0", control=v["control"], kind=v["kind"], key=key, ci_low=v["ci_low"],
                        ci_high=v["ci_high"], ci=[v["ci_low"], v["ci_high"]], ci_of="the control's shift",
                        null="0: a control edit should not move the identity"
                             + (f"; random directions' band [{v['band_low']:+.3f}, {v['band_high']:+.3f}]"
                                if "band_low" in v else "")))
        for name, d in v.get("assistant_minus_user", {}).items():
            out.append(_assistant_vs_user_record(v, name, d, cfg))
    return out
