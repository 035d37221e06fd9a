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

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from experiments.report import atomic_write_json
from experiments.sae_source import default_sae_layer, load_feature_sae
from experiments.study import written_by
from psm_jax import edits as E
from psm_jax.persona import rollouts
from psm_jax.persona.directions import SITE, unit
from psm_jax.persona.stats import MIN_NULL_DRAWS, null_band
from sae import features as F
from sae.features.discovery import (DISCOVERY, VALIDATION, cosine_band, latent_specificity, mean_resid_norm,
                                    shuffled_contrasts, specific_contrast, split_contrast, unit_effect)
from sae.features import label as L


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m-instruct"
    layer: int | None = None  # None: n_layers // 2 (resid_post, the block output = HF hidden_states[layer + 1])
    sae: str | None = None  # SAELens folder / sae.train run dir; None: train (cached in sae_cache)
    sae_cache: str = "runs/persona_features_sae"
    train_tokens: int = 250_000
    train_docs: int = 4000  # ShareGPT conversations offered to the harvest (it stops at train_tokens)
    # fraction of those conversations that open with a role-play system prompt (`training_role_prompts`); 0 keeps
    # ShareGPT as it is
    train_role_prompts: float = 0.0
    train_steps: int = 600
    train_batch: int = 4096
    context_len: int = 256
    d_sae: int = 4608
    k: int = 32
    traits: tuple[str, ...] = ("evil", "sycophantic", "humorous")
    n_pairs: int = 5
    # extraction questions; first half discovery, second half validation. The validation questions are the
    # headline's independent units: every packaged question, so that the interval rests on 10 of them
    n_questions: int = 20
    n_samples: int = 2  # sampled responses per (pair, question, polarity)
    max_new_tokens: int = 48
    temperature: float = 1.0
    n_roles: int = 8
    role_instructions: int = 1
    role_questions: int = 6  # split in halves as above
    n_candidates: int = 10  # top latents per contrast considered (and recorded)
    d_discover: float = 0.8
    d_replicate: float = 0.5
    n_shuffles: int = 20  # shuffled-label repetitions of the found rule (the null band)
    n_random_directions: int = 200  # random unit directions: the band for decoder-vector cosines
    n_cosine: int = 3  # top decoder-cosine latents recorded per direction
    diff: bool = True
    diff_layer_offset: int = 4
    diff_coef: float = 0.5  # x typical residual norm at the steered layer
    n_diff: int = 3  # top diff latents recorded per trait
    context_docs: int = 120  # ShareGPT conversations in the context corpus (disjoint from training)
    context_max_len: int = 256
    n_bins: int = 10
    per_bin: int = 2
    n_top_examples: int = 5
    n_random: int = 10
    n_detect: int = 3  # detection scoring for the top n_detect candidates of each contrast + found latents
    max_detect: int = 16  # ... at most this many latents (the local scorer runs one forward per window)
    explainer: str = "local"  # local | openai | none
    scorer: str = "local"  # local | openai | none
    batch_size: int = 16
    export_sae: bool = True
    seed: int = 0

    def __post_init__(self):
        if not self.traits:
            raise ValueError("traits is empty; expected at least one trait name")
        for name in ("n_pairs", "n_samples", "max_new_tokens", "batch_size", "n_candidates", "train_tokens", "train_steps",
                     "train_batch", "d_sae", "k", "context_len", "context_max_len", "n_bins"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected a positive integer")
        if self.n_questions < 2 or self.role_questions < 2:
            raise ValueError(f"n_questions={self.n_questions}, role_questions={self.role_questions}; expected >= 2 "
                             "(split into discovery and validation halves)")
        if self.n_roles < 2:
            raise ValueError(f"n_roles={self.n_roles}; expected >= 2")
        for name in ("explainer", "scorer"):
            if getattr(self, name) not in ("local", "openai", "none"):
                raise ValueError(f"{name}={getattr(self, name)!r}; expected 'local', 'openai' or 'none'")
        for name in ("n_shuffles", "n_random_directions"):
            if int(getattr(self, name)) < MIN_NULL_DRAWS:
                raise ValueError(f"{name}={getattr(self, name)}; expected >= {MIN_NULL_DRAWS} (a null band)")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}; expected >= 0")
        if not 0.0 <= self.train_role_prompts <= 1.0:
            raise ValueError(f"train_role_prompts={self.train_role_prompts}; expected a fraction in [0, 1]")


