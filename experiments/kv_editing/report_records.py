"""The KV-editing study's lines for benchmarks/results.jsonl, read from a finished `Result`: the identity measure's
validity check, each axis edit's shift and each control's, with their reference, target and null."""
from __future__ import annotations

from experiments.kv_editing.config import Config
from experiments.kv_editing.pipeline import Result
from experiments.kv_editing.report_text import ASSISTANT_TOKENS
from psm_jax.persona.kv_identity import control_shifts, identity_shifts, identity_validity


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
        out += _control_records(key, v, cfg)
    return out


def _control_records(key: str, v: dict, cfg: Config) -> list[dict]:
    """One control's interval line, then (for the user-token control) its paired comparisons with the
    assistant-token edits."""
    band = (f"; band of {v['n_directions']} directions [{v['band_low']:+.4f}, {v['band_high']:+.4f}]"
            if "band_low" in v else "")
    out = [dict(metric="kv_edit_control_shift_ci", value=f"[{v['ci_low']:+.4f}, {v['ci_high']:+.4f}]",
                unit="nats per token (identity log-odds shift, 95% CI)",
                reference=f"unedited cache; {v['control']}: direct edit, strength {v['strength']} "
                          f"({v['kind']}), layers {v['layers']}, n={v['n']} conversation x probe units, "
                          f"model {cfg.model}, seed {cfg.seed}; shift {v['logodds_shift']:+.4f}{band}",
                target="contains 0", control=v["control"], kind=v["kind"], key=key, ci_low=v["ci_low"],
                ci_high=v["ci_high"], ci=[v["ci_low"], v["ci_high"]], ci_of="the control's shift",
                null="0: a control edit should not move the identity"
                     + (f"; random directions' band [{v['band_low']:+.3f}, {v['band_high']:+.3f}]"
                        if "band_low" in v else ""))]
    return out + [_assistant_vs_user_record(v, name, d, cfg) for name, d in v.get("assistant_minus_user", {}).items()]
