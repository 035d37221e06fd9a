"""Refusal's ablation drop against null directions of matched damage, from finished `psm refusal` reports.

    .venv/bin/python benchmarks/refusal_matched_null.py reports/refusal_organism_study [...] [--record]

Ablating any direction everywhere damages a small model, and the damage moves the refusal score too: on a refusal
organism random unit directions cost a KL of 0.02-1.1 on harmless prompts and label-shuffled difference-in-means
directions up to 8, with refusal drops to match. So the bands of all null directions are bands of damage. This
script reads each report's `metrics.json` (the selected direction's drop and KL, and every null direction's) and
compares the drop only with the null directions whose KL lies within a factor of 2 of the selected one's
(`refusal.matched_damage_null`): the rank p of the drop among them. With --record one line per report,
`refusal_drop_matched_damage_p`, goes to benchmarks/results.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def report_numbers(folder: Path) -> dict:
    """The drop, its KL and the pooled null directions' drops and KLs of one report (ValueError if it has none)."""
    m = json.loads((folder / "metrics.json").read_text())
    if not m.get("nulls") or not m.get("ablation_kl"):
        raise ValueError(f"{folder}: metrics.json has no null directions with their KL; expected a report of the "
                         "refusal study with n_random or n_shuffled > 0")
    from psm_jax.persona.refusal import pooled_nulls

    drops, kls = pooled_nulls(m["nulls"])
    return {"drop": m["refusal_logodds_drop"], "kl": m["ablation_kl"]["mean"], "model": json.loads(
                (folder / "config.json").read_text()).get("model", "?"),
            "null_drops": drops, "null_kls": kls, "kinds": {k: len(n["drops"]) for k, n in m["nulls"].items()}}


def main(argv=None) -> int:
    from psm_jax.persona.refusal import matched_damage_null
    from psm_jax.records import record

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    for folder in args.reports:
        r = report_numbers(folder)
        res = matched_damage_null(r["drop"], r["kl"], r["null_drops"], r["null_kls"])
        print(json.dumps({"report": str(folder), "drop": r["drop"], "kl": r["kl"], **res}))
        if args.record:
            pooled = " + ".join(f"{n} {k}" for k, n in r["kinds"].items())
            record("refusal_drop_matched_damage_p", round(res["p"], 4),
                   "rank p of the ablation drop among null directions of matched KL", reference=(
                       f"{r['model']}; {folder}: drop {r['drop']:+.3f} at KL {r['kl']:.4f}; {res['n_matched']} of "
                       f"{len(r['null_kls'])} null directions ({pooled}) within a factor {res['factor']:g} of that "
                       f"KL, {res['n_at_least']} of them dropping refusal at least as much"),
                   target="<= 0.1 with >= 9 matched directions", n=res["n_matched"], enough=res["enough"],
                   key=folder.name, model=r["model"],
                   null=f"the drops of the {res['n_matched']} matched null directions (max "
                        + ("none" if res["matched_max_drop"] is None else f"{res['matched_max_drop']:+.3f}") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
