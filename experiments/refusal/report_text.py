"""The sentences of the refusal report: the setup, the baseline refusal and the score's validity, the ablation's
effect against its nulls and its cost, and example answers, each read from a finished run, so the folder and record
writers (`report_folder`, `report_records`) only arrange them."""
from __future__ import annotations

import numpy as np

from experiments.refusal.config import Config
from experiments.refusal.pipeline import Result
from psm_jax.persona.refusal import (MATCH_FACTOR, MIN_MATCHED, VALIDITY_MIN_PER_SIDE, Prompts, matched_damage_null,
                                     pooled_nulls)
from psm_jax.persona.stats import bootstrap_ci, null_band, pearson, ranks

NULL_NAMES = {"random": "random directions",
              "shuffled": "label-shuffled difference-in-means directions (same position and layer)"}


def mean(x) -> float:
    """The mean as a plain float, for report text, tables, metrics.json and record lines."""
    return float(np.mean(x))


def candidate_name(row: dict) -> str:
    """How the report names a candidate: template token (offset) / layer."""
    return f"{row['token']!s} ({row['offset']}) / L{row['layer']}"


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


def drop_null(res: Result) -> str:
    return _band_null(res, "drops", "(unit norm) ablated the same way")


def rise_null(res: Result) -> str:
    return _band_null(res, "rises", f"at the direction's norm added at L{res.selected['layer']}")


def kl_null(res: Result) -> str:
    return _band_null(res, "kls", "(unit norm) ablated the same way")


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


def setup_text(res: Result) -> str:
    """The report's Setup section: the prompts, the refusal score and rate, the filtering, the candidates and the
    selection rules, so the numbers below can be read without the code."""
    c, L, offsets = res.config, res.n_layers, res.position_offsets
    ids, strings, layers = res.score_token_ids, res.score_token_strings, list(res.candidate_layers)
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
{list(res.markers.score_tokens)} with and without a leading space: ids {ids} = {strings}.
Refusal rate = fraction of greedy answers ({c.max_new_tokens} new tokens) containing any refusal marker
(substring check; a prefix-only variant is reported alongside).

Filtering of train prompts by score sign: {'on' if c.filter_train else 'off'}; {_filter_text(c, res.filtering)}

Post-instruction positions (offsets from the prompt end): {dict(zip(offsets.tolist(), res.position_tokens))}.
Candidates evaluated: positions {res.candidate_offsets} x layers {layers} = {len(res.candidate_indices)} candidates
(difference in means is computed and saved for all {len(offsets)} positions x {L} layers).
{selection_rule_text(res)}
Unsteered val means: harmful {res.harmful_val_logodds:.3f}, harmless {res.harmless_val_logodds:.3f}.
Selection tier used: **{res.selection_tier}**{fallback_text}
"""


def selection_rule_text(res: Result) -> str:
    """The rule that picked the direction, as configured."""
    c, L = res.config, res.n_layers
    if c.selection_rule == "matched_damage":
        return (f"Selection (matched damage): {c.n_random_selection} random unit directions (key seed + 3) ablated "
                f"on the val prompts; each candidate's val drop (harmful val mean - its bypass) is read against "
                f"those whose val KL lies within a factor {MATCH_FACTOR:g} of its own, z = (drop - their mean) / "
                f"their sd. Dropped: layer >= {c.max_layer_frac} * {L}, induce < the unsteered harmless val mean, "
                f"fewer than {MIN_MATCHED} matched directions; the largest z wins (no KL threshold).")
    return (f"Selection: drop layer >= {c.max_layer_frac} * {L}, KL > {c.kl_threshold}, induce < "
            f"{c.induce_threshold}; lowest bypass wins.")


def baseline_text(harmful_rate: float, induced_rate: float) -> str:
    """What the ablation result can mean given how often the model refuses harmful prompts unedited."""
    text = (f"The unedited model refuses {harmful_rate:.0%} of the held-out harmful prompts (substring check, no "
            f"judge); adding the direction to harmless prompts (the induce condition) gives {induced_rate:.0%}. ")
    if harmful_rate < 0.2:
        return text + ("It barely refuses at baseline, so the ablation result is a capability null (there is little "
                       "refusal to remove), not a replication of the paper's bypass.")
    return text + "The log-odds drop under ablation below is read against that baseline."


def validity_text(res: Result) -> str:
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


def ablation_text(res: Result) -> str:
    """The report's Ablation effect section: the log-odds drop, the weight-edit check and the CE cost."""
    c, logodds, ce = res.config, res.heldout_logodds, res.chat_ce
    harmful, ablated = logodds["harmful_base"], logodds["harmful_ablated"]
    orth_diff = res.orthogonalized_max_logit_diff
    return f"""
Mean refusal log-odds drop on held-out harmful prompts: **{res.logodds_drop:.3f} nats**
({mean(harmful):.3f} -> {mean(ablated):.3f}); lower for {float(np.mean(ablated < harmful)):.0%} of the prompts.
Null: {drop_null(res)}.
Adding the direction to the held-out harmless prompts raises their refusal log-odds by
**{mean(logodds['harmless_induced'] - logodds['harmless_base']):.3f} nats**; null: {rise_null(res)}.
{_damage_text(res)}
Weight orthogonalisation (embedding, o_proj, down_proj; untied unembedding) vs runtime ablation:
max |logit difference| at the last position over {len(res.heldout_harmful)} prompts = {orth_diff:.3g};
refusal log-odds with orthogonalised weights {mean(res.orthogonalized_logodds):.3f}.
""" + (f"""
{_ce_text(c, ce)}
""" if ce else "")


