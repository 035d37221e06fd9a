"""How reproducible the `finetune` study's persona vector is, measured on disjoint extraction questions.

    .venv/bin/python benchmarks/finetune_vector_reliability.py [--block 5] [--traits evil ...] [--record]

The fine-tuning study makes each trait's vector from greedy answers to its first `n_extract_questions` extraction
questions (`experiments.finetune.persona_vector`) and reports the vector's split-half reliability: the cosine a
vector from *other* questions of the same number is expected to share with it. This script measures that cosine
directly for a vector made from `--block` questions (default 5, the study's extraction size before it was found
too small this way). It extracts from all of a trait's extraction questions once, cuts them into disjoint blocks of
`--block` questions, and takes the cosine between every two blocks' vectors. Beside it: the
split-half prediction made inside each block (what the study would report), the prediction for a vector from all
the questions, and the largest cosine between that all-question vector and another trait's.

With --record one line per trait, `finetune_vector_disjoint_cosine`, keyed `<trait>/<pairs>x<block>`, goes to
benchmarks/results.jsonl. The blocks share the model and the instruction pairs, so the block pairs are not
independent units; the line gives their mean, minimum and maximum, not an interval.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

COMMAND = ".venv/bin/python benchmarks/finetune_vector_reliability.py"


def block_comparison(pos, neg, question, block: int, seed: int = 0) -> dict:
    """Disjoint blocks of `block` consecutive question indices: the cosines between every two blocks' mean-difference
    vectors, each block's own split-half prediction, and the prediction for all the questions together."""
    from psm_jax.persona.directions import cosine, mean_difference, split_half_cosine

    n_questions = int(question.max()) + 1
    if block < 2 or 2 * block > n_questions:
        raise ValueError(f"block={block}; expected 2 <= block <= {n_questions // 2} so that two disjoint blocks fit "
                         f"in {n_questions} questions")
    blocks = [np.arange(b * block, (b + 1) * block) for b in range(n_questions // block)]
    rows = [np.isin(question, qs) for qs in blocks]
    vectors = [mean_difference(pos[r], neg[r]) for r in rows]
    cosines = [cosine(a, b) for a, b in itertools.combinations(vectors, 2)]
    predicted = [split_half_cosine(pos[r], neg[r], question[r], question[r], seed=seed)["predicted"] for r in rows]
    whole = split_half_cosine(pos, neg, question, question, seed=seed)
    return {"measured": float(np.mean(cosines)), "measured_min": float(np.min(cosines)),
            "measured_max": float(np.max(cosines)), "predicted": float(np.mean(predicted)),
            "predicted_all": float(whole["predicted"]), "n_blocks": len(blocks), "n_questions": n_questions,
            "vector_all": mean_difference(pos, neg)}


def largest_cross_trait(results: dict) -> dict:
    """For each trait, the largest cosine between its all-question vector and another trait's (None alone)."""
    from psm_jax.persona.directions import cosine

    return {name: max((cosine(r["vector_all"], o["vector_all"]) for other, o in results.items() if other != name),
                      default=None) for name, r in results.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--traits", nargs="+", default=["evil", "sycophantic", "humorous"])
    ap.add_argument("--block", type=int, default=5, help="questions per block")
    ap.add_argument("--record", action="store_true", help="append one line per trait to benchmarks/results.jsonl")
    args = ap.parse_args(argv)

    import psm_jax
    from experiments import finetune as F
    from psm_jax.persona.datasets import load_trait
    from psm_jax.records import record

    model = psm_jax.load(args.model)
    base = F.Config(model=args.model)
    block = args.block
    layer = model.config.n_layers // 2 if base.layer is None else base.layer
    results = {}
    for name in args.traits:
        trait = load_trait(name)
        cfg = F.Config(model=args.model, n_extract_questions=len(trait.extraction_questions))
        pos, neg, question = F.extraction_activations(model, trait, layer, cfg)
        results[name] = block_comparison(np.asarray(pos, np.float64), np.asarray(neg, np.float64), question, block,
                                         seed=cfg.seed)
        r = results[name]
        print(f"{name}: disjoint {block}-question vectors share cosine {r['measured']:.3f} (range "
              f"{r['measured_min']:.3f}-{r['measured_max']:.3f}, {r['n_blocks']} blocks); split-half prediction "
              f"{r['predicted']:.3f}; prediction from all {r['n_questions']} questions {r['predicted_all']:.3f}",
              flush=True)
    cross = largest_cross_trait(results)
    for name, r in results.items():
        print(f"{name}: largest cross-trait cosine (all questions) {cross[name]}")
        if args.record:
            record("finetune_vector_disjoint_cosine", round(r["measured"], 4), "cosine",
                   reference=f"{args.model}; layer {layer} resid_post; greedy answers, {base.n_extract_pairs} "
                             f"instruction pairs; mean over pairs of {r['n_blocks']} disjoint blocks of {block} "
                             "extraction questions (not independent: one model, the same pairs)",
                   target="near the split-half prediction (the study's reliability is calibrated)",
                   command=COMMAND + ("" if args.block == 5 else f" --block {args.block}"),
                   key=f"{name}/{base.n_extract_pairs}x{block}", trait=name, layer=layer,
                   measured_min=round(r["measured_min"], 4), measured_max=round(r["measured_max"], 4),
                   predicted=round(r["predicted"], 4), predicted_all=round(r["predicted_all"], 4),
                   n_questions_all=r["n_questions"],
                   largest_cross_trait_cosine=None if cross[name] is None else round(cross[name], 4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
