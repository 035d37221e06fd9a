"""The refusal study's lines for benchmarks/results.jsonl, read from a finished `Result`: the log-odds drop under
ablation and the rise when the direction is added, the KL the ablation costs, the score's validity check and the CE
cost, each with its reference, target and null."""
from __future__ import annotations

import numpy as np

from experiments.refusal.pipeline import Result
from experiments.refusal.report_text import drop_null, kl_null, mean, rise_null
from psm_jax.persona.refusal import VALIDITY_MIN_PER_SIDE
from psm_jax.persona.stats import bootstrap_ci


def _null_draws(res: Result, key: str) -> dict:
    """Each null's draws of `key`, rounded, as record fields (e.g. random_drops, shuffled_drops)."""
    return {f"{name}_{key}": [round(float(x), 4) for x in null[key]] for name, null in res.nulls.items()}


def _validity_fields(res: Result) -> dict:
    """`measure_valid` for a log-odds record line: the score's check, or None where it could not run."""
    return {"measure_valid": None if res.validity is None else res.validity["valid"]}


def _prompt_ci(diff: np.ndarray, seed: int) -> dict:
    """A 95% bootstrap interval over held-out prompts (the independent units) of a per-prompt difference."""
    ci = bootstrap_ci(np.asarray(diff, np.float64), seed=seed)
    return {"ci": [round(ci["low"], 4), round(ci["high"], 4)], "n": ci["n"]}


def _reference(res: Result) -> str:
    """The shared start of the log-odds lines' reference: the model, the selected direction and the prompts."""
    cfg, sel = res.config, res.selected
    return (f"{cfg.model}; direction = diff-in-means resid_pre L{sel['layer']} offset {sel['offset']} "
            f"({sel['token']}), selection tier {res.selection_tier}; {cfg.n_eval} held-out harmful prompts, "
            f"seed {cfg.seed}")


def _kl_target(res: Result) -> str:
    """The KL line's target: the fixed rules' threshold, or none under the matched-damage rule."""
    if res.config.selection_rule == "matched_damage":
        return "none (the matched-damage rule selects without a KL threshold)"
    return f"<= {res.config.kl_threshold:g} (the selection rule's threshold)"


def _logodds_records(res: Result) -> list[dict]:
    """The drop under ablation, the rise when the direction is added and the ablation's KL cost, each with its
    interval over prompts and its nulls' bands and draws."""
    cfg, ref, logodds = res.config, _reference(res), res.heldout_logodds
    rise = logodds["harmless_induced"] - logodds["harmless_base"]
    return [dict(metric="refusal_logodds_drop", value=round(res.logodds_drop, 4),
                 unit="nats (mean refusal log-odds, baseline - ablated)",
                 reference=ref + "; Arditi et al. 2024: ablation removes refusal",
                 target="> 0 and above the random band",
                 null=drop_null(res), **_null_draws(res, "drops"), **_validity_fields(res),
                 **_prompt_ci(logodds["harmful_base"] - logodds["harmful_ablated"], cfg.seed)),
            dict(metric="refusal_induce_rise", value=round(float(np.mean(rise)), 4),
                 unit="nats (mean refusal log-odds, induced - baseline, harmless prompts)",
                 reference=ref.replace("harmful prompts", "harmful and harmless prompts")
                 + "; Arditi et al. 2024: adding the direction induces refusal", target="> 0 and above the random band",
                 null=rise_null(res), **_null_draws(res, "rises"), **_validity_fields(res),
                 **_prompt_ci(rise, cfg.seed)),
            dict(metric="refusal_ablation_kl", value=round(mean(res.ablation_kl), 4),
                 unit="nats (mean KL(unedited || ablated) of the next token after held-out harmless prompts)",
                 reference=ref.replace("harmful prompts", "harmless prompts")
                 + "; Arditi et al. 2024 select directions with KL < 0.1 on harmless prompts",
                 target=_kl_target(res), null=kl_null(res),
                 **_null_draws(res, "kls"), **_prompt_ci(res.ablation_kl, cfg.seed))]


def _validity_record(res: Result) -> dict:
    """The refusal score's AUROC for the held-out prompts whose greedy answer refuses, with its interval."""
    cfg, v = res.config, res.validity
    return dict(metric="refusal_score_validity", value=round(v["estimate"], 4),
                unit="AUROC of the unedited refusal log-odds for the held-out prompts whose answer refuses",
                reference=f"{cfg.model}; {v['n']} held-out prompts (both sides), {v['n_pos']} greedy answers "
                          f"with a refusal marker; seed {cfg.seed}",
                target=f"interval above 0.5, with >= {VALIDITY_MIN_PER_SIDE} answers on each side",
                null="0.5 (a score unrelated to whether the answer refuses)",
                ci=[round(v["low"], 4), round(v["high"], 4)], n=v["n"], enough=v["enough"], valid=v["valid"])


def _ce_record(res: Result) -> dict:
    """The cross-entropy cost of the ablation on held-out chat, with its interval over conversations."""
    cfg, ce = res.config, res.chat_ce
    return dict(metric="refusal_ce_change", value=round(ce["ce_pct_change"], 4), unit="% (CE ablated vs baseline)",
                reference=f"{cfg.model}; {ce['n_conversations']} held-out ShareGPT conversations, "
                          f"{ce['tokens']} assistant tokens; CE {ce['ce']:.4f} -> {ce['ce_edited']:.4f}; "
                          "Arditi et al. 2024: gemma-2b-it Pile CE 3.506 -> 3.503", target="< 2",
                null="none: a cost, read against its target", n=ce["n_conversations"],
                **({"ci": [round(x, 4) for x in ce["ce_pct_change_ci"]]} if "ce_pct_change_ci" in ce else {}))


def result_records(res: Result) -> list[dict]:
    """The refusal log-odds drop under ablation (and its rise on harmless prompts when the direction is added), each
    with its interval over prompts, the ablation's KL cost, the score's validity check and the cross-entropy cost."""
    return (_logodds_records(res) + ([_validity_record(res)] if res.validity is not None else [])
            + ([_ce_record(res)] if res.chat_ce else []))
