"""The feature-steering record lines for benchmarks/results.jsonl, read from a finished `Result`: per trait with a
random band, the best latent's effect on the judge-free score as a z against that band, with the effect, its
interval, the persona vector's z and the measure's validity, so that a line carries its own evidence gate."""
from __future__ import annotations

import numpy as np

from experiments.feature_steering.pipeline import Result
from experiments.feature_steering.trait_result import PERSONA_VECTOR, TraitSteering, is_evidence
from experiments.report import jsonable
from experiments.sae_source import line_key
from psm_jax.persona.stats import MIN_NULL_DRAWS, null_band

REFERENCE = ("Wang et al. 2025 / Kim et al. 2026: steering along an SAE latent's decoder row moves the behaviour; "
             "here against >= 20 random directions at matched norm, strengths matched by perplexity cost")


def result_records(result: Result) -> list[dict]:
    """Per trait: the best latent's effect on the judge-free score as a z against the random band at matched norm,
    with the effect, its interval, n, the persona vector's z and the measure's validity."""
    out = [_trait_line(result, name, r) for name, r in result.trait_results.items()
           if np.isfinite(r["edits"][r["best"]]["z"])]
    return [jsonable(line) for line in out]  # NaN -> None: strict JSON lines


def _trait_line(result: Result, name: str, r: TraitSteering) -> dict:
    cfg = result.config
    best, vec = r["edits"][r["best"]], r["edits"][PERSONA_VECTOR]
    effect = best["effect"]
    return dict(metric="feature_steering_effect_z", value=float(best["z"]), unit="z (random band)",
                reference=REFERENCE, target="> 1.96 with a valid measure", trait=name,
                key=line_key(name if cfg.ranking == "contrast" else f"{name}/{cfg.ranking}", result.sae_layer,
                             result.default_sae_layer),
                ranking=cfg.ranking, measure="judge-free answer score", measure_valid=bool(r["validity"]["valid"]),
                validity_effect=r["validity"]["effect"], evidence=is_evidence(r),
                latent=r["latents"][0], strength=best["strength"], ppl_ratio=best["ppl_ratio"],
                effect=effect["estimate"], effect_low=effect["low"], effect_high=effect["high"], n=int(effect["n"]),
                n_random=int(np.isfinite(r["random_effects"]).sum()),
                vector_z=float(vec["z"]), vector_effect=vec["effect"]["estimate"], layer=result.sae_layer,
                model=cfg.model, ci=[effect["low"], effect["high"]],
                ci_of=f"the latent's effect (score change), n = {int(effect['n'])} questions",
                null=_random_null_text(r["random_effects"]))


def _random_null_text(effects) -> str:
    """The random directions' band of effects, the reference of the z."""
    finite = np.asarray(effects, float)
    finite = finite[np.isfinite(finite)]
    if finite.size < MIN_NULL_DRAWS:
        return f"none: {finite.size} random directions, fewer than a band needs ({MIN_NULL_DRAWS})"
    band = null_band(finite)
    return (f"{finite.size} random directions at matched norm and strength: effects' 95% band "
            f"[{band['low']:+.3g}, {band['high']:+.3g}] (z = 0 is their mean)")
