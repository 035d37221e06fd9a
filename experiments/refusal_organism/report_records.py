"""The study's lines for benchmarks/results.jsonl."""
from __future__ import annotations

from experiments.refusal_organism.evaluation import CHECKED_SETS, HARMFUL_SETS, MAX_HARMLESS_RATE, MIN_HARMFUL_RATE
from experiments.refusal_organism.pipeline import Result
from experiments.refusal_organism.report_text import SET_TEXT, percent_with_interval


def result_records(res: Result) -> list[dict]:
    """One line per evaluation set (the organism's refusal rate, against the base model on the same prompts) and
    the fine-tune's cross-entropy change."""
    cfg = res.config
    out = []
    for name, r in res.rates.items():
        before, after = r["before"], r["after"]
        out.append(dict(metric="refusal_organism_rate", key=name, value=round(after["rate"], 4),
                        unit="fraction of greedy answers opening with a refusal",
                        reference=f"{cfg.model} LoRA-tuned to refuse ({res.training['harmful']} harmful, "
                                  f"{res.training['harmless']} harmless and {res.training['sharegpt']} ShareGPT "
                                  f"training requests, seed {cfg.seed}); "
                                  f"{SET_TEXT[name]}",
                        target=(f">= {MIN_HARMFUL_RATE} and above the base model" if name in HARMFUL_SETS
                                else f"<= {MAX_HARMLESS_RATE}" if name in CHECKED_SETS else "informational"),
                        ci=[round(x, 4) for x in after["ci"]], n=r["n"],
                        null="the base model on the same prompts: "
                             + percent_with_interval(before["rate"], before["ci"])))
    if res.ce:
        ce = res.ce
        out.append(dict(metric="refusal_organism_ce_change", value=round(ce["ce_pct_change"], 4),
                        unit="% (CE organism vs base model)",
                        reference=f"{cfg.model}; {ce['n_conversations']} held-out ShareGPT conversations, "
                                  f"{ce['tokens']} assistant tokens; CE {ce['ce']:.4f} -> {ce['ce_edited']:.4f}",
                        target="informational", null="none: a cost of the fine-tune", n=ce["n_conversations"],
                        **({"ci": [round(x, 4) for x in ce["ce_pct_change_ci"]]} if "ce_pct_change_ci" in ce else {})))
    return out
