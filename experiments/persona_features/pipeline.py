"""The study's computation (`run`): the trait and role contrasts with their nulls, the trait-specific ranking, the
persona directions against the decoder, model diffing and the candidate latents' records, gathered into a `Result`.
It writes nothing, so that a run can be checked before any report exists; `report` writes."""
from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from experiments.persona_features.config import Config
from experiments.persona_features.contrasts import role_contrast, trait_contrasts
from experiments.persona_features.directions import decoder_cosines, steered_diffs
from experiments.persona_features.latents import latent_records
from experiments.persona_features.ranking import specific_blocks
from experiments.persona_features.sae_step import load_sae
from experiments.sae_source import default_sae_layer
from sae import features as F


@dataclasses.dataclass
class Result:
    """Everything the report folder and the record lines read, so that writing them needs no model."""

    config: Config
    sae: F.FeatureSae
    sae_info: dict  # source, format, training facts; params / scfg for the SAELens export
    results: dict  # trait -> contrast results
    specific: dict  # trait -> trait-specific ranking (`specific_blocks`; empty with one trait)
    roles: dict  # role-vs-default contrast results
    directions: dict  # name -> [D] (persona vectors, assistant_axis)
    latent_records: list  # sae.features.label records of the candidate latents (labels, examples, detection)
    density: np.ndarray  # firing density of every latent over the context corpus
    n_context_docs: int
    n_generated: int
    context_tokens: int
    seconds: float
    default_layer: int  # the study's default SAE layer on this model (n_layers // 2): record keys name any other


def run(config: Config, model, progress=None, *, sae: F.FeatureSae | None = None) -> Result:
    """Compute the study (no files): the contrasts, their nulls, directions, model diffing and the latent records.
    The SAE comes from `sae` or from config.sae (`prepare` fills it when the SAE is trained here)."""
    from psm_jax.persona.prompts import load_traits

    cfg, t_start = config, time.time()
    say = progress or (lambda msg: None)
    bars = progress is not None
    sae_info: dict = {"source": "given", "trained_here": False, "sae_cfg": None}
    if sae is None:
        sae, sae_info = load_sae(model, cfg)
    model.config.check_layer(sae.layer, "SAE layer")
    say(f"SAE {sae.describe()}")
    key = jax.random.key(cfg.seed)
    results = trait_contrasts(model, sae, load_traits(cfg.traits), cfg, key, say, bars)
    specific = specific_blocks(results, cfg)
    for name, spec in specific.items():
        say(f"trait {name}: trait-specific latents found {spec['n_found']} (null band {spec['null_band']['low']:g}.."
            f"{spec['null_band']['high']:g})")
    role_res, rrows, axis = role_contrast(model, sae, cfg, key, say, bars)
    directions = {name: res["vector"] for name, res in results.items()} | {"assistant_axis": axis}
    decoder_cosines(sae.W_dec, results, role_res, directions, cfg)
    if cfg.diff and sae.layer - cfg.diff_layer_offset >= 0:
        neutral = [r["conversation"] for r in rrows if r["group"] == "default"]
        steered_diffs(model, sae, results, neutral, cfg, say)
    all_convs = [r["conversation"] for res in results.values() for r in res["rows"]] + [r["conversation"]
                                                                                        for r in rrows]
    records, ctx, n_ctx_docs = latent_records(model, sae, cfg, results, specific, role_res, all_convs, say, bars)
    return Result(config=cfg, sae=sae, sae_info=sae_info, results=results, specific=specific, roles=role_res,
                  directions=directions, latent_records=records, density=ctx.table.density(), n_context_docs=n_ctx_docs,
                  n_generated=len(all_convs), context_tokens=len(ctx.table), seconds=time.time() - t_start,
                  default_layer=default_sae_layer(model.config.n_layers))
