"""The noise ceiling of a finished `psm persona-vectors` run's within-polarity monitoring r.

    .venv/bin/python benchmarks/monitoring_ceiling.py reports/persona_vectors_full_q20 [--record]

Monitoring correlates, across the graded system prompts, the last-prompt projection onto a trait's vector with the
response-likelihood measure under each prompt. Within one polarity most prompts are written at the same stated
level, so they may differ by little more than noise; then no monitor, however good, shows a high r. This script
asks how much of that r is reachable: for each trait of the run it rebuilds the main monitoring from the saved
vectors (`persona_vectors.monitoring_from_vectors`: the same greedy answers, held-out reference units and
per-prompt measure as the run, all greedy) at the run's steering layer and at its extraction-data layer, checks
that the rebuilt within-polarity r equals the report's (otherwise it stops: the rebuild would not be the run), and
gives each series' within-polarity split-half reliability and the ceiling they set (`stats.attenuation_ceiling`).
With --record one line per (trait, layer), `persona_monitor_within_ceiling`, keyed `<trait>/<steering|rule>`, goes
to benchmarks/results.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

COMMAND = ".venv/bin/python benchmarks/monitoring_ceiling.py"
R_TOLERANCE = 1e-6  # rebuilt and reported r must agree this closely (both are greedy computations)


def monitoring_layers(trait_metrics: dict) -> dict[str, int]:
    """{"steering": layer, "rule": layer} of one trait's response-measure monitoring in a run's metrics.json (the
    rule layer only where the run fixed one)."""
    rm = trait_metrics.get("response_measure")
    if not rm:
        raise ValueError("the run has no response-likelihood measure; expected a persona-vectors run with "
                         "response_measure=true")
    layers = {"steering": int(rm["layer"])}
    if rm.get("rule_monitoring"):
        layers["rule"] = int(rm["rule_monitoring"]["layer"])
    return layers


def reported_within_r(trait_metrics: dict, name: str) -> float:
    """The run's own within-polarity r at the layer called `name`."""
    rm = trait_metrics["response_measure"]
    mon = rm if name == "steering" else rm["rule_monitoring"]
    return float(mon["monitor_within_polarity"]["pooled_within"]["estimate"])


def check_rebuild(trait: str, name: str, rebuilt: float, reported: float) -> None:
    if not abs(rebuilt - reported) <= R_TOLERANCE:
        raise RuntimeError(f"{trait} at the {name} layer: rebuilt within-polarity r {rebuilt:.6f} differs from the "
                           f"report's {reported:.6f}; expected equal (same model, config and code as the run)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", type=Path, help="a persona-vectors report folder (metrics.json, config.json, vectors)")
    ap.add_argument("--traits", nargs="+", help="only these traits of the run")
    ap.add_argument("--record", action="store_true", help="append lines to benchmarks/results.jsonl")
    args = ap.parse_args(argv)

    import psm_jax
    from experiments import persona_vectors as pv
    from psm_jax.persona.prompts import load_traits
    from psm_jax.records import record

    for name in ("metrics.json", "config.json"):
        if not (args.report / name).is_file():
            raise SystemExit(f"{str(args.report / name)!r} does not exist; expected a persona-vectors report folder")
    metrics = json.loads((args.report / "metrics.json").read_text())
    cfg = pv.Config(**json.loads((args.report / "config.json").read_text()))
    model = psm_jax.load(cfg.model)
    traits = {t.name: t for t in load_traits(cfg.traits)}  # shipped names or the run's own trait files
    for trait_name in args.traits or metrics["traits"]:
        t0 = time.time()
        if trait_name not in metrics["traits"]:
            raise SystemExit(f"trait {trait_name!r} is not in the run; expected one of {list(metrics['traits'])}")
        tm = metrics["traits"][trait_name]
        layers = monitoring_layers(tm)
        direction = pv.load_persona_vectors(args.report / f"vectors_{trait_name}.safetensors", model)[0]["response_avg"]
        rebuilt = pv.monitoring_from_vectors(model, traits[trait_name], cfg, direction, layers)
        for name, mon in rebuilt.items():
            pw = mon["monitor_within_polarity"]["pooled_within"]
            check_rebuild(trait_name, name, pw["estimate"], reported_within_r(tm, name))
            rel = mon["within_reliability"]
            print(f"{trait_name} {name} L{layers[name]}: within r {pw['estimate']:.3f}; reliability measure "
                  f"{rel['measure']['reliability']:.3f}, projection {rel['projection']['reliability']:.3f}; "
                  f"ceiling {rel['ceiling']:.3f} ({time.time() - t0:.0f} s)", flush=True)
            if args.record:
                record("persona_monitor_within_ceiling", round(rel["ceiling"], 4), "pearson r",
                       f"{cfg.model}; {args.report}; within-polarity split-half reliability (units split at random, "
                       f"{rel['measure']['n_splits']} splits, Spearman-Brown) of the response measure over "
                       f"{rel['measure']['n_units']} held-out units and of the last-prompt projection over "
                       f"{rel['projection']['n_units']} questions, {rel['measure']['n_rows']} prompts; ceiling = "
                       "sqrt of their product", target="informational: compare with the within-polarity r",
                       command=f"{COMMAND} {args.report} --record", trait=trait_name, layer=layers[name],
                       layer_rule=name, within_r=pw["estimate"], ci=[pw["low"], pw["high"]],
                       measure_reliability=rel["measure"]["reliability"],
                       projection_reliability=rel["projection"]["reliability"], seed=cfg.seed,
                       key=f"{trait_name}/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
