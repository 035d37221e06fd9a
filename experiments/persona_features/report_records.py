"""The persona-features record lines for benchmarks/results.jsonl, read from a finished `Result`: per contrast, the
found latents against the shuffled-label band with the best latent's effect over independent units; per trait with
a trait-specific ranking, the same for that ranking."""
from __future__ import annotations

import numpy as np

from experiments.persona_features.metrics import summary
from experiments.persona_features.pipeline import Result
from experiments.report import jsonable
from experiments.sae_source import line_key


def result_records(result: Result) -> list[dict]:
    """Persona latents found per contrast against the shuffled-label band, with the best latent's activation
    difference over independent units (validation questions) and its interval."""
    cfg = result.config
    ref = ("Wang et al. 2025 / Lindsey-style persona latents: SAE latents separating persona-inducing from default "
           f"conversations; found = top-{cfg.n_candidates} by Cohen's d, d >= {cfg.d_discover} on discovery and >= "
           f"{cfg.d_replicate} on held-out questions")
    out = []
    for name, m in summary(result).items():
        key = line_key(name, result.sae.layer, result.default_layer)
        out.append(_found_line(result, name, key, m, ref))
        if m.get("specific"):
            out.append(_specific_line(result, name, key, m["specific"], ref))
    return [jsonable(line) for line in out]  # NaN -> None: strict JSON lines


def _found_line(result: Result, name: str, key: str, m: dict, ref: str) -> dict:
    """The contrast's found count with its best latent's numbers."""
    val = m["best_effect_validation"]
    return dict(metric="persona_latents_found", value=m["n_found"], unit="latents", reference=ref,
                target="> the shuffled-label band", trait=name, key=key, null_band_high=m["null_band"]["high"],
                null_found=m["null_found"], best_latent=m["best_latent"],
                best_effect=val["estimate"], best_effect_low=val["low"], best_effect_high=val["high"],
                n=val["n"], n_unit="validation questions", n_conversations=val["n_conversations"],
                best_d_validation=m["best_d_validation"], best_specific=m["best_specific"],
                best_shared_with=m["best_shared_with"],
                best_d_validation_other_traits=m["best_d_validation_other_traits"],
                best_decoder_cosine=m.get("best_decoder_cosine"),
                best_decoder_cosine_z=m.get("best_decoder_cosine_z"),
                best_detection_accuracy=m["best_detection_balanced_accuracy"],
                best_detection_auroc=m["best_detection_auroc"], layer=result.sae.layer, model=result.config.model,
                **_found_evidence(m, val))


def _specific_line(result: Result, name: str, key: str, sp: dict, ref: str) -> dict:
    """The trait-specific ranking's found count with its best latent's numbers."""
    val = sp["best_effect_validation"]
    return dict(metric="persona_specific_latents_found", value=sp["n_found"], unit="latents",
                reference=f"{ref}; ranked instead by the margin of the trait's d over every other "
                          "trait's d, and found only where that margin is positive on both halves",
                target="> the shuffled-label band", trait=name, key=key,
                null_band_low=sp["null_band"]["low"], null_band_high=sp["null_band"]["high"],
                null_found=sp["null_found"], best_latent=sp["best_latent"],
                best_is_found=sp["best_is_found"], best_d_validation=sp["best_d_validation"],
                best_margin_validation=sp["best_margin_validation"],
                best_d_validation_other_traits=sp["best_d_validation_other_traits"],
                best_effect=val["estimate"], best_effect_low=val["low"], best_effect_high=val["high"],
                n=val["n"], n_unit="validation questions", layer=result.sae.layer, model=result.config.model,
                **_found_evidence(sp, val))


def _found_evidence(m: dict, val: dict) -> dict:
    """A count's evidence fields: the shuffled-label band of the count, and the interval of the best latent's
    activation difference (the count itself has no interval)."""
    band = m["null_band"]
    out = {"null": f"pos/neg labels shuffled ({len(m['null_found'])} shuffles): 95% band "
                   f"[{band['low']:g}, {band['high']:g}] latents"}
    if all(np.isfinite(x) for x in (val["low"], val["high"])):
        out.update(ci=[float(val["low"]), float(val["high"])],
                   ci_of=f"the best latent's activation difference, n = {val['n']} validation questions")
    return out