PRESETS = {
    "ci": dict(traits=("evil",), n_pairs=2, n_questions=4, max_new_tokens=12, n_roles=4, role_questions=4,
               n_candidates=4, context_docs=12, context_max_len=96, n_bins=3, per_bin=2, n_random=4,
               train_tokens=20_000, train_docs=300, train_steps=30, train_batch=1024, context_len=128,
               n_detect=1, max_detect=2, diff=False),
    # the main job: the SAE (harvest and training, most of the stage) at half the full dictionary on 40k tokens
    "quick": dict(traits=("evil",), n_pairs=2, n_questions=4, max_new_tokens=32, n_roles=4, role_questions=4,
                  n_candidates=4, context_docs=24, context_max_len=128, n_bins=5, per_bin=2, n_random=6,
                  train_tokens=40_000, train_docs=600, train_steps=120, train_batch=2048, context_len=256,
                  d_sae=2304, n_cosine=2, n_diff=2, n_detect=1, max_detect=2),
    "full": {},
}


# ------------------------------------------------------------------------------------------- SAE


def sae_layer(cfg: Config, n_layers: int) -> int:
    return cfg.layer if cfg.layer is not None else default_sae_layer(n_layers)


HARVEST_FIELDS = ("model", "train_tokens", "train_docs", "train_role_prompts", "context_len", "seed")
TRAINING_FIELDS = HARVEST_FIELDS + ("d_sae", "k", "train_steps", "train_batch")


