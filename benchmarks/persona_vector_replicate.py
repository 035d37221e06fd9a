"""How far two runs of `psm persona-vectors` that differ in their seed agree on the vectors themselves.

    .venv/bin/python benchmarks/persona_vector_replicate.py reports/persona_vectors_full reports/persona_vectors_seed1

For each trait in both runs: the cosine between the two runs' response-average vectors at the trait's steering layer
in the first run (its `specificity.layers` entry, else its chosen layer; `--layers-from` takes them from another
run), beside the largest cosine, at that layer and within either run, between the trait's vector and another
trait's. A vector is *stable across seeds* when its seed cosine exceeds that largest cross-trait cosine: the
sampling noise of extraction then moves it less than the distance to a different trait.

Each line also carries both runs' own split-half predictions of that cosine (`predicted_first`,
`predicted_second`; `persona_vectors.reliability_metrics`) where the runs made them, and is keyed by trait and
extraction size (instruction pairs x questions x samples). Two random unit vectors of width d have cosine within
+-1.96/sqrt(d) 95% of the time; that band is stated in each line's reference. With --record one line per trait,
`persona_vector_seed_cosine`, goes to benchmarks/results.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

COMMAND = ".venv/bin/python benchmarks/persona_vector_replicate.py"


def _metrics(folder: Path) -> dict:
    """metrics.json of one persona-vectors report folder."""
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{str(metrics_path)!r} does not exist; expected a persona-vectors report folder")
    return json.loads(metrics_path.read_text())


def _run(folder: Path) -> tuple[dict, dict]:
    """(metrics.json, {trait: response_avg vectors [n_layers, d]}) of one persona-vectors report folder."""
    from experiments.report import load_vectors

    metrics = _metrics(folder)
    vectors = {name: load_vectors(folder / f"vectors_{name}.safetensors")[0]["response_avg"]
               for name in metrics["traits"]}
    return metrics, vectors


def _predicted(metrics: dict, trait: str, layer: int) -> float | None:
    """The run's own split-half prediction of a rerun's cosine at `layer` (None for a run made without it)."""
    rel = (metrics.get("vector_reliability") or {}).get(trait)
    return None if rel is None else float(rel["predicted_by_layer"][layer])


def extraction_size(folder: Path) -> str:
    """"<pairs>x<questions>x<samples>" of a run's config.json: how many answer pairs made each vector."""
    cfg = json.loads((folder / "config.json").read_text())
    return f"{cfg['n_pairs']}x{cfg['n_questions']}x{cfg['n_samples']}"


def steering_layers(metrics: dict) -> dict[str, int]:
    """Each trait's steering layer in a run: the specificity matrix's layer, else the chosen layer."""
    spec = metrics.get("specificity") or {}
    if spec.get("traits"):
        return dict(zip(spec["traits"], (int(x) for x in spec["layers"])))
    return {name: int(t["chosen_layer"]) for name, t in metrics["traits"].items()}


def compare(first: Path, second: Path, layers_from: Path | None = None) -> list[dict]:
    """Per trait present in both runs: its layer, seed cosine, largest cross-trait cosine and whether it is stable.
    The layers are the first run's steering layers, or those of the run in `layers_from`."""
    from psm_jax.persona.directions import cosine

    metrics_a, vecs_a = _run(first)
    metrics_b, vecs_b = _run(second)
    layers = steering_layers(metrics_a if layers_from is None else _metrics(layers_from))
    out = []
    for name in [t for t in vecs_a if t in vecs_b]:
        layer = layers[name]
        seed_cos = cosine(vecs_a[name][layer], vecs_b[name][layer])
        cross = [cosine(vecs[name][layer], vecs[other][layer])
                 for vecs in (vecs_a, vecs_b) for other in vecs if other != name]
        largest = max(cross, default=float("nan"))
        out.append(dict(trait=name, layer=layer, seed_cosine=seed_cos, largest_cross_trait_cosine=largest,
                        width=int(vecs_a[name].shape[1]), stable=bool(cross) and seed_cos > largest,
                        predicted_first=_predicted(metrics_a, name, layer),
                        predicted_second=_predicted(metrics_b, name, layer)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("first", type=Path, help="report folder of the reference run (its layers are used)")
    ap.add_argument("second", type=Path, help="report folder of the replicate run")
    ap.add_argument("--layers-from", type=Path, help="report folder whose steering layers are used (default: first)")
    ap.add_argument("--record", action="store_true", help="append one line per trait to benchmarks/results.jsonl")
    args = ap.parse_args(argv)
    rows = compare(args.first, args.second, args.layers_from)
    if not rows:
        raise SystemExit(f"no trait is in both {str(args.first)!r} and {str(args.second)!r}")
    size = extraction_size(args.first)
    for r in rows:
        print(json.dumps(r))
        if args.record:
            from psm_jax.records import record

            band = 1.96 / np.sqrt(r["width"])
            record("persona_vector_seed_cosine", round(r["seed_cosine"], 4), "cosine",
                   f"response-average vectors of {args.first} and {args.second} at layer {r['layer']}; largest "
                   f"cross-trait cosine {r['largest_cross_trait_cosine']:.3f}; random unit pairs +-{band:.3f} (95%)",
                   target="> largest cross-trait cosine",
                   command=f"{COMMAND} {args.first} {args.second}"
                           + (f" --layers-from {args.layers_from}" if args.layers_from else "") + " --record",
                   trait=r["trait"], key=f"{r['trait']}/{size}", extraction=size, layer=r["layer"],
                   stable=r["stable"], predicted_first=r["predicted_first"], predicted_second=r["predicted_second"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
