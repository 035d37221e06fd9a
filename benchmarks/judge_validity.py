"""The local judge's validity check on the extraction answers of a finished `psm persona-vectors` run.

    .venv/bin/python benchmarks/judge_validity.py reports/persona_vectors_extraction_q20_seed0 [--record]

A judge is a measure like any other: its trait score of the answers sampled under a trait's positive system prompt
should exceed its score of those sampled under the negative one. For each trait of the run this reads the
extraction answers the run saved (`responses.jsonl`, kind "extraction"), scores each with the judge the study
would use (`judge.make_judge`, with the study's answer prefix), and applies the study's own check
(`persona_vectors.judge_validity`: per extraction question, the mean score of the positive answers minus the
negative ones, 95% interval over questions). The study filters its pairs by the judge only where this passes.
With --record one line per trait, `persona_judge_validity_effect`, goes to benchmarks/results.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

COMMAND = ".venv/bin/python benchmarks/judge_validity.py"


def extraction_rows(lines, trait: str) -> list[dict]:
    """The run's extraction answers of one trait as rows for `judge_validity` (question text as the unit)."""
    rows = [{"question": x["question"], "polarity": x["polarity"], "response": x["response"]}
            for x in lines if x.get("kind") == "extraction" and x.get("trait") == trait]
    if not rows:
        raise ValueError(f"no extraction answers of trait {trait!r} in the run; expected a persona-vectors "
                         "responses.jsonl")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", type=Path, help="a persona-vectors report folder (config.json, responses.jsonl)")
    ap.add_argument("--judge", default="local", choices=("local", "openai"))
    ap.add_argument("--record", action="store_true", help="append lines to benchmarks/results.jsonl")
    args = ap.parse_args(argv)

    import psm_jax
    from experiments import persona_vectors as pv
    from psm_jax.persona import measures
    from psm_jax.persona.judge import make_judge
    from psm_jax.persona.prompts import load_traits
    from psm_jax.records import record

    for name in ("config.json", "responses.jsonl"):
        if not (args.report / name).is_file():
            raise SystemExit(f"{str(args.report / name)!r} does not exist; expected a persona-vectors report folder")
    cfg = pv.Config(**json.loads((args.report / "config.json").read_text()))
    lines = [json.loads(x) for x in (args.report / "responses.jsonl").read_text().splitlines() if x.strip()]
    model = psm_jax.load(cfg.model)
    judge = (make_judge("local", model, answer_prefix=cfg.judge_answer_prefix, batch_size=8)
             if args.judge == "local" else make_judge("openai"))
    for trait in load_traits(cfg.traits):
        t0 = time.time()
        rows = extraction_rows(lines, trait.name)
        scores = judge.score_many([(r["question"], r["response"]) for r in rows], rubric=trait.judge_rubric)
        check = pv.judge_validity(rows, scores)
        n_scored = sum(s is not None for s in scores)
        print(f"{trait.name}: {measures.validity_text(check)}; {n_scored}/{len(rows)} answers scored "
              f"({time.time() - t0:.0f} s)", flush=True)
        if args.record:
            record("persona_judge_validity_effect", round(check["effect"], 4),
                   "judge points (0-100 trait score, positive minus negative answers)",
                   f"{args.judge} judge on {cfg.model}'s extraction answers of {args.report} ({n_scored} of "
                   f"{len(rows)} scored); per extraction question, 95% bootstrap interval over {check['n']} questions",
                   target="ci_low > 0", command=f"{COMMAND} {args.report} --record", trait=trait.name,
                   judge=args.judge, ci_low=check["low"], ci_high=check["high"], valid=check["valid"],
                   seed=cfg.seed, key=trait.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
