"""The study's numbers read from a finished `Result`: per contrast, the headline of metrics.json and the record lines
(`summary`), and candidates.json, what feature steering reads (`candidates`). Both name each contrast's best latent
by the same rule (`ranking.best_latent`), so the report, the records and feature steering speak of one latent."""
from __future__ import annotations

from experiments.persona_features.pipeline import Result
from experiments.persona_features.ranking import best_latent
from sae.features.discovery import latent_specificity


def candidates(result: Result, export_dir) -> dict:
    """candidates.json, what feature steering reads: the SAE's source, the best latent per trait and its candidates
    (under "specific": the same for the trait-specific ranking), the role latents and every persona-related
    latent."""
    by_latent = {r["latent"]: r for r in result.latent_records}
    out = {"sae": {**result.sae.describe(), "source": result.sae_info.get("source"),
                   "saelens_export": str(export_dir) if export_dir else None}, "traits": {}, "roles": {}}
    for name, res in result.results.items():
        best = best_latent(res)
        out["traits"][name] = {
            "best": best, "best_is_found": bool(res["found"]), "found": res["found"],
            "candidates": [c["latent"] for c in res["candidates"]],
            "typical_norm": res["typical_norm"], "max_act": by_latent[best]["max_act"],
            "label": by_latent[best]["label"]}
        spec = result.specific.get(name)
        if spec:
            out["traits"][name]["specific"] = {
                "best": spec["best"], "best_is_found": bool(spec["found"]), "found": spec["found"],
                "candidates": [c["latent"] for c in spec["candidates"]],
                "max_act": by_latent[spec["best"]]["max_act"], "label": by_latent[spec["best"]]["label"]}
    role_res = result.roles
    out["roles"] = {"best": best_latent(role_res), "found": role_res["found"],
                    "candidates": [c["latent"] for c in role_res["candidates"]]}
    out["persona_latents"] = sorted({c["latent"] for res in [*result.results.values(), *result.specific.values(),
                                                             role_res] for c in res["candidates"]})
    return out


def summary(result: Result) -> dict:
    """Per contrast (each trait, then role-vs-default): the headline numbers of metrics.json and the record lines."""
    by_latent = {r["latent"]: r for r in result.latent_records}
    contrasts = list(result.results.items()) + [("role-vs-default", result.roles)]
    spec = latent_specificity({name: res["d_validation"] for name, res in contrasts},
                              {name: best_latent(res) for name, res in contrasts}, list(result.results),
                              result.config.d_replicate)
    out = {}
    for name, res in contrasts:
        best = best_latent(res)
        m = _contrast_summary(res, best, by_latent.get(best, {}), spec[name])
        if name in result.results:
            m.update(_direction_summary(res, best))
        if name in result.specific:
            m["specific"] = _specific_summary(result.specific[name])
        out[name] = m
    return out


def _contrast_summary(res: dict, best: int, rec: dict, spec: dict) -> dict:
    """One contrast's found count against its band, its best latent's d on both halves, unit-level effects,
    detection and label, and whether that latent is specific to the contrast (`spec`: `latent_specificity`)."""
    det = rec.get("detection") or {}
    val = res["best_effect"]["validation"]
    return {"n_found": res["n_found"], "found": res["found"], "null_found": res["null_found"],
            "null_band": res["null_band"], "best_latent": best,
            "best_d_discovery": float(res["d_discovery"][best]), "best_d_validation": float(res["d_validation"][best]),
            "best_effect_validation": val, "best_effect_discovery": res["best_effect"]["discovery"],
            "best_detection_balanced_accuracy": det.get("balanced_accuracy"),
            "best_detection_auroc": det.get("auroc"), "best_label": rec.get("label"),
            "halves_correlation": res["halves_correlation"], "n_conversations": res["n"],
            "best_d_validation_other_traits": spec["d_validation_other_traits"],
            "best_shared_with": spec["shared_with"], "best_specific": spec["specific"]}


def _direction_summary(res: dict, best: int) -> dict:
    """A trait's persona vector against the decoder: its norm, the best latent's cosine against the random band, the
    overlap of the contrast's and the cosine's top latents and, where it ran, the model diffing's."""
    cb = res["cosine_band"]
    m = dict(vector_norm=res["vector_norm"], typical_norm=res["typical_norm"],
             cosine_rank_of_best=res["cosine_rank_of_best"], best_decoder_cosine=cb["cosines"].get(best),
             best_decoder_cosine_z=cb["z"].get(best), cosine_band=cb["band"],
             candidates_outside_cosine_band=cb["outside"], n_candidates=cb["n"],
             overlap_contrast_cosine_top=res["overlap_contrast_cosine_top"], overlap_n=res["overlap_n"])
    if res.get("diff"):
        m["diff_overlap_top20"] = res["diff"]["overlap_top20_with_contrast"]
        m["diff_rank_of_best"] = res["diff"]["rank_of_candidates"].get(best)
    return m


def _specific_summary(spec: dict) -> dict:
    """The trait-specific ranking's headline: found count against its shuffled band, and its best latent."""
    best = next(c for c in spec["candidates"] if c["latent"] == spec["best"])
    return {"n_found": spec["n_found"], "found": spec["found"], "null_found": spec["null_found"],
            "null_band": spec["null_band"], "best_latent": spec["best"], "best_is_found": bool(spec["found"]),
            "best_d_validation": best["d_validation"], "best_margin_validation": best["margin_validation"],
            "best_d_validation_other_traits": best["d_validation_other_traits"],
            "best_effect_validation": spec["best_effect_validation"]}
