"""Validity of the shipped two-choice trait items on a model: does the trait's positive system prompt move the
items toward the trait choice, compared with its negative system prompt?

    .venv/bin/python benchmarks/trait_items_validity.py                         # evil, sycophantic, humorous
    .venv/bin/python benchmarks/trait_items_validity.py --traits evil --no-record --no-write

For each trait and each instruction pair, every item is scored (`measures.two_choice`: per-token
log P(trait answer) - per-token log P(other answer)) under the pair's positive and its negative system prompt
(`prompts.trait_system_prompt`). The unit is the item (its value averaged over the instruction pairs); the check
is `measures.validity` over items: the mean positive-minus-negative effect with a 95% bootstrap interval, valid
when the interval lies above 0.

With --write the result is stored in each trait file's `behavioural_validity` block (model, effect, interval,
n, valid), which the loader exposes as `Trait.behavioural_validity` and `Trait.items_are_evidence(model)`: a study
uses the items as evidence only on a model where this check passed. With --record one line per trait,
`trait_items_validity_effect`, goes to benchmarks/results.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

COMMAND = ".venv/bin/python benchmarks/trait_items_validity.py"
DEFAULT_TRAITS = ("evil", "sycophantic", "humorous")


def trait_validity(model, trait) -> dict:
    """The item-level validity check of one trait over all its instruction pairs (see the module docstring)."""
    import numpy as np

    from psm_jax.persona import measures
    from psm_jax.persona.prompts import trait_system_prompt

    items = list(trait.behavioural_items)
    per_pair = {pol: [] for pol in ("pos", "neg")}
    for pair in trait.instruction_pairs:
        for pol in per_pair:
            system = trait_system_prompt(trait.name, pol, getattr(pair, pol))
            per_pair[pol].append(measures.two_choice(model, items, system=system, batch_size=16))
    pos, neg = (np.mean(per_pair[p], axis=0) for p in ("pos", "neg"))
    check = measures.validity(pos, neg)
    return {**check, "mean_pos": float(pos.mean()), "mean_neg": float(neg.mean()),
            "pairs": len(trait.instruction_pairs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--traits", nargs="+", default=list(DEFAULT_TRAITS), help="shipped trait names or trait files")
    ap.add_argument("--no-record", action="store_true", help="do not append lines to benchmarks/results.jsonl")
    ap.add_argument("--no-write", action="store_true", help="do not store the result in the trait files")
    args = ap.parse_args(argv)

    import psm_jax
    from psm_jax.atomic import atomic_write_text
    from psm_jax.persona import datasets, measures
    from psm_jax.records import record

    model = psm_jax.load(args.model)
    for name in args.traits:
        t0 = time.time()
        trait = datasets.load_trait(name)
        res = trait_validity(model, trait)
        print(f"{trait.name}: {measures.validity_text(res)}; mean under pos {res['mean_pos']:+.3f}, "
              f"under neg {res['mean_neg']:+.3f} ({time.time() - t0:.0f} s)", flush=True)
        block = {"model": args.model, "effect": round(res["effect"], 4), "low": round(res["low"], 4),
                 "high": round(res["high"], 4), "n": res["n"], "valid": res["valid"], "pairs": res["pairs"],
                 "command": COMMAND}
        if not args.no_write:
            src = Path(trait.source)
            data = json.loads(src.read_text())
            data["behavioural_validity"] = [b for b in data.get("behavioural_validity", [])
                                            if b.get("model") != args.model] + [block]
            atomic_write_text(src, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        if not args.no_record:
            record("trait_items_validity_effect", round(res["effect"], 4),
                   "nats per token (two-choice log-odds, positive minus negative system prompt)",
                   f"{args.model}; {res['n']} items x {res['pairs']} instruction pairs; 95% bootstrap over items",
                   target="ci_low > 0", command=COMMAND, trait=trait.name, ci_low=round(res["low"], 4),
                   ci_high=round(res["high"], 4), valid=res["valid"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
