"""Refusal direction (after Arditi et al. 2024): difference in means, selection, ablation, weight edit.

1. Prompts: harmful / harmless instructions (psm_jax/persona/data/refusal), each as one user turn with
   the generation prompt. Training prompts (split "train", first `n_train` after a seeded shuffle)
   give the direction, validation prompts (split "val") select it, and the *next* `n_eval`
   training prompts (never used for the direction or the selection) are the held-out evaluation.
2. Refusal score: log P(S) - log(1 - P(S)) at the last prompt position, S = the first token of
   each refusal score marker with and without a leading space (`refusal_token_ids`).
   Optionally the training prompts are filtered by its sign (harmful > 0, harmless < 0).
3. Candidates: difference in means (float64) of `resid_pre` at every layer, at each
   post-instruction template position (the chat-template tokens after the user content, e.g.
   `<|im_end|>\\n<|im_start|>assistant\\n`; given as negative offsets from the prompt's end).
4. Selection per (position, layer): bypass = mean refusal score on harmful val with the unit
   direction ablated everywhere (project_out at resid_pre, attn_out and mlp_out of every layer,
   all positions); induce = mean refusal score on harmless val with +1 x the raw direction added
   at resid_pre of that layer (all positions); KL(base || ablated) at the last position on harmless
   val. Candidates at layers >= max_layer_frac * n_layers, with KL > kl_threshold or induce <
   induce_threshold are dropped; the lowest bypass wins. Directions and layer masks are traced
   inputs of one compiled forward per edit kind: no recompilation per candidate.
5. Evaluation on the held-out prompts: refusal log-odds and refusal rate (greedy generation, a
   refusal marker found anywhere in the answer) before and after ablation (and with the direction
   added on harmless prompts); cross-entropy on held-out ShareGPT assistant tokens with and without the
   ablation (interval over conversations); the max |logit difference| between runtime ablation and
   orthogonalised weights. Two nulls, each a 95% band of the drop and of the induce rise: `n_random` random unit
   directions, and `n_shuffled` difference-in-means directions at the selected position and layer with the
   harmful / harmless labels of the train prompts shuffled (the same activations and recipe, no harmfulness);
   each is ablated like the selected direction and added at its norm like it. Beside the drops, the KL each
   ablation costs on the held-out harmless prompts (the selection rule's measure), so a drop can be read against
   the damage that comes with it. Every headline's interval is a bootstrap over the held-out prompts.
6. The score's validity check: the AUROC of the unedited refusal log-odds for telling the held-out prompts (both
   sides) whose greedy answer refuses from those whose answer does not; the log-odds headlines are evidence about
   refusal only where its interval lies above 0.5 and at least 5 answers fall on each side.

The method (prompts, scores, candidates, selection, edits, nulls) is `psm_jax.persona.refusal`; this module runs it
end to end, and `experiments.refusal_report` writes what it found.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Sequence

import numpy as np

from experiments.sharegpt import sharegpt_conversations
from experiments.study import written_by
from psm_jax.persona import measures
from psm_jax.persona.directions import random_directions
from psm_jax.persona.refusal import (Prompts, ablation_kl, condition_edits, direction_nulls, encode_prompts,
                                     evaluate_candidates, last_logits, mean_diff_directions, orthogonalized_check,
                                     refusal_rate, refusal_scores, refusal_token_ids, score_validity,
                                     select_with_fallback, shuffled_label_directions)
from psm_jax.persona.stats import MIN_NULL_DRAWS




@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m-instruct"
    n_train: int = 64  # per side: prompts for the difference in means (before filtering)
    n_val: int = 32  # per side: selection prompts (split "val")
    n_eval: int = 32  # per side: held-out prompts (split "train", after the first n_train)
    filter_train: bool = True  # keep harmful train prompts with score > 0 and harmless with score < 0
    min_filtered: int = 8  # a side left with fewer prompts after filtering stays unfiltered (reported)
    positions: tuple[int, ...] | None = None  # candidate post-instruction offsets (< 0); None = all
    layers: tuple[int, ...] | None = None  # candidate layers; None = every layer
    max_layer_frac: float = 0.8
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    fallback: bool = True  # if no candidate passes the rules, relax them in order (see select_with_fallback)
    batch_size: int = 16
    max_new_tokens: int = 32
    n_ce: int = 32  # held-out ShareGPT conversations for the CE check (the interval's units)
    ce_max_messages: int = 4  # each cut to its first messages and characters
    ce_max_chars: int = 1000
    n_random: int = 20  # random directions ablated / added like the selected one: the nulls' bands (0: none)
    n_shuffled: int = 20  # label-shuffled difference-in-means directions, ablated / added like it (0: none)
    seed: int = 0

    def __post_init__(self):
        for name in ("n_train", "n_val", "n_eval", "batch_size", "max_new_tokens", "ce_max_messages",
                     "ce_max_chars"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected an int >= 1")
        for name in ("n_random", "n_shuffled"):
            n = getattr(self, name)
            if n != 0 and n < MIN_NULL_DRAWS:
                raise ValueError(f"{name}={n}; expected 0 (no null band) or >= {MIN_NULL_DRAWS}")
        if self.n_ce < 0 or self.min_filtered < 1:
            raise ValueError(f"n_ce={self.n_ce}, min_filtered={self.min_filtered}; "
                             "expected n_ce >= 0, min_filtered >= 1")
        if not 0.0 < self.max_layer_frac <= 1.0:
            raise ValueError(f"max_layer_frac={self.max_layer_frac}; expected a fraction in (0, 1]")
        if not self.kl_threshold > 0:
            raise ValueError(f"kl_threshold={self.kl_threshold}; expected > 0")
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
            if not self.positions or any(p >= 0 for p in self.positions):
                raise ValueError(f"positions={self.positions}; expected negative offsets from the prompt end (e.g. -1)")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
            if not self.layers or any(x < 0 for x in self.layers):
                raise ValueError(f"layers={self.layers}; expected non-negative layer indices")


PRESETS = {
    "ci": dict(n_train=8, n_val=8, n_eval=8, n_ce=2, positions=(-1,), layers=tuple(range(0, 24, 8)),
               max_new_tokens=12),
    "quick": dict(n_train=16, n_val=16, n_eval=16, n_ce=8, positions=(-1, -6), layers=tuple(range(0, 24, 4))),
    "full": {},
}



def _split(texts: Sequence[str], rng: np.random.Generator) -> list[str]:
    texts = list(texts)
    return [texts[i] for i in rng.permutation(len(texts))]


@dataclasses.dataclass
class Result:
    """Everything the report shows: the candidates and their scores, the selected direction, the held-out
    evaluation (`ev`: log-odds per condition; `gen`: refusal rates and answers), the CE check, timings."""

    config: Config
    n_layers: int
    d_model: int
    layers: tuple
    offsets: list
    pos_names: list
    token_ids: list
    token_strs: list
    markers: object
    candidates: list
    cand_pos: list
    dirs: np.ndarray
    annotated: list
    best: dict
    tier: str
    fallback_used: bool
    filt: dict
    harmful_val_base: float
    harmless_val_base: float
    direction: np.ndarray
    unit: np.ndarray
    e_harm: Prompts
    e_safe: Prompts
    ev: dict
    gen: dict
    drop: float
    orth_diff: float
    orth_scores: np.ndarray
    ce: dict
    seconds: dict
    ablation_kl: np.ndarray | None = None  # per held-out harmless prompt: KL(unedited || selected ablated)
    validity: dict | None = None  # the refusal score's AUROC for the refusing answers (`score_validity`)
    nulls: dict = dataclasses.field(default_factory=dict)  # "random" / "shuffled": {drops, rises, kls} per direction


def _candidate_layers(cfg: Config, mc) -> tuple:
    """The candidate layers (default: every layer), checked against the model before any work starts."""
    layers = tuple(range(mc.n_layers)) if cfg.layers is None else cfg.layers
    for layer in layers:
        mc.check_layer(layer, "candidate layer")
    return layers


def _split_texts(cfg: Config, train, val) -> list[list[str]]:
    """Harmful and harmless texts of the train, val and held-out sets, from seeded shuffles: the held-out prompts
    are train-split prompts after the first n_train, so they neither give nor select the direction."""
    rng = np.random.default_rng(cfg.seed)
    harm_train, safe_train = _split(train.harmful_texts, rng), _split(train.harmless_texts, rng)
    harm_val, safe_val = _split(val.harmful_texts, rng), _split(val.harmless_texts, rng)
    need = cfg.n_train + cfg.n_eval
    if len(harm_train) < need or len(safe_train) < need:
        raise ValueError(f"n_train + n_eval = {need} exceeds the training prompts ({len(harm_train)} harmful, "
                         f"{len(safe_train)} harmless)")
    if len(harm_val) < cfg.n_val or len(safe_val) < cfg.n_val:
        raise ValueError(f"n_val = {cfg.n_val} exceeds the validation prompts ({len(harm_val)}, {len(safe_val)})")
    return [harm_train[:cfg.n_train], safe_train[:cfg.n_train], harm_val[:cfg.n_val], safe_val[:cfg.n_val],
            harm_train[cfg.n_train:need], safe_train[cfg.n_train:need]]


def _candidates(cfg: Config, offsets: np.ndarray, layers) -> tuple[list[int], list[tuple[int, int]]]:
    """The candidate offsets and their (position index, layer) pairs; configured positions must be
    post-instruction offsets of this chat template."""
    if cfg.positions is not None:
        bad = [p for p in cfg.positions if p not in offsets.tolist()]
        if bad:
            raise ValueError(f"positions {bad} are not post-instruction offsets; expected some of {offsets.tolist()}")
    pos_index = {int(o): i for i, o in enumerate(offsets.tolist())}
    cand_pos = offsets.tolist() if cfg.positions is None else list(cfg.positions)
    return cand_pos, [(pos_index[p], layer) for p in cand_pos for layer in layers]


def _sign_filter(cfg: Config, s_harm: np.ndarray, s_safe: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Indices of the train prompts kept for the difference in means (with `filter_train`: the ones the model
    already scores on their side's sign) and the counts the report shows."""
    filt = {"harmful_before": len(s_harm), "harmless_before": len(s_safe)}
    keep_h, keep_s = np.arange(len(s_harm)), np.arange(len(s_safe))
    if cfg.filter_train:
        kh, ks = np.flatnonzero(s_harm > 0), np.flatnonzero(s_safe < 0)
        filt["harmful_passing"], filt["harmless_passing"] = len(kh), len(ks)
        filt["harmful_unfiltered_fallback"] = bool(len(kh) < cfg.min_filtered)
        filt["harmless_unfiltered_fallback"] = bool(len(ks) < cfg.min_filtered)
        keep_h = kh if len(kh) >= cfg.min_filtered else keep_h
        keep_s = ks if len(ks) >= cfg.min_filtered else keep_s
    filt["harmful_after"], filt["harmless_after"] = len(keep_h), len(keep_s)
    return keep_h, keep_s, filt


