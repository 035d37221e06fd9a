"""Persona features in an SAE: discover, describe and label the latents that carry personas.

    psm features --out reports/persona_features seed=0                    # the middle layer, 3 traits
    psm features --preset quick --out runs/pf_quick                       # a smoke run
    psm features sae=runs/my_sae_saelens --out runs/pf                    # an existing SAE (SAELens / run dir)

Pipeline (persona-methods.md section 5; sae/features does the computing, sae/features/discovery.py the statistics):

1. SAE: loaded (`sae=`: a SAELens folder or an sae.train run dir) or, with `sae=none`, trained by
   `prepare` (the cache step `experiments.study.execute` runs before `run`) with the SAE trainer
   (sae.train) on a ShareGPT harvest (sae.data.store.harvest_to_store) of resid_post at the middle
   layer (TopK, d_sae 4608, k 32 by default); the harvest and the run are cached under `sae_cache`
   and resumed, so re-runs reuse them. `run` itself writes nothing.
2. Trait contrast: for every trait, conversations under the positive ("You are an evil assistant.
   {pos}") and negative ("You are a helpful assistant. {neg}") system prompts of `n_pairs`
   instruction pairs x `n_questions` extraction questions; responses sampled at `temperature`.
   Each conversation's mean latent activation over its assistant tokens is the unit of analysis.
   The questions are split in two halves: latents are *ranked* on the discovery half (Cohen's d of
   pos vs neg) and *checked* on the validation half (new questions, new samples). A latent counts as
   "found" when it is among the top `n_candidates` by discovery d, with discovery d >= `d_discover`
   and validation d >= `d_replicate` (thresholds fixed in the config before looking). As a null, the
   same rule is applied with the pos/neg labels shuffled (seeded) in both halves, `n_shuffles` times
   (a band). The headline interval is over independent units: per validation question, the best
   latent's mean activation under the positive minus the negative prompts.
2b. Trait-specific latents (with two or more traits): the same halves, but latents ranked by their margin, the
   trait's own discovery d minus the largest other trait's d; found when the margin is positive on both halves,
   own d passes both thresholds and the latent is in the top `n_candidates` by margin. The null shuffles this
   trait's labels (the shuffles of step 2) while the other traits keep theirs. The plain ranking finds what every
   persona prompt shares; this one asks for what one trait does not share with the others.
3. Role contrast: role-play system prompts (sampled roles) vs the default prompts (the Assistant),
   with the same split and rule ("role latents": more active when the model plays a role).
4. Directions: the persona vector of each trait at the SAE's layer (mean response activation pos -
   neg) and the Assistant Axis there (default - roles); latents ranked by decoder cosine with them,
   and the top candidates' cosine with the persona vector compared with random unit directions'.
5. Model diffing: the persona vector added at an earlier layer (`diff_layer_offset` below the SAE's
   layer) while the model reads neutral conversations; latents ranked by their activation increase
   on assistant tokens (what the steering switches on).
6. Records for the candidates (top contrast, role, cosine and diff latents) over a context corpus
   (a ShareGPT slice disjoint from the SAE's training slice, plus the trait and role conversations
   generated above): density, per-role firing rates, top / quantile / random contexts, decoder top
   tokens. Labels from the local explainer and detection scores from the local scorer (SmolLM2-135M:
   expect labels of little use and detection near chance; `--explainer openai` / `--scorer openai`
   use an OpenAI-compatible endpoint from PSM_LABEL_BASE_URL / PSM_LABEL_MODEL).
7. Outputs (written by `report`): report.md, metrics.json, config.json, plots, latents.jsonl
   (sae/labelling.py schema), features.html (static browser), candidates.json (what feature-steering
   consumes), the persona directions as safetensors; the SAE in SAELens format with labels.json
   under `sae_cache`.

SmolLM2-135M is a weak model, explainer and judge: the claims here rest on the contrast statistics
(replication on held-out questions, a shuffled-label null), not on the labels.
"""
from __future__ import annotations

from experiments.persona_features.config import PRESETS, Config
from experiments.persona_features.sae_step import (HARVEST_FIELDS, TRAINING_FIELDS, load_sae, prepare, sae_layer,
                                                   sae_run_dir, sae_store_dir, train_sae, training_corpus,
                                                   training_role_prompts)
from experiments.persona_features.rows import role_rows, trait_rows
from experiments.persona_features.ranking import best_latent, contrast_block, specific_blocks
from experiments.persona_features.contrasts import role_contrast, trait_contrasts
from experiments.persona_features.directions import decoder_cosines, steered_diffs
from experiments.persona_features.latents import latent_records
from experiments.persona_features.pipeline import Result, run
from experiments.persona_features.metrics import candidates, summary
from experiments.persona_features.report_folder import write_report as report
from experiments.persona_features.report_records import result_records as records

__all__ = ["Config", "PRESETS", "run", "Result", "report", "records", "prepare", "load_sae", "train_sae",
           "sae_layer", "sae_store_dir", "sae_run_dir", "HARVEST_FIELDS", "TRAINING_FIELDS", "training_role_prompts",
           "training_corpus", "trait_rows", "role_rows", "contrast_block", "best_latent",
           "specific_blocks", "trait_contrasts", "role_contrast", "decoder_cosines", "steered_diffs",
           "latent_records", "candidates", "summary"]
