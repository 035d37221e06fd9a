"""Step 4: the layer chosen by a measure on its selection half, the steering curve on its held-out half with the
fluency cost and the random-direction control, and steered generations to read."""
from __future__ import annotations

import numpy as np

from experiments.persona_vectors.config import Config
from experiments.persona_vectors.trait_result import MeasureSteering, SteeredExample
from psm_jax.persona import measures, rollouts
from psm_jax.persona.measures import Validity
from psm_jax.persona.prompts import trait_system_prompt
from psm_jax.persona.stats import monotonic
from psm_jax.persona.steering import (ContrastPairs, above_random_band, band_or_skip, perplexity_ratios, select_layer,
                                      steering_curve, steering_fn, steering_vector)


def default_sweep_layers(n_layers: int) -> tuple[int, ...]:
    lo, hi = n_layers // 5, (4 * n_layers) // 5
    step = max(1, round(n_layers / 7))
    layers = tuple(range(lo, min(hi, n_layers - 1) + 1, step))
    return layers or (n_layers // 2,)


def steer_with_measure(model, sel: ContrastPairs, held: ContrastPairs, direction, scales, layers, rand_units, cfg,
                       validity: Validity | None, fluency: tuple) -> MeasureSteering:
    """Layer chosen on the selection half, the steering curve on the held-out half with its perplexity ratios and
    monotonicity, and the random-direction band at the curve's ends (only for a measure that passed its validity
    check). `fluency`: (prompts, answers), the model's own unsteered answers whose perplexity prices each point."""
    coefs = tuple(sorted(cfg.coefficients))
    cmax = max(abs(c) for c in coefs)
    sweep = select_layer(model, sel, direction, scales, layers, cfg.select_coef)
    best = sweep["chosen_layer"]
    curve = steering_curve(model, held, direction, scales, best, coefs)
    ppl = perplexity_ratios(model, *fluency, [c * steering_vector(direction, scales, best) for c in coefs], best,
                            batch_size=cfg.batch_size)
    control = band_or_skip(model, held, rand_units, best, float(scales[best]), cmax, cfg.band_measures, validity)
    norm = float(np.linalg.norm(np.asarray(direction)[best]))
    mono = monotonic(coefs, curve, ppl, max_ppl_ratio=cfg.max_ppl_ratio)
    control["vector_effect"] = float(curve[-1] - curve[0])
    mono["outside_band"] = above_random_band(control["vector_effect"], control)
    mono["increasing_within_ceiling_outside_band"] = bool(mono["increasing_within_ceiling"] and mono["outside_band"])
    return {"layer": best, "coefs": list(coefs), "measure": curve, "n_units": len(held), "ppl_ratio": ppl,
            "monotonic": mono, "random_control": control,
            "layer_sweep": sweep, "validity": validity, "unit_norm": float(scales[best]), "coef_unit": cfg.coef_unit,
            "raw_vector_norm_in_units": norm / float(scales[best])}


def steered_examples(model, trait, direction, scales, layer: int, cfg: Config) -> list[SteeredExample]:
    """Greedy answers to the first evaluation questions steered at `layer`, each with its judge-free trait score
    (the unsteered model's per-token likelihood under the first positive minus the first negative system prompt)."""
    questions = list(trait.evaluation_questions[:cfg.n_steer_examples])
    vector = steering_vector(direction, scales, layer)
    examples = []
    for c in cfg.steer_example_coefs:
        out = rollouts.generate_responses(model, [[{"role": "user", "content": q}] for q in questions],
                                          max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                                          batch_size=len(questions), edits_fn=steering_fn(model, vector, layer, float(c)))
        examples += [{"coef": float(c), "question": q, "response": o.response} for q, o in zip(questions, out)]
    pair0 = trait.instruction_pairs[0]
    pos_sys, neg_sys = (trait_system_prompt(trait.name, pol, getattr(pair0, pol)) for pol in ("pos", "neg"))
    scorable = [e for e in examples if e["response"]]
    if scorable:
        scores = measures.answer_trait_score(model, [e["question"] for e in scorable], [e["response"] for e in scorable],
                                             pos_sys, neg_sys, batch_size=cfg.batch_size)
        for e, sc in zip(scorable, scores):
            e["trait_score"] = float(sc)
    return examples
