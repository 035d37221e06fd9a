"""Steering with persona latents of an SAE, against the persona vector and a band of random directions.

    psm feature-steering features=reports/persona_features --out reports/feature_steering seed=0
    psm feature-steering features=runs/pf_quick --preset quick --out runs/fs_quick

Input: the output folder of `psm features` (candidates.json: the best latent per trait and its other candidates, the
SAE's source; persona_directions.safetensors: the trait vectors at the SAE's layer). Per trait, with L the SAE's
layer, n_L the typical per-token residual norm at L (held-out ShareGPT assistant tokens) and s a strength:

* latent add: h <- h + s * n_L * W_dec[i] / |W_dec[i]| at resid_post of L, every position (what
  `psm_jax.edits.sae_latent` computes in mode "add" with `normalize`), for the top `n_latents` persona latents (the
  features run's best first: picked before steering, so its z is not selected on the outcome), from the features
  run's contrast ranking or, with `ranking=specific`, its trait-specific ranking;
* the persona vector: h <- h + s * n_L * v / |v|;
* random directions: `n_random` Gaussian unit directions at the same norm s * n_L: the null band;
* clamp (secondary): encode, set f_i = m * max_act(i), decode, add back the reconstruction error.

All add edits are rows of one batched forward: each row of a batch carries its own vector
(`psm_jax.persona.steering.row_add_edit`), so the unsteered answers, the latents, the persona vector and the random
band are generated and scored together.

Matched norm and perplexity cost: per trait, one strength s, the largest of `strengths` at which both the best
latent's and the persona vector's perplexity ratio (steered / unsteered, on held-out ShareGPT assistant tokens) is
<= `max_ppl_ratio`; every direction, the random band included, is steered at s, and each one's ratio is shown.

Measures (the units are the evaluation questions):
* headline, the judge-free score (`psm_jax.persona.measures.answer_trait_score`): per-token log-likelihood of the
  greedy steered answer under the trait's positive minus its negative system prompt, read by the unsteered model.
  Its validity check runs on the model used: answers generated under another instruction pair's positive vs
  negative prompt, scored the same way, paired by question (`measures.validity`). The effect of an edit is the
  mean over questions of score(steered answer) - score(unsteered answer) with a 95% bootstrap interval; its z is
  against the random band at the same norm. A result is evidence only when the check passes.
* the two-choice items (log P(trait choice) - log P(other choice)) are shown with their own validity check and get a
  random band only when that check passes; otherwise they are never read as evidence.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from experiments.report import fmt_num as _f
from experiments.sae_source import default_sae_layer, load_feature_sae
from experiments.study import written_by
from psm_jax import edits as E
from psm_jax.persona import measures, rollouts
from psm_jax.persona.directions import random_directions, typical_norms, unit
from psm_jax.persona.prompts import system_conv, trait_system_prompt
from psm_jax.persona.stats import MIN_NULL_DRAWS, null_band, paired_effect, zscore
from psm_jax.persona.steering import const_edits_fn, per_row_steered, perplexity_ratios
from sae import features as F

MEASURE = "judge-free answer score (per-token log P(answer | positive prompt) - log P(answer | negative prompt))"


RANKINGS = ("contrast", "specific")


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m-instruct"
    features: str = "reports/persona_features"  # output folder of `psm features`
    sae: str | None = None  # override the SAE location recorded in candidates.json
    traits: tuple[str, ...] | None = None  # None: every trait in candidates.json
    n_latents: int = 3  # top persona latents steered: the features run's best, then its other candidates
    ranking: str = "contrast"  # the features run's ranking: "contrast" (d of pos vs neg) or "specific" (its margin)
    strengths: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4, 0.8)  # x typical residual norm, candidates for the ppl match
    max_ppl_ratio: float = 1.5
    n_random: int = 24  # random directions in the null band (>= 20)
    clamp_multiples: tuple[float, ...] = (0.0, 4.0)  # x the latent's max activation (0 ablates it); () for none
    n_questions: int = 20  # evaluation questions (every packaged one): the independent units
    max_new_tokens: int = 32
    n_ppl_docs: int = 8  # held-out ShareGPT conversations for the perplexity ratio
    ppl_max_chars: int = 600
    batch_size: int = 32
    two_choice: bool = True  # the two-choice items as a secondary measure (their validity, effects and band)
    seed: int = 0

    def __post_init__(self):
        if not self.strengths or any(not s > 0 for s in self.strengths):
            raise ValueError(f"strengths={self.strengths}; expected one or more positive values")
        if self.n_random < MIN_NULL_DRAWS:
            raise ValueError(f"n_random={self.n_random}; expected >= {MIN_NULL_DRAWS} (a null band)")
        for name in ("n_latents", "n_questions", "max_new_tokens", "n_ppl_docs", "ppl_max_chars", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected a positive integer")
        if self.n_questions < 2:
            raise ValueError(f"n_questions={self.n_questions}; expected >= 2 (an interval over questions)")
        if self.ranking not in RANKINGS:
            raise ValueError(f"ranking={self.ranking!r}; expected one of {RANKINGS}")
        if not self.max_ppl_ratio > 1:
            raise ValueError(f"max_ppl_ratio={self.max_ppl_ratio}; expected > 1")


PRESETS = {
    "ci": dict(n_latents=1, strengths=(0.5,), n_random=20, clamp_multiples=(), n_questions=2, max_new_tokens=6,
               n_ppl_docs=2, ppl_max_chars=200, batch_size=16, two_choice=False),
    # the main job: the features run's best latent per trait (the headline), the persona vector and the 20-direction
    # band; the clamp (a secondary edit), the two-choice items (a secondary measure whose band costs one forward over
    # every item per random direction) and the other candidates are in `full`
    "quick": dict(n_latents=1, strengths=(0.1, 0.2, 0.4), n_random=20, clamp_multiples=(), n_questions=4,
                  max_new_tokens=16, n_ppl_docs=4, ppl_max_chars=400, batch_size=48, two_choice=False),
    "full": {},
}


@dataclasses.dataclass
class Result:
    config: Config
    layer: int
    sae: dict  # the SAE's description
    typical_norm: float
    n_ppl_docs: int
    traits: dict  # name -> `steer_trait` output
    seconds: float
    default_layer: int  # the SAE studies' default layer on this model (n_layers // 2): record keys name any other


# ------------------------------------------------------------------------------------------- edits


def clamp_edit(model, sae: F.FeatureSae, latent: int, value: float) -> E.SaeLatent:
    """Encode, set latent `latent` to `value`, decode, add back the reconstruction error (every position)."""
    return E.sae_latent(model.config, latent=int(latent), value=float(value), layers=[sae.layer], mode="clamp",
                        **sae.edit_kwargs())


# ------------------------------------------------------------------------------------------- measures


def ppl_docs(n: int, seed: int, max_chars: int) -> tuple[list, list]:
    """(prompts, answers) of `n` held-out ShareGPT exchanges: a user turn and the assistant's reply."""
    from experiments.sharegpt import sharegpt_conversations

    convs = sharegpt_conversations(n, seed=seed + 7919, max_messages=2, max_chars=max_chars, min_assistant_turns=1)
    return [c[:-1] for c in convs], [c[-1]["content"] for c in convs]


