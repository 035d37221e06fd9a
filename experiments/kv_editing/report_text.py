"""The prose of the KV-editing report, read from the numbers: the setup of the run, the identity measure's validity,
the shifts against their targets and controls, and the sample answers and histories shown."""
from __future__ import annotations

from experiments.kv_editing.config import CONVERSATION_SETS, HISTORIES, KINDS, PERSONA_SOURCE
from experiments.kv_editing.pipeline import Result
from experiments.kv_editing.rows import ShownAnswers
from psm_jax.persona.kv_identity import MATCHED

ASSISTANT_TOKENS = {"all_tokens": "on every assistant token",
                    "matched_tokens": "on as many assistant tokens as there are user tokens (a seeded subset)"}


def validity_text(v: dict | None) -> str:
    """The validity section: the unedited log-odds after the Assistant's own history minus after the persona
    history, and whether the shifts can be read as moving the persona."""
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


def target_text(shifts: dict, controls: dict) -> str:
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


def setup_text(result: Result, histories: list[str]) -> str:
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


def samples_text(samples: list[ShownAnswers]) -> str:
    """The first sampled answers per shown condition, one line each, clipped to 120 characters."""
    return "\n".join(f"- {s.conversation} ({s.history}) / {s.mode} {s.kind} s={s.strength} L{s.layers}: "
                     + " | ".join(repr(t[:120]) for t in s.answers) for s in samples)


def histories_text(histories: dict) -> str:
    """The generated assistant turns per conversation, one line each, clipped to 160 characters per turn."""
    return "\n".join(f"- {k}: " + " | ".join(repr(t[:160]) for t in turns) for k, turns in histories.items())
