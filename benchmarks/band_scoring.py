"""A band of edit sets scored on the packaged SmolLM2 (fp32): the shape of capping's random-cap control and of a
steering sweep at one layer, where every set edits only the upper layers.

Records, against a reference measured in the same run on the same answers:
  band_scoring_over_separate   `rollouts.score_options_band` (the layers below the lowest edited one run once per
                               batch, only the upper layers per edit set) answers/s / `rollouts.score_options` called
                               once per edit set (every layer per set).
Workload: the evil trait's 24 two-choice items under the first SYSTEMS graded system prompts, both options of
each item, under SETS caps (a floor on the projection along an i.i.d. random unit direction per layer) at layers
LAYERS of the model. The two scorers must agree within 1e-3 nats per answer or nothing is recorded.

Usage: .venv/bin/python benchmarks/band_scoring.py [--reps N] [--sets N] [--no-record]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.model_forward import best_time  # noqa: E402
from benchmarks.record import record  # noqa: E402
from benchmarks.scoring import workload  # noqa: E402

BATCH = 12  # prompts per forward
SYSTEMS = 2
LAYERS = (0.6, 0.85)  # the capped layers as fractions of the depth (capping's default range)


def cap_fns(model, n_sets: int, seed: int = 0) -> tuple[list, list[int]]:
    """`n_sets` edits_fns, each a floor at 0 on the projection along random unit directions at the capped layers."""
    from psm_jax import edits as E

    c = model.config
    layers = list(range(int(LAYERS[0] * c.n_layers), int(LAYERS[1] * c.n_layers)))
    dirs = np.random.default_rng(seed).normal(size=(n_sets, c.n_layers, c.d_model)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    edits = [E.clamp(c, d, layers=layers, floor=0.0) for d in dirs]
    return [lambda batch, e=e: (e,) for e in edits], layers


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--sets", type=int, default=8)
    ap.add_argument("--no-record", action="store_true", help="print the line instead of appending it")
    args = ap.parse_args()
    import psm_jax
    from psm_jax.persona.rollouts import score_options, score_options_band

    m = psm_jax.load("smollm2-135m-instruct")
    prompts, answers = workload()
    n_items = len(prompts) // 2 * SYSTEMS // 5  # workload() pairs every item with 5 system prompts; keep SYSTEMS
    prompts, options = prompts[:2 * n_items:2], list(zip(answers[:2 * n_items:2], answers[1:2 * n_items:2]))
    fns, layers = cap_fns(m, args.sets)
    values = {}
    runs = {"band": lambda: score_options_band(m, prompts, options, fns, batch_size=BATCH),
            "separate": lambda: np.stack([score_options(m, prompts, options, batch_size=BATCH, edits_fn=f)
                                          for f in fns])}
    secs = {k: best_time(lambda k=k, f=f: values.__setitem__(k, f()), args.reps) for k, f in runs.items()}
    worst = float(np.max(np.abs(values["band"] - values["separate"])))
    if worst > 1e-3:
        raise SystemExit(f"band and separate scoring disagree: max |diff| {worst:.2e} nats; expected <= 1e-3")
    n = values["band"].size
    rate = {k: n / s for k, s in secs.items()}
    line = dict(metric="band_scoring_over_separate", value=round(rate["band"] / rate["separate"], 3),
                unit="x (answers/s ratio)",
                reference=(f"score_options once per edit set {rate['separate']:.1f} answers/s vs score_options_band "
                           f"{rate['band']:.1f} answers/s; {args.sets} random caps at layers {layers[0]}-{layers[-1]} "
                           f"of {m.config.n_layers}; {len(prompts)} prompts x 2 options per set, {BATCH} prompts per "
                           f"forward, best of {args.reps}; max |diff| {worst:.1e} nats"),
                target=">= 1.5")
    if args.no_record:
        print(line)
    else:
        record(**line)


if __name__ == "__main__":
    main()
