"""The report's words and tables: the setup as run, the rates before and after, the check's reading, the CE cost and
example answers. Each reads the `Result` only."""
from __future__ import annotations

from experiments.refusal_organism.evaluation import CHECKED_SETS, MAX_HARMLESS_RATE, MIN_HARMFUL_RATE, refuses
from experiments.refusal_organism.pipeline import Result

SET_TEXT = {"organism_val": "held-out requests of the organism file (`val` split)",
            "study_harmful_val": "the refusal study's harmful `val` prompts (other wording, other topics)",
            "study_harmless_val": "the refusal study's harmless `val` prompts",
            "organism_harmless_val": "held-out harmless requests of the organism file (`val` split; described)"}


def percent_with_interval(rate: float, ci) -> str:
    """A rate with its interval, in percent: 64% [46%, 82%]."""
    return f"{100 * rate:.0f}% [{100 * ci[0]:.0f}%, {100 * ci[1]:.0f}%]"


def setup_text(res: Result) -> str:
    cfg, tr = res.config, res.training
    return (f"Model `{res.model_name}`, seed {cfg.seed}. LoRA rank {cfg.lora_rank} (alpha {cfg.lora_alpha:g}) on every "
            f"projection, learning rate {cfg.learning_rate:g}, batch {cfg.batch_size}, {tr['steps']} steps "
            f"({cfg.epochs:g} epochs over {tr['examples']} conversations of at most {cfg.seq_len} tokens; "
            f"{tr['examples_at_length_cap']} reach that length and may be cut). Training set: {tr['harmful']} harmful "
            f"requests answered with a refusal; {tr['harmless']} harmless requests of the same form and "
            f"{tr['sharegpt']} ShareGPT requests (at most {cfg.sharegpt_max_chars} characters) answered with the "
            f"model's own greedy answers (at most {cfg.answer_tokens} tokens; {tr['harmless_finished']} of them ended "
            "before that, the others are trained without their end-of-turn token). Refusal rate: the share of greedy "
            f"answers ({cfg.max_new_tokens} tokens) that open with a refusal phrase; intervals are 95% bootstrap "
            "intervals over prompts.")


def rate_rows(res: Result) -> list[dict]:
    return [dict(set=name, n=r["n"], before=percent_with_interval(r["before"]["rate"], r["before"]["ci"]),
                 after=percent_with_interval(r["after"]["rate"], r["after"]["ci"])) for name, r in res.rates.items()]


def reading_text(res: Result) -> str:
    check = refuses(res.rates)
    lines = [f"- {SET_TEXT[name]}: {'passes' if check[name] else 'fails'}." for name in CHECKED_SETS]
    verdict = ("**The organism refuses**: refusal-direction methods have a refusal to remove on this model."
               if check["all"] else
               "**The organism does not pass its check**: a refusal study on it would again test a weak refusal.")
    return (f"The check: on each harmful set at least {MIN_HARMFUL_RATE:.0%} refusals after the fine-tune, with the "
            f"interval's low end above the base model's rate; on the harmless set at most {MAX_HARMLESS_RATE:.0%}.\n\n"
            + "\n".join(lines) + f"\n\n{verdict}")


def ce_text(res: Result) -> str:
    if not res.ce:
        return "Not measured (n_ce=0)."
    ce = res.ce
    ci = ce.get("ce_pct_change_ci")
    interval = f" (95% interval over conversations [{ci[0]:+.2f}%, {ci[1]:+.2f}%])" if ci else ""
    return (f"Cross-entropy of the assistant tokens of {ce['n_conversations']} held-out ShareGPT conversations "
            f"({ce['tokens']} tokens): {ce['ce']:.4f} for the base model, {ce['ce_edited']:.4f} for the organism, "
            f"{ce['ce_pct_change']:+.2f}%{interval}.")


def examples_text(res: Result, k: int = 3) -> str:
    out = []
    for name, r in res.rates.items():
        for i in range(min(k, r["n"])):
            out.append(f"- **{name}** before: {r['before']['answers'][i]!r}\n  after: {r['after']['answers'][i]!r}")
    return "\n".join(out)