def _select(cfg: Config, scores: list[dict], offsets: np.ndarray, pos_names: list, n_layers: int,
            harmless_baseline: float) -> tuple[dict, list[dict], str]:
    """The candidate scores labelled with their offset and template token, then the selection rules with the
    pre-declared fallback; a run where no candidate passes stops here."""
    labelled = [dict(s, offset=int(offsets[s["position"]]), token=pos_names[s["position"]]) for s in scores]
    best, annotated, tier = select_with_fallback(
        labelled, n_layers, harmless_baseline=harmless_baseline, max_layer_frac=cfg.max_layer_frac,
        kl_threshold=cfg.kl_threshold, induce_threshold=cfg.induce_threshold, fallback=cfg.fallback)
    if best is None:
        raise RuntimeError("no candidate direction passes the selection filters (see the scores); "
                           "widen the candidates or enable the fallback")
    return best, annotated, tier


def _selected_direction(dirs: np.ndarray, best: dict) -> tuple[np.ndarray, np.ndarray]:
    """The winning difference in means (float64) and its unit vector: the raw one is added, the unit one ablated."""
    direction = np.asarray(dirs[best["position"], best["layer"]], np.float64)
    return direction, direction / np.linalg.norm(direction)


def _null_units(cfg: Config, model, train_sets: tuple[Prompts, Prompts], best: dict) -> dict[str, np.ndarray]:
    """The stand-in unit directions of each null the config asks for: random (seed + 1) and label-shuffled
    difference in means at the selected offset and layer over the (filtered) train prompts (seed + 2)."""
    units = {}
    if cfg.n_random:
        units["random"] = random_directions(cfg.seed + 1, cfg.n_random, model.config.d_model, 1.0)
    if cfg.n_shuffled:
        units["shuffled"] = shuffled_label_directions(model.params, model.config, *train_sets, offset=best["offset"],
                                                      layer=best["layer"], n=cfg.n_shuffled, seed=cfg.seed + 2,
                                                      batch_size=cfg.batch_size)
    return units