def _cache_key(cfg: Config, layer: int, fields: Sequence[str]) -> str:
    """A short hash of the config fields that determine a cached artefact, so that a changed field (another model,
    more tokens) never finds a stale one."""
    blob = json.dumps({"layer": layer, **{f: getattr(cfg, f) for f in fields}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def sae_store_dir(cfg: Config, layer: int) -> Path:
    """Where `train_sae` harvests (and finds again) the ShareGPT activations of this config."""
    return Path(cfg.sae_cache) / f"acts_L{layer}_{cfg.train_tokens}_{_cache_key(cfg, layer, HARVEST_FIELDS)}"


def sae_run_dir(cfg: Config, layer: int) -> Path:
    """Where `prepare` trains (and finds again) the SAE of this config."""
    return Path(cfg.sae_cache) / (f"run_L{layer}_S{cfg.d_sae}_k{cfg.k}_steps{cfg.train_steps}_seed{cfg.seed}_"
                                  f"{_cache_key(cfg, layer, TRAINING_FIELDS)}")


def prepare(config: Config, model, progress=None) -> Config:
    """The cache step (run by `experiments.study.execute` before `run`): with `sae=None`, train the SAE on a
    ShareGPT harvest under `sae_cache` (or find it there from an earlier invocation: the harvest store and the
    run dir are resumed) and return the config with `sae` pointing at the run dir and `layer` fixed. Training
    facts (harvest and training seconds, in-sample reconstruction) go to `<run dir>.info.json`, which `run` reads.
    A config that names an SAE is returned unchanged."""
    if config.sae:
        return config
    layer = sae_layer(config, model.config.n_layers)
    model.config.check_layer(layer, "SAE layer")
    if progress:
        progress(f"SAE: train or reuse under {config.sae_cache}")
    run_dir = train_sae(model, config, layer, progress is not None)
    return dataclasses.replace(config, sae=str(run_dir), layer=layer)


def load_sae(model, cfg: Config) -> tuple[F.FeatureSae, dict]:
    """The SAE of this run (cfg.sae; see `prepare`) and a description: source, format, parameters for the SAELens
    export and, for one `prepare` trained, its training facts."""
    if not cfg.sae:
        raise ValueError("sae=None: no SAE to read; run `prepare(config, model)` first (psm features does) or pass "
                         "sae=PATH (a SAELens folder or an sae.train run dir)")
    layer = sae_layer(cfg, model.config.n_layers)
    model.config.check_layer(layer, "SAE layer")
    sae, info = load_feature_sae(cfg.sae, cfg.layer, default_layer=layer)
    facts = Path(str(cfg.sae).rstrip("/") + ".info.json")
    if facts.is_file():
        info = {**info, **json.loads(facts.read_text()), "trained_here": True}
    return sae, info


def train_sae(model, cfg: Config, layer: int, progress: bool = True) -> Path:
    """Harvest (resumable store) and train (resumable run dir) under cfg.sae_cache; returns the run dir."""
    from sae.config import SaeConfig
    from sae.data.sources import StoreSource
    from sae.data.store import ActivationStore, harvest_to_store
    from sae.metrics import evaluate_reconstruction
    from sae.train import train

    store_dir = sae_store_dir(cfg, layer)
    run_dir = sae_run_dir(cfg, layer)
    facts = Path(str(run_dir) + ".info.json")
    if facts.is_file() and (run_dir / "config.json").is_file():
        return run_dir
    t0 = time.time()
    cached = {"store": (store_dir / "manifest.json").exists(), "run": any(run_dir.glob("*")) if run_dir.exists() else False}
    store = None
    if (store_dir / "manifest.json").exists():
        store = ActivationStore(store_dir)
        if not store.complete and store.n_tokens < cfg.train_tokens:
            store = None
    if store is None:
        corpus = training_corpus(cfg)
        store = harvest_to_store(model, corpus, store_dir, [(SITE, layer)], context_len=cfg.context_len, batch_size=8,
                                 max_tokens=cfg.train_tokens, progress=progress)
    harvest_s = time.time() - t0
    scfg = SaeConfig(architecture="topk", d_in=model.config.d_model, d_sae=cfg.d_sae, k=cfg.k,
                     total_steps=cfg.train_steps, batch_size=cfg.train_batch, seed=cfg.seed,
                     warmup_steps=min(100, cfg.train_steps // 10), dead_tokens_threshold=cfg.train_tokens)
    t1 = time.time()
    res = train(scfg, StoreSource(store, SITE, layer, cfg.train_batch, seed=cfg.seed), run_dir,
                checkpoint_every=max(50, cfg.train_steps // 4), progress=progress,
                extra_config={"data": {"site": SITE, "layer": layer}})
    train_s = time.time() - t1
    ev_src = StoreSource(store, SITE, layer, min(cfg.train_batch, 2048), seed=cfg.seed + 1, epochs=1)
    metrics, _ = evaluate_reconstruction(res.params[0], scfg, ev_src, max_batches=8)
    atomic_write_json(facts, {"store": str(store_dir), "store_tokens": store.n_tokens, "steps": res.step,
                              "stopped": res.stopped, "harvest_seconds": harvest_s, "train_seconds": train_s,
                              "role_prompts": {"fraction": cfg.train_role_prompts,
                                               "n_prompts": len(training_role_prompts(cfg))},
                              "reused_cache": cached,
                              "eval_on_training_store": {k: float(v) for k, v in metrics.items()
                                                         if isinstance(v, (int, float))}})
    return run_dir


def training_role_prompts(cfg: Config) -> list[str]:
    """The system prompts mixed into the SAE's training conversations: every instruction of every packaged role
    except the default assistant and the roles the role contrast samples, so that no prompt the study discovers
    latents with was seen in training."""
    from psm_jax.persona import datasets
    from psm_jax.persona.prompts import role_play_prompts, select_roles

    roles = datasets.load_roles().roles
    return role_play_prompts(roles, exclude=[r.name for r in select_roles(roles, cfg.n_roles, cfg.seed)])


def training_corpus(cfg: Config):
    """The SAE's training conversations: `train_docs` shuffled ShareGPT conversations, a `train_role_prompts`
    fraction of them under a role-play system prompt."""
    from sae.data.corpus import load_sharegpt, with_system_prompts

    corpus = load_sharegpt(shuffle=True, seed=cfg.seed, take=cfg.train_docs)
    if cfg.train_role_prompts == 0:
        return corpus
    return with_system_prompts(corpus, training_role_prompts(cfg), cfg.train_role_prompts, seed=cfg.seed)


# ------------------------------------------------------------------------------------------- data


def trait_rows(trait, n_pairs: int, n_questions: int, n_samples: int = 1) -> list[dict]:
    """Pos and neg conversations for pairs x questions x samples; split = discovery (first half of the
    questions) / validation (second half)."""
    from psm_jax.persona.prompts import trait_system_prompt

    if n_questions > len(trait.extraction_questions):
        raise ValueError(f"n_questions={n_questions}; trait {trait.name!r} has {len(trait.extraction_questions)}")
    if n_pairs > len(trait.instruction_pairs):
        raise ValueError(f"n_pairs={n_pairs}; trait {trait.name!r} has {len(trait.instruction_pairs)}")
    half = n_questions // 2
    rows = []
    for pol in ("pos", "neg"):
        for p, pair in enumerate(trait.instruction_pairs[:n_pairs]):
            system = trait_system_prompt(trait.name, pol, getattr(pair, pol))
            for q, question in enumerate(trait.extraction_questions[:n_questions]):
                for s in range(n_samples):
                    rows.append({"group": pol, "pair": p, "question": q, "sample": s,
                                 "split": DISCOVERY if q < half else VALIDATION,
                                 "messages": [{"role": "system", "content": system},
                                              {"role": "user", "content": question}]})
    return rows


def role_rows(cfg: Config, model_display_name: str = "SmolLM") -> tuple[list[dict], list[str]]:
    from psm_jax.persona import datasets
    from psm_jax.persona.prompts import sample_questions, select_roles, system_conv

    roles = select_roles(datasets.load_roles().roles, cfg.n_roles, cfg.seed)
    questions = sample_questions(datasets.load_role_questions(), cfg.role_questions, cfg.seed)
    defaults = datasets.load_default_prompts(model_display_name)
    half = len(questions) // 2
    rows = []
    for r in roles:
        for instr in r.instructions[:cfg.role_instructions]:
            for q, question in enumerate(questions):
                rows.append({"group": "role", "role": r.name, "question": q,
                             "split": DISCOVERY if q < half else VALIDATION, "messages": system_conv(instr, question)})
    for p in defaults:
        for q, question in enumerate(questions):
            rows.append({"group": "default", "role": "default", "question": q,
                         "split": DISCOVERY if q < half else VALIDATION, "messages": system_conv(p, question)})
    return rows, [r.name for r in roles]


def _labels(rows: Sequence[dict]) -> tuple[list, list, list]:
    """The rows' group, split and question labels (the parallel sequences sae.features.discovery reads)."""
    return [r["group"] for r in rows], [r["split"] for r in rows], [r["question"] for r in rows]


def specific_blocks(results: dict, cfg: Config) -> dict:
    """`specific_contrast` for every trait, with its null: the same rule with this trait's labels shuffled (the
    shuffles of `contrast_block`) while the other traits keep theirs; and the best latent's unit-level effect on
    the validation questions. Empty with fewer than two traits."""
    if len(results) < 2:
        return {}
    kw = dict(n_candidates=cfg.n_candidates, d_discover=cfg.d_discover, d_replicate=cfg.d_replicate)
    d_disc = {t: res["d_discovery"] for t, res in results.items()}
    d_val = {t: res["d_validation"] for t, res in results.items()}
    out = {}
    for t, res in results.items():
        spec = specific_contrast(d_disc, d_val, t, **kw)
        spec["null_found"] = [specific_contrast({**d_disc, t: sh["d_discovery"]}, {**d_val, t: sh["d_validation"]},
                                                t, **kw)["n_found"] for sh in res["shuffled"]]
        spec["null_band"] = null_band(spec["null_found"])
        spec["best_effect_validation"] = unit_effect(res["stats"], *_labels(res["rows"]), spec["best"], "pos", "neg",
                                                     split=VALIDATION, seed=cfg.seed)
        out[t] = spec
    return out


# ------------------------------------------------------------------------------------------- run


def _generate(model, rows, cfg, key, progress):
    rolls = rollouts.generate_responses(model, [r["messages"] for r in rows], max_new_tokens=cfg.max_new_tokens,
                                        temperature=cfg.temperature, key=key, batch_size=cfg.batch_size,
                                        progress=progress)
    for r, ro in zip(rows, rolls):
        r["response"] = ro.response
        r["conversation"] = ro.conversation()
    return rows


def _explainer_and_scorer(cfg, model):
    ex = sc = None
    if cfg.explainer == "local":
        ex = L.LocalExplainer(model, batch_size=8, max_examples=8)
    elif cfg.explainer == "openai":
        ex = L.OpenAICompatibleExplainer()
    if cfg.scorer == "local":
        sc = L.LocalDetectionScorer(model, batch_size=cfg.batch_size)
    elif cfg.scorer == "openai":
        sc = L.OpenAICompatibleDetectionScorer()
    return ex, sc


def contrast_block(stats, rows, a: str, b: str, *, cfg: Config, seed: int) -> dict:
    """`split_contrast` with its shuffled-label null (>= 20 shuffles: a band; their d arrays are kept for the
    trait-specific null) and the best latent's unit-level effect on both halves."""
    kw = dict(n_candidates=cfg.n_candidates, d_discover=cfg.d_discover, d_replicate=cfg.d_replicate)
    groups, splits, questions = _labels(rows)
    res = split_contrast(stats, groups, splits, a, b, **kw)
    shuffled = shuffled_contrasts(stats, groups, splits, a, b, seed=seed, n_rep=cfg.n_shuffles, **kw)
    res["null_found"] = [c["n_found"] for c in shuffled]
    res["null_band"] = null_band(res["null_found"])
    res["shuffled"] = [{"d_discovery": c["d_discovery"], "d_validation": c["d_validation"]} for c in shuffled]
    best = best_latent(res)
    res["best_effect"] = {split: unit_effect(stats, groups, splits, questions, best, a, b, split=split, seed=cfg.seed)
                          for split in (DISCOVERY, VALIDATION)}
    return res


def best_latent(res: dict) -> int:
    """The first found latent, else the top candidate by discovery d."""
    return int(res["found"][0] if res["found"] else res["candidates"][0]["latent"])


@dataclasses.dataclass
class Result:
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
    results = _trait_contrasts(model, sae, load_traits(cfg.traits), cfg, key, say, bars)
    specific = specific_blocks(results, cfg)
    for name, spec in specific.items():
        say(f"trait {name}: trait-specific latents found {spec['n_found']} (null band {spec['null_band']['low']:g}.."
            f"{spec['null_band']['high']:g})")
    role_res, rrows, axis = _role_contrast(model, sae, cfg, key, say, bars)
    directions = {name: res["vector"] for name, res in results.items()} | {"assistant_axis": axis}
    _decoder_cosines(sae.W_dec, results, role_res, directions, cfg)
    if cfg.diff and sae.layer - cfg.diff_layer_offset >= 0:
        neutral = [r["conversation"] for r in rrows if r["group"] == "default"]
        _steered_diffs(model, sae, results, neutral, cfg, say)
    all_convs = [r["conversation"] for res in results.values() for r in res["rows"]] + [r["conversation"]
                                                                                        for r in rrows]
    records, ctx, n_ctx_docs = latent_records(model, sae, cfg, results, specific, role_res, all_convs, say, bars)
    return Result(config=cfg, sae=sae, sae_info=sae_info, results=results, specific=specific, roles=role_res,
                  directions=directions, latent_records=records, density=ctx.table.density(), n_context_docs=n_ctx_docs,
                  n_generated=len(all_convs), context_tokens=len(ctx.table), seconds=time.time() - t_start,
                  default_layer=default_sae_layer(model.config.n_layers))


def _group_mean(stats, rows, group: str) -> np.ndarray:
    """Mean residual of the rows of one group that have selected tokens."""
    return stats.resid_mean[[i for i, r in enumerate(rows) if r["group"] == group and stats.n[i] > 0]].mean(0)


def _collect_last_turns(model, sae, rows, cfg: Config, bars: bool):
    return F.collect(model, sae, [r["conversation"] for r in rows], batch_size=cfg.batch_size // 2 or 1,
                     last_turn_only=True, progress=bars).conv


def _trait_contrasts(model, sae, traits, cfg: Config, key, say, bars: bool) -> dict:
    """Per trait: answers under its positive and negative system prompts, the latent contrast with its shuffled-
    label null, and the persona vector at the SAE's layer (positive minus negative mean residual, `vector`)."""
    results: dict = {}
    for ti, trait in enumerate(traits):
        say(f"trait {trait.name}: generating")
        rows = _generate(model, trait_rows(trait, cfg.n_pairs, cfg.n_questions, cfg.n_samples), cfg,
                         jax.random.fold_in(key, 1 + ti), bars)
        stats = _collect_last_turns(model, sae, rows, cfg, bars)
        res = contrast_block(stats, rows, "pos", "neg", cfg=cfg, seed=cfg.seed * 100 + ti)
        v = _group_mean(stats, rows, "pos") - _group_mean(stats, rows, "neg")
        res |= {"vector": v, "vector_norm": float(np.linalg.norm(v)), "typical_norm": mean_resid_norm(stats),
                "rows": rows, "stats": stats}
        results[trait.name] = res
        say(f"trait {trait.name}: found {res['n_found']} (shuffled-label null band {res['null_band']['low']:g}.."
            f"{res['null_band']['high']:g})")
    return results


def _role_contrast(model, sae, cfg: Config, key, say, bars: bool) -> tuple[dict, list, np.ndarray]:
    """Role-played answers against the default Assistant's: the latent contrast, its rows, and the Assistant axis
    at the SAE's layer (default minus role mean residual)."""
    say("roles vs default: generating")
    rrows, role_names = role_rows(cfg)
    rrows = _generate(model, rrows, cfg, jax.random.fold_in(key, 999), bars)
    rstats = _collect_last_turns(model, sae, rrows, cfg, bars)
    role_res = contrast_block(rstats, rrows, "role", "default", cfg=cfg, seed=cfg.seed * 100 + 99)
    role_res["roles"] = role_names
    role_res["n_default_prompts"] = len({r["messages"][0]["content"] if r["messages"][0]["role"] == "system" else ""
                                         for r in rrows if r["group"] == "default"})
    say(f"roles: found {role_res['n_found']} (null {role_res['null_found']})")
    return role_res, rrows, _group_mean(rstats, rrows, "default") - _group_mean(rstats, rrows, "role")


def _decoder_cosines(W, results: dict, role_res: dict, directions: dict, cfg: Config) -> None:
    """Per trait (in place): the latents whose decoder rows point along its vector, the contrast candidates'
    cosines against random directions, and the overlap of the contrast's and the cosine's top latents."""
    for ti, (name, res) in enumerate(results.items()):
        rk = F.rank_by_cosine(W, directions[name])
        cos = F.decoder_cosine(W, directions[name])
        top_contrast = [c["latent"] for c in res["candidates"]]
        n_cmp = max(cfg.n_candidates, 20)
        res |= {"cosine_top": rk.top(cfg.n_cosine),
                "cosine_of_candidates": {c: float(cos[c]) for c in top_contrast},
                "cosine_band": cosine_band(W, directions[name], top_contrast, n_random=cfg.n_random_directions,
                                           seed=cfg.seed * 100 + ti),
                "cosine_rank_of_best": rk.rank_of(top_contrast[0]) if top_contrast else None,
                "overlap_contrast_cosine_top": len(set(res["ranking_full"].order()[:n_cmp]) & set(rk.order()[:n_cmp])),
                "overlap_n": n_cmp}
    role_res["cosine_top_toward_roles"] = F.rank_by_cosine(W, directions["assistant_axis"], sign=-1).top(cfg.n_cosine)
    role_res["cosine_top_toward_assistant"] = F.rank_by_cosine(W, directions["assistant_axis"], sign=1).top(
        cfg.n_cosine)


def _steered_diffs(model, sae, results: dict, neutral: list, cfg: Config, say) -> None:
    """Per trait (in place, `diff`): model diffing with the persona vector added `diff_layer_offset` layers before
    the SAE's layer on neutral (default-prompt) conversations; where the contrast's candidates rank."""
    layer = sae.layer - cfg.diff_layer_offset
    for name, res in results.items():
        say(f"model diffing: {name} vector at layer {layer}")
        rows = res["rows"]
        acts = rollouts.activation_means(model, [r["conversation"] for r in rows], layers=(layer,), site=SITE,
                                         batch_size=cfg.batch_size)
        g = np.asarray([r["group"] for r in rows])
        v = acts["response_mean"][g == "pos", 0].mean(0) - acts["response_mean"][g == "neg", 0].mean(0)
        scale = float(np.mean(np.linalg.norm(acts["response_mean"][:, 0], axis=-1)))
        edit = E.add(model.config, unit(v) * scale, layers=[layer], coef=cfg.diff_coef, site=SITE)
        rk = F.model_diff(model, sae, neutral, edits_fn=lambda b, e=edit: (e,), batch_size=cfg.batch_size // 2 or 1)
        order = rk.order()
        res["diff"] = {"layer": layer, "coef": cfg.diff_coef, "unit_norm": scale, "n_prompts": len(neutral),
                       "top": rk.top(cfg.n_diff),
                       "rank_of_candidates": {c["latent"]: int(np.flatnonzero(order == c["latent"])[0])
                                              for c in res["candidates"]},
                       "overlap_top20_with_contrast": len(set(order[:20]) & set(res["ranking_full"].order()[:20]))}


def latent_records(model, sae, cfg: Config, results: dict, specific: dict, role_res: dict, all_convs: list, say,
                   progress):
    """Records (density, per-role rates, contexts, top tokens, labels, detection) of every candidate latent over
    the context corpus: a ShareGPT slice disjoint from the SAE's training slice plus the generated conversations.
    Returns (records, the collected context, the number of ShareGPT documents)."""
    from sae.data.corpus import load_sharegpt

    extra: dict[int, dict] = {}

    def note(lat, key_, val):
        extra.setdefault(int(lat), {}).setdefault(key_, val)

    for name, res in results.items():
        for c in res["candidates"]:
            note(c["latent"], f"{name}: d disc/val",
                 f"{c['d_discovery']:.2f}/{c['d_validation']:.2f}{' found' if c['found'] else ''}")
        for c in res["cosine_top"]:
            note(c["latent"], f"{name}: decoder cosine", round(c["cosine"], 3))
        for c in (res.get("diff") or {}).get("top", []):
            note(c["latent"], f"{name}: diff increase", round(c["diff"], 3))
    for name, spec in specific.items():
        for c in spec["candidates"]:
            note(c["latent"], f"{name}: margin over the other traits disc/val",
                 f"{c['margin_discovery']:.2f}/{c['margin_validation']:.2f}{' found' if c['found'] else ''}")
    for c in role_res["candidates"]:
        note(c["latent"], "role-vs-default: d disc/val",
             f"{c['d_discovery']:.2f}/{c['d_validation']:.2f}{' found' if c['found'] else ''}")
    for c in role_res["cosine_top_toward_roles"]:
        note(c["latent"], "axis: cosine toward roles", round(-c["score"], 3))
    latents = sorted(extra, key=lambda l: min([r["rank"] for res in list(results.values()) + [role_res]
                                                for r in res["candidates"] if r["latent"] == l] or [99]))
    say(f"records for {len(latents)} candidate latents")
    ctx_docs = list(load_sharegpt(shuffle=True, seed=cfg.seed, take=f"{cfg.train_docs}:{cfg.train_docs + cfg.context_docs}"))
    ctx = F.collect(model, sae, ctx_docs + all_convs, latents=latents, batch_size=cfg.batch_size // 2 or 1,
                    max_len=cfg.context_max_len, progress=progress)
    records = F.build_records(ctx.table, latents, model=model, sae=sae, n_bins=cfg.n_bins, per_bin=cfg.per_bin,
                              n_top=cfg.n_top_examples, n_random=cfg.n_random, seed=cfg.seed, extra=extra)
    explainer, scorer = _explainer_and_scorer(cfg, model)
    if explainer is not None:
        say(f"labelling {len(records)} latents ({explainer.name})")
        L.label_records(records, explainer, None)
    if scorer is not None:
        detect = []
        for res in list(results.values()) + [role_res]:
            for c in res["candidates"]:
                if (c["rank"] < cfg.n_detect or c["found"]) and c["latent"] not in detect:
                    detect.append(c["latent"])
        detect = detect[:cfg.max_detect]
        say(f"detection scoring {len(detect)} latents ({scorer.name})")
        for r in records:
            if r["latent"] in detect and r.get("label"):
                r["detection"] = L.detection_score(r, r["label"], scorer)
    return records, ctx, len(ctx_docs)


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
        rec = by_latent.get(best, {})
        det = rec.get("detection") or {}
        val = res["best_effect"]["validation"]
        m = {"n_found": res["n_found"], "found": res["found"], "null_found": res["null_found"],
             "null_band": res["null_band"], "best_latent": best,
             "best_d_discovery": float(res["d_discovery"][best]), "best_d_validation": float(res["d_validation"][best]),
             "best_effect_validation": val, "best_effect_discovery": res["best_effect"]["discovery"],
             "best_detection_balanced_accuracy": det.get("balanced_accuracy"),
             "best_detection_auroc": det.get("auroc"), "best_label": rec.get("label"),
             "halves_correlation": res["halves_correlation"], "n_conversations": res["n"],
             "best_d_validation_other_traits": spec[name]["d_validation_other_traits"],
             "best_shared_with": spec[name]["shared_with"], "best_specific": spec[name]["specific"]}
        if name in result.results:
            cb = res["cosine_band"]
            m.update(vector_norm=res["vector_norm"], typical_norm=res["typical_norm"],
                     cosine_rank_of_best=res["cosine_rank_of_best"], best_decoder_cosine=cb["cosines"].get(best),
                     best_decoder_cosine_z=cb["z"].get(best), cosine_band=cb["band"],
                     candidates_outside_cosine_band=cb["outside"], n_candidates=cb["n"],
                     overlap_contrast_cosine_top=res["overlap_contrast_cosine_top"], overlap_n=res["overlap_n"])
            if res.get("diff"):
                m["diff_overlap_top20"] = res["diff"]["overlap_top20_with_contrast"]
                m["diff_rank_of_best"] = res["diff"]["rank_of_candidates"].get(best)
        if name in result.specific:
            m["specific"] = _specific_summary(result.specific[name])
        out[name] = m
    return out


def _specific_summary(spec: dict) -> dict:
    """The trait-specific ranking's headline: found count against its shuffled band, and its best latent."""
    best = next(c for c in spec["candidates"] if c["latent"] == spec["best"])
    return {"n_found": spec["n_found"], "found": spec["found"], "null_found": spec["null_found"],
            "null_band": spec["null_band"], "best_latent": spec["best"], "best_is_found": bool(spec["found"]),
            "best_d_validation": best["d_validation"], "best_margin_validation": best["margin_validation"],
            "best_d_validation_other_traits": best["d_validation_other_traits"],
            "best_effect_validation": spec["best_effect_validation"]}


report, records = written_by("experiments.persona_features_report")