def kl_target(res: Result) -> str:
    """What the ablation's KL is held to: the fixed rules' threshold, or nothing under the matched-damage rule."""
    if res.config.selection_rule == "matched_damage":
        return "no threshold: the matched-damage rule selected it"
    return f"the selection rule's threshold is {res.config.kl_threshold:g}"


def selection_damage_text(res: Result) -> str:
    """Under the matched-damage rule: the winner's val drop against its matched val null directions."""
    if res.selection_nulls is None:
        return ""
    s = res.selected
    return (f"On the val prompts the selected direction drops refusal by {s['drop']:+.3f} at KL {s['kl']:.4f}; "
            f"{s['n_matched']} of the {len(res.selection_nulls['kls'])} val random directions match that KL "
            f"(z = {s['matched_z']:+.2f}, rank p = {s['matched_p']:.3f}). These prompts chose the direction, so this "
            "is not a test; the held-out nulls below are.")


def _damage_text(res: Result) -> str:
    """What the ablation costs where refusal is not wanted (the selection rule's KL, on the held-out harmless
    prompts), against the nulls' costs, and how the nulls' drops follow their costs."""
    ci = bootstrap_ci(res.ablation_kl, seed=res.config.seed)
    text = (f"The ablation costs KL **{ci['estimate']:.4f} nats** on the next token after the held-out harmless "
            f"prompts (95% interval over prompts [{ci['low']:.4f}, {ci['high']:.4f}]; {kl_target(res)}); null: "
            f"{kl_null(res)}.")
    for name, null in res.nulls.items():
        text += (f" Over the {NULL_NAMES[name]}, the rank correlation of drop with KL is "
                 f"{_rank_r(null['drops'], null['kls']):+.2f}.")
    if res.nulls and ci["estimate"] > 0:
        m = matched_damage_null(res.logodds_drop, ci["estimate"], *pooled_nulls(res.nulls))
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


def examples_text(res: Result) -> str:
    """Greedy answers to a few held-out prompts, so the rates can be checked against the text itself."""
    answers = res.heldout_answers
    return "\n".join(
        _answer_pairs(res.heldout_harmful, 6, answers["harmful_base"].answers, answers["harmful_ablated"].answers,
                      "ablated")
        + _answer_pairs(res.heldout_harmless, 4, answers["harmless_base"].answers,
                        answers["harmless_induced"].answers, "+direction"))