def common_strength(strengths: Sequence[float], ratios: np.ndarray, max_ratio: float) -> dict:
    """The largest strength at which every compared direction's perplexity ratio (rows of `ratios` [K, S], columns
    in the order of `strengths`) is <= max_ratio; else the smallest strength, with `within_ceiling` False."""
    s, r = np.asarray(strengths, np.float64), np.atleast_2d(np.asarray(ratios, np.float64))
    if r.shape[1] != s.size:
        raise ValueError(f"ratios have {r.shape[1]} columns for {s.size} strengths; expected one per strength")
    ok = np.flatnonzero(np.all(np.isfinite(r) & (r <= max_ratio), axis=0))
    i = int(ok[np.argmax(s[ok])]) if ok.size else int(np.argmin(s))
    return {"strength": float(s[i]), "ppl_ratios": r[:, i].tolist(), "within_ceiling": bool(ok.size)}


def score_answers_by_unit(model, questions: Sequence[str], answers: Sequence[str], systems: tuple[str, str],
                          batch_size: int) -> np.ndarray:
    """The judge-free score of each answer (NaN for an empty one): [n]."""
    out = np.full(len(answers), np.nan)
    keep = [i for i, a in enumerate(answers) if a]
    if keep:
        out[keep] = measures.answer_trait_score(model, [questions[i] for i in keep], [answers[i] for i in keep],
                                                *systems, batch_size=batch_size)
    return out