def _nulls(cfg: Config, model, units: dict, harmful: Prompts, harmless: Prompts, token_ids, ev: dict, norm: float,
           layer: int, harmless_logits: np.ndarray) -> dict:
    """Each null's drops, rises and KL costs (`direction_nulls`), keyed like `units`."""
    return {name: direction_nulls(model.params, model.config, u, harmful, harmless, token_ids,
                                  harmful_base=float(ev["harmful_base"].mean()),
                                  harmless_base=float(ev["harmless_base"].mean()), norm=norm, layer=layer,
                                  batch_size=cfg.batch_size, harmless_logits=harmless_logits)
            for name, u in units.items()}


def _conditions(harmful: Prompts, harmless: Prompts, base, ablate, induce) -> dict[str, tuple[Prompts, tuple]]:
    """The held-out conditions as (prompts, edits), in report order: one list for the log-odds and the
    generations."""
    return {"harmful_base": (harmful, base), "harmful_ablated": (harmful, ablate),
            "harmless_base": (harmless, base), "harmless_induced": (harmless, induce)}


def _ce_check(model, cfg: Config, ablate) -> dict:
    """Cross-entropy on held-out ShareGPT assistant tokens without and with the ablation: what the edit costs on
    ordinary chat, with its interval over conversations ({} when n_ce = 0)."""
    if cfg.n_ce <= 0:
        return {}
    conversations = sharegpt_conversations(cfg.n_ce, cfg.seed, cfg.ce_max_messages, cfg.ce_max_chars,
                                           min_assistant_turns=1)
    return measures.chat_fluency_cost(model, conversations, lambda batch: ablate,
                                      batch_size=max(1, cfg.batch_size // 4), seed=cfg.seed)


@contextlib.contextmanager
def _timed(seconds: dict, name: str):
    """Records the wall-clock seconds of the block under `name` (the report's timing line)."""
    t = time.time()
    yield
    seconds[name] = time.time() - t


def run(config: Config, model, progress=None) -> Result:
    """The whole pipeline: directions, selection, held-out evaluation, the CE check (`progress`: a callable for
    status lines, or None; when given, progress bars are shown too). No files."""
    from psm_jax.persona import datasets

    t0, seconds, cfg, bars = time.time(), {}, config, progress is not None
    params, mc, bs = model.params, model.config, config.batch_size
    layers = _candidate_layers(cfg, mc)
    base = condition_edits(mc)  # every edit switched off: the same compiled functions as the edited runs
    train, val = datasets.load_refusal("train"), datasets.load_refusal("val")
    markers = datasets.load_refusal_markers()
    prompt_sets, offsets, pos_names = encode_prompts(model, _split_texts(cfg, train, val))
    p_harm, p_safe, v_harm, v_safe, e_harm, e_safe = prompt_sets
    cand_pos, candidates = _candidates(cfg, offsets, layers)
    token_ids = refusal_token_ids(model.tokenizer, markers.score_tokens)
    token_strs = [model.tokenizer.convert_ids_to_tokens(i) for i in token_ids]

    with _timed(seconds, "baseline_scores"):
        keep_h, keep_s, filt = _sign_filter(cfg, refusal_scores(params, mc, p_harm, token_ids, base, bs),
                                            refusal_scores(params, mc, p_safe, token_ids, base, bs))
    with _timed(seconds, "mean_diff"):
        dirs = mean_diff_directions(params, mc, p_harm.subset(keep_h), p_safe.subset(keep_s), offsets, bs,
                                    progress=bars)
    with _timed(seconds, "selection"):
        scores = evaluate_candidates(params, mc, dirs, candidates, v_harm, v_safe, token_ids, bs, progress=bars)
        harmless_val_base = float(refusal_scores(params, mc, v_safe, token_ids, base, bs).mean())
        harmful_val_base = float(refusal_scores(params, mc, v_harm, token_ids, base, bs).mean())
        best, annotated, tier = _select(cfg, scores, offsets, pos_names, mc.n_layers, harmless_val_base)
    direction, unit = _selected_direction(dirs, best)
    abl = condition_edits(mc, unit=unit, ablate=True)
    conditions = _conditions(e_harm, e_safe, base, abl,
                             condition_edits(mc, vector=direction, induce_layer=best["layer"]))

    with _timed(seconds, "logodds_eval"):
        ev = {k: refusal_scores(params, mc, p, token_ids, edits, bs) for k, (p, edits) in conditions.items()}
        drop = float(ev["harmful_base"].mean() - ev["harmful_ablated"].mean())
        safe_logits = last_logits(params, mc, e_safe, base, bs)
        kl = ablation_kl(params, mc, e_safe, unit, safe_logits, bs)
        units = _null_units(cfg, model, (p_harm.subset(keep_h), p_safe.subset(keep_s)), best)
        nulls = _nulls(cfg, model, units, e_harm, e_safe, token_ids, ev, float(np.linalg.norm(direction)),
                       best["layer"], safe_logits)
        orth_diff, orth_scores = orthogonalized_check(params, mc, unit, e_harm, token_ids, bs)
    with _timed(seconds, "generation"):
        gen = {k: refusal_rate(model, p.texts, markers, edits, max_new_tokens=cfg.max_new_tokens, batch_size=bs)
               for k, (p, edits) in conditions.items()}
    validity = score_validity(np.concatenate([ev["harmful_base"], ev["harmless_base"]]),
                              gen["harmful_base"][2] + gen["harmless_base"][2], markers, seed=cfg.seed)
    with _timed(seconds, "ce"):
        ce = _ce_check(model, cfg, abl)
    seconds["total"] = time.time() - t0

    return Result(config=cfg, n_layers=mc.n_layers, d_model=mc.d_model, layers=layers, offsets=offsets,
                  pos_names=pos_names, token_ids=token_ids, token_strs=token_strs, markers=markers,
                  candidates=candidates, cand_pos=cand_pos, dirs=dirs, annotated=annotated, best=best, tier=tier,
                  fallback_used=tier != "strict", filt=filt, harmful_val_base=harmful_val_base,
                  harmless_val_base=harmless_val_base, direction=direction, unit=unit, e_harm=e_harm, e_safe=e_safe,
                  ev=ev, gen=gen, drop=drop, orth_diff=orth_diff, orth_scores=orth_scores, ce=ce, seconds=seconds,
                  ablation_kl=kl, nulls=nulls, validity=validity)



report, records = written_by("experiments.refusal_report")