def paired_unit_effect(steered: np.ndarray, base: np.ndarray, seed: int) -> dict:
    """Mean over questions of steered - unsteered score, over the questions where both answers are non-empty,
    with its 95% bootstrap interval; NaNs when fewer than one such question."""
    ok = np.isfinite(steered) & np.isfinite(base)
    if not ok.any():
        return {"estimate": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0, "excludes_zero": False}
    return paired_effect(steered[ok], base[ok], seed=seed)


def band_z(value: float, null_effects: np.ndarray) -> tuple[dict | None, float]:
    """(null band, z) of `value` against the random directions' effects (NaN effects dropped)."""
    x = np.asarray(null_effects, np.float64)
    x = x[np.isfinite(x)]
    if x.size < MIN_NULL_DRAWS or not np.isfinite(value):
        return None, float("nan")
    return null_band(x), zscore(value, x)


# ------------------------------------------------------------------------------------------- run


def read_directions(folder, width: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """persona_directions.safetensors + its JSON sidecar from a features run (read directly: the
    metadata holds free text, which experiments.report.load_vectors may try to parse as JSON)."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    path = folder / "persona_directions.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `psm features --out {folder}` first")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - any safetensors failure
        raise ValueError(f"{path} is corrupt or not safetensors: {err}") from err
    side = folder / "persona_directions.json"
    meta = json.loads(side.read_text()) if side.is_file() else {}
    if width is not None:
        for k, v in tensors.items():
            if v.shape != (width,):
                raise ValueError(f"direction {k!r} in {path} has shape {v.shape}; expected ({width},)")
    return tensors, meta


def load_features(folder, *, model, sae_override: str | None = None):
    """(candidates dict, directions {name: [D]}, FeatureSae) from a `psm features` output folder."""
    folder = Path(folder)
    path = folder / "candidates.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `psm features --out {folder}` first")
    cand = json.loads(path.read_text())
    tensors, meta = read_directions(folder, width=model.config.d_model)
    src = sae_override or cand["sae"].get("saelens_export") or cand["sae"].get("source")
    if not src or not Path(src).exists():
        raise FileNotFoundError(f"the SAE of {folder} ({src!r}) is not on disk; pass sae=PATH")
    layer = int(cand["sae"]["layer"])
    model.config.check_layer(layer, "SAE layer")
    sae, _ = load_feature_sae(src, layer, default_layer=layer)
    if sae.layer != int(meta.get("layer", sae.layer)):
        raise ValueError(f"the SAE reads layer {sae.layer} but the directions were taken at layer {meta.get('layer')}")
    return cand, tensors, sae


def ranked_info(info: dict, ranking: str, trait: str) -> dict:
    """A trait's entry of candidates.json under `ranking`: the contrast ranking (the entry itself) or its
    trait-specific ranking (the entry's "specific" part: best, candidates, max_act)."""
    if ranking == "contrast":
        return info
    if "specific" not in info:
        raise ValueError(f"ranking={ranking!r}, but the features run has no trait-specific ranking for {trait!r} "
                         "(it needs at least two traits)")
    return info["specific"]


def top_latents(info: dict, n: int) -> list[int]:
    """The trait's best latent, then its other candidates in rank order, `n` at most."""
    out = [int(info["best"])]
    for c in info.get("candidates", []):
        if int(c) not in out:
            out.append(int(c))
    return out[:n]


def trait_systems(trait) -> tuple[tuple[str, str], tuple[str, str]]:
    """(scoring systems, validity systems): the positive / negative prompts of instruction pair 0 score the answers;
    the validity answers are generated under pair 1 (pair 0 when the trait has one), so the check does not score a
    prompt's own greedy output."""
    pairs = trait.instruction_pairs
    make = lambda pair: tuple(trait_system_prompt(trait.name, pol, getattr(pair, pol)) for pol in ("pos", "neg"))  # noqa: E731
    return make(pairs[0]), make(pairs[1] if len(pairs) > 1 else pairs[0])


def steer_trait(model, sae: F.FeatureSae, trait, info: dict, vector, *, cfg: Config, norm: float, ppl: tuple,
                rand_units: np.ndarray, progress=None) -> dict:
    """Everything `run` computes for one trait (see the module doc)."""
    say = progress or (lambda msg: None)
    latents = top_latents(info, cfg.n_latents)
    named = {f"latent {i}": unit(np.asarray(sae.W_dec[i], np.float64)) for i in latents}
    named["persona vector"] = unit(np.asarray(vector, np.float64))
    best = f"latent {latents[0]}"
    strengths = sorted(cfg.strengths)
    # 1. the perplexity cost over the strength grid, and the strength where the best latent and the vector both stay
    # within the ceiling
    grid = np.stack([u * s * norm for u in named.values() for s in strengths])
    ratios = perplexity_ratios(model, *ppl, grid, sae.layer, batch_size=cfg.batch_size)
    ratios = ratios.reshape(len(named), len(strengths))
    names = list(named)
    pick = common_strength(strengths, ratios[[names.index(best), names.index("persona vector")]], cfg.max_ppl_ratio)
    s_star = pick["strength"]
    say(f"{trait.name}: strength {s_star} x typical norm (within the ceiling: {pick['within_ceiling']}); perplexity "
        f"ratios over {strengths}: " + "; ".join(f"{n} {np.round(r, 2).tolist()}" for n, r in zip(names, ratios)))
    # 2. answers and their trait scores: unsteered, each direction and the band at s_star, the validity prompts, the
    # clamps
    questions = list(trait.evaluation_questions[:cfg.n_questions])
    score_sys, valid_sys = trait_systems(trait)
    max_act = float(info.get("max_act") or 1.0)
    plan = [np.zeros(model.config.d_model)] + [u * s_star * norm for u in named.values()] + [
        r * s_star * norm for r in rand_units]
    scores, answers_by = _steered_scores(model, sae, trait.name, questions, plan, valid_sys, score_sys,
                                         [m * max_act for m in cfg.clamp_multiples], latents[0], cfg, say)
    base, k_valid = scores[0], len(plan)
    validity = _validity(scores[k_valid], scores[k_valid + 1])
    # 3. effects, the band and z per direction
    rand_rows = scores[1 + len(named):k_valid]
    rand_effects = np.asarray([np.nanmean(r - base) if np.isfinite(r - base).any() else np.nan for r in rand_rows])
    edits = {}
    for k, name in enumerate(names, start=1):
        eff = paired_unit_effect(scores[k], base, cfg.seed)
        band, z = band_z(eff["estimate"], rand_effects)
        edits[name] = {"strength": s_star, "ppl_ratio": float(ratios[k - 1][strengths.index(s_star)]),
                       "ppl_ratios": ratios[k - 1].tolist(), "effect": eff, "band": band, "z": z,
                       "answers": list(answers_by[k]), "empty": int(np.sum(~np.isfinite(scores[k])))}
    band_ppl = perplexity_ratios(model, *ppl, rand_units[:4] * s_star * norm, sae.layer,
                                 batch_size=cfg.batch_size)
    # 4. clamp (secondary): the best latent set to m x its max activation; 5. two-choice items, a band only where
    # their validity check passes
    clamp = _clamp_effects(model, sae, latents[0], max_act, scores[k_valid + 2:], base, ppl, cfg)
    two_choice = (two_choice_block(model, trait, {n: named[n] * s_star * norm for n in (best, "persona vector")},
                                   layer=sae.layer, valid_sys=valid_sys, band_vectors=rand_units * s_star * norm,
                                   cfg=cfg) if cfg.two_choice else None)
    return {"latents": latents, "best": best, "strength": s_star, "within_ceiling": pick["within_ceiling"],
            "questions": questions, "systems": {"score": score_sys, "validity": valid_sys}, "validity": validity,
            "edits": edits, "random_effects": rand_effects.tolist(), "band_ppl_ratio_median": float(np.median(band_ppl)),
            "unsteered_answers": list(answers_by[0]), "clamp": clamp, "two_choice": two_choice, "max_act": max_act,
            "decoder_cosine_with_vector": {f"latent {i}": float(F.decoder_cosine(sae.W_dec[[i]], vector)[0])
                                           for i in latents}}


def _steered_scores(model, sae, trait_name: str, questions: list, plan: list, valid_sys, score_sys,
                    clamp_values: list, latent: int, cfg: Config, say) -> tuple[np.ndarray, np.ndarray]:
    """Trait scores [sets, questions] and answers of one batched generation: each steering vector of `plan`
    added at the SAE's layer (row by row), then the validity prompts' answers (no steering, positive and negative
    prompts of another instruction pair), then one set per clamp value of `latent`."""
    D, bs = model.config.d_model, cfg.batch_size
    user = [[{"role": "user", "content": q}] for q in questions]
    convs = user * len(plan) + [system_conv(sy, q) for sy in valid_sys for q in questions]
    vecs = np.concatenate([np.repeat(np.stack(plan), len(questions), axis=0), np.zeros((2 * len(questions), D))])
    say(f"{trait_name}: generating {len(convs)} answers ({len(plan) - 1} edits x {len(questions)} questions)")
    rolls = per_row_steered(lambda chunk, ef, b: rollouts.generate_responses(model, chunk, batch_size=b, edits_fn=ef,
                                                                              max_new_tokens=cfg.max_new_tokens),
                            convs, vecs, model=model, layer=sae.layer, batch_size=bs)
    for value in clamp_values:
        edit = clamp_edit(model, sae, latent, value)
        rolls += rollouts.generate_responses(model, user, max_new_tokens=cfg.max_new_tokens,
                                             batch_size=measures.even_batch(len(user), bs),
                                             edits_fn=lambda batch, e=edit: (e,))
    answers = [r.response for r in rolls]
    n_sets = len(answers) // len(questions)
    scores = score_answers_by_unit(model, questions * n_sets, answers, score_sys, bs).reshape(n_sets, len(questions))
    return scores, np.asarray(answers, dtype=object).reshape(n_sets, len(questions))


def _validity(pos, neg) -> dict:
    """The trait score's validity check on the questions where both prompts' answers were scored."""
    ok = np.isfinite(pos) & np.isfinite(neg)
    return measures.validity(pos[ok], neg[ok])


def _clamp_effects(model, sae, latent: int, max_act: float, clamp_scores, base, ppl: tuple, cfg: Config) -> list:
    """Per clamp multiple m: `latent` set to m x its max activation, its perplexity ratio and trait-score effect."""
    if not cfg.clamp_multiples:
        return []
    bs, clamp = cfg.batch_size, []
    nll0 = measures.answer_nll(model, *ppl, batch_size=bs)
    for j, m in enumerate(cfg.clamp_multiples):
        edit = clamp_edit(model, sae, latent, m * max_act)
        nll = measures.answer_nll(model, *ppl, edits_fn=lambda batch, e=edit: (e,), batch_size=bs)
        clamp.append({"multiple": float(m), "value": m * max_act, "ppl_ratio": float(np.exp(nll - nll0)),
                      "effect": paired_unit_effect(clamp_scores[j], base, cfg.seed)})
    return clamp


def is_evidence(trait_result: dict) -> bool:
    """The gate: a trait's steering result is evidence only when the judge-free measure passed its validity check on
    this model and the best latent has a z against a random band."""
    z = trait_result["edits"][trait_result["best"]]["z"]
    return bool(trait_result["validity"]["valid"] and np.isfinite(z))


def two_choice_block(model, trait, steer: dict, *, layer: int, valid_sys, band_vectors, cfg: Config) -> dict:
    """The two-choice measure: its validity check on this model (positive vs negative system prompt, paired by item),
    the stored check for `cfg.model` when the trait file has one, and the unsteered value. Only when the check passes:
    each steering vector's change (`steer`: name -> vector, the best latent first) and the random band for the best
    latent; a measure that fails its check is not used further."""
    items = list(trait.behavioural_items)
    zero = const_edits_fn(model.config, layer, np.zeros(model.config.d_model))
    tc = lambda system=None, edits_fn=zero: measures.two_choice(model, items, system=system, edits_fn=edits_fn,  # noqa: E731
                                                               batch_size=cfg.batch_size)
    check = measures.validity(tc(valid_sys[0]), tc(valid_sys[1]))
    stored = trait.items_validity(cfg.model) if hasattr(trait, "items_validity") else None
    base = tc()
    out = {"validity": check, "stored_validity": dataclasses.asdict(stored) if stored is not None else None,
           "n_items": len(items), "unsteered": float(base.mean()), "edits": {}}
    if not check["valid"]:
        return out
    for name, v in steer.items():
        out["edits"][name] = paired_effect(tc(edits_fn=const_edits_fn(model.config, layer, v)), base, seed=cfg.seed)
    null = np.asarray([tc(edits_fn=const_edits_fn(model.config, layer, v)).mean() - base.mean() for v in band_vectors])
    out["band"], out["z"] = band_z(out["edits"][next(iter(steer))]["estimate"], null)
    return out


def run(config: Config, model, progress=None, *, features: tuple | None = None) -> Result:
    """Compute the study (no files). features: (candidates, directions, FeatureSae) instead of config.features."""
    from psm_jax.persona.prompts import load_traits

    cfg = config
    t0 = time.time()
    say = progress or (lambda msg: None)
    cand, directions, sae = features if features is not None else load_features(cfg.features, model=model,
                                                                                 sae_override=cfg.sae)
    names = list(cfg.traits or cand["traits"].keys())
    for n in names:
        if n not in cand["traits"]:
            raise ValueError(f"trait {n!r} is not in the features run (it has {sorted(cand['traits'])})")
        if n not in directions:
            raise ValueError(f"no persona direction for trait {n!r} in the features run")
    traits = {t.name: t for t in load_traits(names)}
    for n in names:
        if len(traits[n].evaluation_questions) < cfg.n_questions:
            raise ValueError(f"n_questions={cfg.n_questions}; trait {n!r} has {len(traits[n].evaluation_questions)}")
    ppl = ppl_docs(cfg.n_ppl_docs, cfg.seed, cfg.ppl_max_chars)
    norm = float(typical_norms(model, [p + [{"role": "assistant", "content": a}] for p, a in zip(*ppl)],
                               batch_size=measures.even_batch(len(ppl[0]), cfg.batch_size))[sae.layer])
    rand_units = random_directions(cfg.seed * 1000 + 17, cfg.n_random, model.config.d_model, 1.0)
    results = {}
    for name in names:
        info = ranked_info(cand["traits"][name], cfg.ranking, name)
        results[name] = steer_trait(model, sae, traits[name], info, directions[name], cfg=cfg, norm=norm, ppl=ppl,
                                    rand_units=rand_units, progress=progress)
        r = results[name]
        say(f"{name}: best latent z {_f(r['edits'][r['best']]['z'], '.2f')}, vector z "
            f"{_f(r['edits']['persona vector']['z'], '.2f')}, measure {'valid' if r['validity']['valid'] else 'NOT valid'}")
    return Result(config=cfg, layer=sae.layer, sae=sae.describe(), typical_norm=norm, n_ppl_docs=len(ppl[0]),
                  traits=results, seconds=time.time() - t0, default_layer=default_sae_layer(model.config.n_layers))


report, records = written_by("experiments.feature_steering_report")
