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
   added on harmless prompts); cross-entropy on ShareGPT assistant tokens with and without the
   ablation; the max |logit difference| between runtime ablation and orthogonalised weights. The nulls:
   the same ablation along each of `n_random` random unit directions (the drop's 95% band), and each
   of those directions at the selected direction's norm added like it (the induce rise's band); every
   headline's interval is a bootstrap over the held-out prompts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psm_jax import edits as E
from psm_jax.chat import Role, encode_chat, pad_batch, pad_id, post_instruction_positions
from psm_jax.logits import kl_divergence, target_window_size, token_set_log_odds
from psm_jax.model import Capture, forward
from psm_jax.persona.rollouts import answer_logprob, static_batches
from psm_jax.persona.directions import random_directions
from psm_jax.persona.stats import MIN_NULL_DRAWS, bootstrap_ci, null_band

ABLATION_SITES = ("resid_pre", "attn_out", "mlp_out")
PAD_MULTIPLE = 16


# ------------------------------------------------------------------------------------ config


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
    n_ce: int = 32  # ShareGPT conversations for the CE check
    ce_max_tokens: int = 256
    ce_min_assistant_tokens: int = 16
    n_random: int = 20  # random directions ablated / added like the selected one: the nulls' bands (0: none)
    seed: int = 0

    def __post_init__(self):
        for name in ("n_train", "n_val", "n_eval", "batch_size", "max_new_tokens", "ce_max_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected an int >= 1")
        if self.n_random != 0 and self.n_random < MIN_NULL_DRAWS:
            raise ValueError(f"n_random={self.n_random}; expected 0 (no null band) or >= {MIN_NULL_DRAWS}")
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


# ------------------------------------------------------------------------------------ prompts


@dataclasses.dataclass
class Prompts:
    """Left-padded prompts of one common length (so every batch has the same shape)."""

    tokens: np.ndarray  # int32 [N, T]
    mask: np.ndarray  # bool [N, T]
    texts: list

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def subset(self, idx) -> "Prompts":
        idx = np.asarray(idx, np.int64)
        return Prompts(self.tokens[idx], self.mask[idx], [self.texts[i] for i in idx])


def encode_prompts(model, instruction_sets: Sequence[Sequence[str]]) -> tuple[list[Prompts], np.ndarray, list[str]]:
    """Encode every instruction as [user] + generation prompt; pad all sets to one length.

    Returns (one Prompts per set, the post-instruction offsets (negative, e.g. [-5..-1]), their
    token strings). Every prompt must end with the same post-instruction template tokens."""
    encs_per_set = [[encode_chat(model.tokenizer, [{"role": "user", "content": t}], add_generation_prompt=True,
                                 chat_template=model.chat_template) for t in texts] for texts in instruction_sets]
    all_encs = [e for encs in encs_per_set for e in encs]
    if not all_encs:
        raise ValueError("no prompts to encode; expected at least one instruction")
    first = all_encs[0]
    offsets = post_instruction_positions(first) - len(first)
    if offsets.size == 0:
        raise ValueError("the chat template leaves no template tokens after the user content; "
                         "expected post-instruction positions (e.g. '<|im_start|>assistant')")
    tail = first.tokens[offsets]
    for e in all_encs:
        off = post_instruction_positions(e) - len(e)
        if off.shape != offsets.shape or not np.array_equal(e.tokens[off], tail):
            raise ValueError("prompts end with different post-instruction template tokens; expected one template "
                             f"suffix for all (got {e.tokens[off].tolist()} vs {tail.tolist()})")
    length = max(len(e) for e in all_encs)
    pad = pad_id(model)
    out = []
    for texts, encs in zip(instruction_sets, encs_per_set):
        if not encs:
            out.append(Prompts(np.zeros((0, length), np.int32), np.zeros((0, length), bool), []))
            continue
        b = pad_batch(encs, pad, side="left", length=length, multiple_of=PAD_MULTIPLE)
        out.append(Prompts(b.tokens, b.attention_mask, list(texts)))
    names = [model.tokenizer.convert_ids_to_tokens(int(t)) for t in tail]
    return out, offsets.astype(np.int64), names


def refusal_token_ids(tokenizer, score_tokens: Sequence[str]) -> list[int]:
    """First token id of each refusal score marker, with and without a leading space (deduplicated)."""
    ids = []
    for s in score_tokens:
        if not isinstance(s, str) or not s.strip():
            raise ValueError(f"refusal score token {s!r}; expected a non-empty string")
        for variant in (s, " " + s):
            toks = tokenizer.encode(variant, add_special_tokens=False)
            if len(toks):
                ids.append(int(toks[0]))
    if not ids:
        raise ValueError(f"no token ids for the refusal score tokens {list(score_tokens)!r}")
    return sorted(set(ids))


def _progress_bar(items, show: bool, **tqdm_kw):
    """`items` wrapped in a tqdm bar when `show`, so tqdm is imported only when a bar is shown."""
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, **tqdm_kw)


def batches(prompts: Prompts, batch_size: int, *, progress: bool = False, desc: str = "batch"):
    """(tokens, mask, n_real) of fixed batch size (`rollouts.static_batches`: the last batch is filled with copies
    of its last row, one static shape for the compiled functions)."""
    for _, idx, n_real in static_batches(np.arange(len(prompts)), batch_size, progress=progress, desc=desc):
        yield jnp.asarray(prompts.tokens[idx]), jnp.asarray(prompts.mask[idx]), n_real


# ------------------------------------------------------------------------------------ compiled pieces


@functools.partial(jax.jit, static_argnames=("config",))
def _last_logits(params, config, tokens, mask, edits):
    return forward(params, config, tokens, attention_mask=mask, edits=edits, logits_positions="last").logits[:, -1]


@functools.partial(jax.jit, static_argnames=("config",))
def _capture_resid_pre(params, config, tokens, mask, offsets):
    out = forward(params, config, tokens, attention_mask=mask, capture=Capture(sites=("resid_pre",)),
                  return_logits=False)
    h = out.captured["resid_pre"]  # [L, B, T, D]
    return jnp.take(h, tokens.shape[1] + offsets, axis=2)  # [L, B, P, D]


@jax.jit
def _log_odds(logits, token_ids):
    return token_set_log_odds(logits, token_ids)


@jax.jit
def _kl_rows(base, other):
    return jax.vmap(lambda p, q: kl_divergence(p[None], q[None]))(base, other)


def ablation_edits(config, direction) -> tuple:
    """Directional ablation: project the unit direction out at resid_pre, attn_out, mlp_out of every layer."""
    return tuple(E.project_out(config, direction, layers="all", site=s) for s in ABLATION_SITES)


def induce_edit(config, vector, layer: int, coef: float = 1.0) -> tuple:
    """+coef x vector at resid_pre of `layer`, all positions."""
    return (E.add(config, vector, layers=[layer], coef=coef, site="resid_pre"),)


def condition_edits(config, *, unit=None, vector=None, ablate: bool = False, induce_layer: int | None = None) -> tuple:
    """One edit structure for every condition, so each compiled function serves them all:
    project_out at resid_pre/attn_out/mlp_out (layers all when `ablate`, else none) followed by
    +1 x `vector` at resid_pre of `induce_layer` (none when None). Switched-off edits leave the
    activations bit-identical (the forward selects the unedited value)."""
    L, D = config.n_layers, config.d_model
    none = np.zeros(L, bool)
    if ablate and unit is None:
        raise ValueError("ablate=True needs a direction (unit=...)")
    if induce_layer is not None and vector is None:
        raise ValueError("induce_layer needs a vector (vector=...)")
    u = np.eye(1, D, dtype=np.float32)[0] if unit is None else np.asarray(unit, np.float32)
    v = np.zeros(D, np.float32) if vector is None else np.asarray(vector, np.float32)
    out = [E.project_out(config, u, layers="all" if ablate else none, site=s) for s in ABLATION_SITES]
    out.append(E.add(config, v, layers=none if induce_layer is None else [int(induce_layer)], coef=1.0,
                     site="resid_pre"))
    return tuple(out)


def last_logits(params, config, prompts: Prompts, edits=(), batch_size: int = 16) -> np.ndarray:
    out = []
    for tok, mask, n in batches(prompts, batch_size):
        out.append(np.asarray(_last_logits(params, config, tok, mask, tuple(edits)))[:n])
    return np.concatenate(out) if out else np.zeros((0, config.vocab_size), np.float32)


def refusal_scores(params, config, prompts: Prompts, token_ids, edits=(), batch_size: int = 16,
                   logits: np.ndarray | None = None) -> np.ndarray:
    """Refusal log-odds per prompt at the last position [N]."""
    lg = last_logits(params, config, prompts, edits, batch_size) if logits is None else logits
    return np.asarray(_log_odds(jnp.asarray(lg), jnp.asarray(token_ids, jnp.int32)), np.float64)


def mean_diff_directions(params, config, harmful: Prompts, harmless: Prompts, offsets, batch_size: int = 16,
                         progress: bool = False) -> np.ndarray:
    """mean(harmful) - mean(harmless) of resid_pre [P, L, D] (float64) at the post-instruction offsets."""
    if len(harmful) == 0 or len(harmless) == 0:
        raise ValueError(f"{len(harmful)} harmful and {len(harmless)} harmless prompts; expected at least one each")
    offsets = jnp.asarray(np.asarray(offsets, np.int32))
    means = []
    for prompts in (harmful, harmless):
        total = np.zeros((len(offsets), config.n_layers, config.d_model), np.float64)
        for tok, mask, n in batches(prompts, batch_size, progress=progress, desc="resid_pre means"):
            h = np.asarray(_capture_resid_pre(params, config, tok, mask, offsets))[:, :n]  # [L, n, P, D]
            total += h.astype(np.float64).sum(axis=1).transpose(1, 0, 2)
        means.append(total / len(prompts))
    return means[0] - means[1]


def evaluate_candidates(params, config, directions: np.ndarray, candidates: Sequence[tuple[int, int]],
                        harmful_val: Prompts, harmless_val: Prompts, token_ids, batch_size: int = 16,
                        progress: bool = False) -> list[dict]:
    """Bypass, induce and KL scores for each candidate (position index, layer) of directions [P, L, D].

    One compiled forward serves every candidate and condition (directions and layer masks are traced
    inputs of a fixed edit structure, see `condition_edits`).
    """
    base_harmless = last_logits(params, config, harmless_val, condition_edits(config), batch_size)
    rows = []
    scale = max(1.0, float(np.max(np.abs(directions)))) if np.size(directions) else 1.0
    for p, layer in _progress_bar(candidates, progress, desc="candidates", unit="cand"):
        vec = np.asarray(directions[p, layer], np.float32)
        norm = float(np.linalg.norm(vec))
        if not np.isfinite(norm) or norm <= 1e-6 * scale:
            # e.g. layer 0 at a template position: the same token embedding in every prompt -> zero difference
            rows.append(dict(position=int(p), layer=int(layer), bypass=float("nan"), induce=float("nan"),
                             kl=float("nan"), norm=norm))
            continue
        abl = condition_edits(config, unit=vec / norm, ablate=True)
        bypass = refusal_scores(params, config, harmful_val, token_ids, abl, batch_size)
        abl_harmless = last_logits(params, config, harmless_val, abl, batch_size)
        kl = np.asarray(_kl_rows(jnp.asarray(base_harmless), jnp.asarray(abl_harmless)), np.float64)
        induce = refusal_scores(params, config, harmless_val, token_ids,
                                condition_edits(config, vector=vec, induce_layer=layer), batch_size)
        rows.append(dict(position=int(p), layer=int(layer), bypass=float(bypass.mean()), induce=float(induce.mean()),
                         kl=float(kl.mean()), norm=norm))
    return rows


def select_direction(scores: Sequence[dict], n_layers: int, *, max_layer_frac: float = 0.8,
                     kl_threshold: float = 0.1, induce_threshold: float = 0.0) -> tuple[dict | None, list[dict]]:
    """Apply the selection rules to candidate scores (dicts with layer, bypass, induce, kl).

    A candidate is dropped when layer >= max_layer_frac * n_layers, kl > kl_threshold,
    induce < induce_threshold, or any score is NaN; the lowest bypass among the rest wins.
    Returns (winner or None, every row annotated with `kept` and `reason`).
    """
    annotated, kept = [], []
    for s in scores:
        for k in ("layer", "bypass", "induce", "kl"):
            if k not in s:
                raise ValueError(f"candidate score {s!r} lacks {k!r}; expected layer, bypass, induce, kl")
        reasons = []
        if s["layer"] >= max_layer_frac * n_layers:
            reasons.append(f"layer >= {max_layer_frac:g} * n_layers")
        if not all(np.isfinite(s[k]) for k in ("bypass", "induce", "kl")):
            reasons.append("zero direction or non-finite score")
        else:
            if s["kl"] > kl_threshold:
                reasons.append(f"KL > {kl_threshold:g}")
            if s["induce"] < induce_threshold:
                reasons.append(f"induce < {induce_threshold:g}")
        row = dict(s, kept=not reasons, reason="; ".join(reasons))
        annotated.append(row)
        if not reasons:
            kept.append(row)
    best = min(kept, key=lambda r: r["bypass"]) if kept else None
    return best, annotated


FALLBACK_TIERS = ("strict", "induce_above_baseline", "kl_only", "layer_only")


def select_with_fallback(scores: Sequence[dict], n_layers: int, *, harmless_baseline: float,
                         max_layer_frac: float = 0.8, kl_threshold: float = 0.1, induce_threshold: float = 0.0,
                         fallback: bool = True) -> tuple[dict | None, list[dict], str | None]:
    """`select_direction`, then (if nothing passes and `fallback`) the same rules relaxed in order:

    induce_above_baseline  induce >= `harmless_baseline` (the direction raises the refusal score of
                           harmless prompts above their unsteered mean) instead of induce >= threshold:
                           the absolute threshold assumes a model that refuses confidently when steered;
    kl_only                layer and KL rules only;
    layer_only             the layer rule only.
    Returns (winner or None, annotated rows of the strict rules, the tier used or None).
    """
    best, annotated = select_direction(scores, n_layers, max_layer_frac=max_layer_frac, kl_threshold=kl_threshold,
                                       induce_threshold=induce_threshold)
    if best is not None or not fallback:
        return best, annotated, ("strict" if best is not None else None)
    relaxed = [
        ("induce_above_baseline", dict(kl_threshold=kl_threshold, induce_threshold=harmless_baseline)),
        ("kl_only", dict(kl_threshold=kl_threshold, induce_threshold=-np.inf)),
        ("layer_only", dict(kl_threshold=np.inf, induce_threshold=-np.inf)),
    ]
    for tier, kw in relaxed:
        best, _ = select_direction(scores, n_layers, max_layer_frac=max_layer_frac, **kw)
        if best is not None:
            return best, annotated, tier
    return None, annotated, None


# ------------------------------------------------------------------------------------ CE on ShareGPT


def sharegpt_batch(model, n: int, max_tokens: int, min_assistant: int, seed: int):
    """n ShareGPT conversations (seeded shuffle), cut to max_tokens, each with >= min_assistant
    assistant target tokens: (tokens, mask, target_mask) [n, max_tokens], and the corpus summary."""
    import dataclasses as dc

    from sae.data.corpus import load_sharegpt

    corpus = load_sharegpt(shuffle=True, seed=seed, take=max(4 * n, n + 16), max_turns=4)
    encs = []
    for conv in corpus:
        try:
            e = encode_chat(model.tokenizer, conv, chat_template=model.chat_template)
        except ValueError:
            continue
        e = dc.replace(e, tokens=e.tokens[:max_tokens], roles=e.roles[:max_tokens], turns=e.turns[:max_tokens],
                       offsets=e.offsets[:max_tokens])
        if int(np.sum(e.roles[1:] == Role.ASSISTANT)) >= min_assistant:
            encs.append(e)
        if len(encs) == n:
            break
    if len(encs) < n:
        raise ValueError(f"only {len(encs)} ShareGPT conversations have >= {min_assistant} assistant tokens in the "
                         f"first {max_tokens}; expected {n}")
    b = pad_batch(encs, pad_id(model), side="left", length=max_tokens)
    return b.tokens, b.attention_mask, b.roles == Role.ASSISTANT, corpus.report.summary()


@functools.partial(jax.jit, static_argnames=("config", "window"))
def _nll_sum(params, config, tokens, mask, target_mask, edits, *, window: int):
    targets = target_mask & mask
    nll = -jnp.sum(answer_logprob(params, config, tokens, mask, targets, edits, window=window))
    return nll, jnp.sum(targets[:, 1:])


def cross_entropy(params, config, tokens, mask, target_mask, edits=(), batch_size: int = 8) -> float:
    """Token-weighted mean next-token CE (nats) over the target tokens."""
    total, count = 0.0, 0
    for _, idx, n_real in static_batches(np.arange(tokens.shape[0]), batch_size):
        idx = np.asarray(idx)
        tm = target_mask[idx[:n_real]]
        if n_real < batch_size:  # fill rows count nothing
            tm = np.concatenate([tm, np.zeros((batch_size - n_real, tm.shape[1]), bool)])
        s, c = _nll_sum(params, config, jnp.asarray(tokens[idx]), jnp.asarray(mask[idx]), jnp.asarray(tm),
                        tuple(edits), window=target_window_size(tm & np.asarray(mask[idx], bool)))
        total += float(s)
        count += int(c)
    return total / max(count, 1)


# ------------------------------------------------------------------------------------ generation


def refusal_rate(model, instructions: Sequence[str], markers, edits=(), *, max_new_tokens: int = 32,
                 batch_size: int = 16) -> tuple[float, float, list[str]]:
    """Greedy answers; (rate with a marker anywhere, rate with a marker as prefix, answers)."""
    from psm_jax.persona.rollouts import generate_responses

    convs = [[{"role": "user", "content": t}] for t in instructions]
    edits = tuple(edits)
    rolls = generate_responses(model, convs, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               edits_fn=(lambda batch: edits) if edits else None)
    answers = [r.response for r in rolls]
    anywhere = float(np.mean([markers.is_refusal(a, anywhere=True) for a in answers])) if answers else float("nan")
    prefix = float(np.mean([markers.is_refusal(a) for a in answers])) if answers else float("nan")
    return anywhere, prefix, answers


# ------------------------------------------------------------------------------------ run


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
    random_drops: np.ndarray | None = None  # the drop when each of n_random random unit directions is ablated
    random_rises: np.ndarray | None = None  # the induce rise when each is added at the direction's norm instead


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


def _random_nulls(params, mc, harmful: Prompts, harmless: Prompts, token_ids, ev: dict, norm: float, layer: int,
                  cfg: Config) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The nulls of both headlines, for each of `cfg.n_random` random unit directions: the mean refusal log-odds
    drop on harmful prompts when it is ablated instead of the selected direction (what removing any one direction
    costs), and the mean rise on harmless prompts when it is added at the selected direction's norm and layer (what
    any push of that size does). The directions are traced, so every one runs through the same compiled forwards."""
    if cfg.n_random == 0:
        return None, None
    units = random_directions(cfg.seed + 1, cfg.n_random, mc.d_model, 1.0)

    def mean_score(prompts, edits):
        return float(refusal_scores(params, mc, prompts, token_ids, edits, cfg.batch_size).mean())

    drops = [ev["harmful_base"].mean() - mean_score(harmful, condition_edits(mc, unit=u, ablate=True)) for u in units]
    rises = [mean_score(harmless, condition_edits(mc, vector=norm * u, induce_layer=layer)) - ev["harmless_base"].mean()
             for u in units]
    return np.array(drops, np.float64), np.array(rises, np.float64)


def _band_null(draws: np.ndarray | None, how: str) -> str:
    """The null text of a headline read against random directions: the band of `draws`, or why there is none."""
    if draws is None:
        return "0; no random-direction control in this run (n_random=0)"
    band = null_band(draws)
    return f"{len(draws)} random directions {how}: 95% band [{band['low']:+.3f}, {band['high']:+.3f}]"


def _drop_null(res: Result) -> str:
    return _band_null(res.random_drops, "(unit norm) ablated the same way")


def _rise_null(res: Result) -> str:
    return _band_null(res.random_rises, f"at the direction's norm added at L{res.best['layer']}")


def _conditions(harmful: Prompts, harmless: Prompts, base, ablate, induce) -> dict[str, tuple[Prompts, tuple]]:
    """The held-out conditions as (prompts, edits), in report order: one list for the log-odds and the
    generations."""
    return {"harmful_base": (harmful, base), "harmful_ablated": (harmful, ablate),
            "harmless_base": (harmless, base), "harmless_induced": (harmless, induce)}


def _orthogonalized_check(params, mc, unit: np.ndarray, prompts: Prompts, ablate, token_ids,
                          batch_size: int) -> tuple[float, np.ndarray]:
    """Max |logit difference| between runtime ablation and orthogonalised weights (the weight edit must match the
    runtime edit), and the refusal scores with the orthogonalised weights."""
    from psm_jax.weights import orthogonalize

    p_orth, c_orth = orthogonalize(params, mc, unit)
    lg_runtime = last_logits(params, mc, prompts, ablate, batch_size)
    lg_orth = last_logits(p_orth, c_orth, prompts, (), batch_size)
    orth_diff = float(np.max(np.abs(lg_runtime - lg_orth)))
    return orth_diff, refusal_scores(p_orth, c_orth, prompts, token_ids, logits=lg_orth)


def _ce_check(model, cfg: Config, base, ablate) -> dict:
    """Cross-entropy on ShareGPT assistant tokens without and with the ablation: what the edit costs on ordinary
    chat ({} when n_ce = 0)."""
    if cfg.n_ce <= 0:
        return {}
    params, mc, bs = model.params, model.config, max(1, cfg.batch_size // 2)
    toks, mask, tmask, corpus_summary = sharegpt_batch(model, cfg.n_ce, cfg.ce_max_tokens,
                                                       cfg.ce_min_assistant_tokens, cfg.seed)
    ce = {"base": cross_entropy(params, mc, toks, mask, tmask, base, batch_size=bs)}
    ce["ablated"] = cross_entropy(params, mc, toks, mask, tmask, ablate, batch_size=bs)
    ce["change_pct"] = 100.0 * (ce["ablated"] - ce["base"]) / ce["base"]
    ce["n_tokens"] = int(tmask[:, 1:].sum())
    ce["corpus"] = corpus_summary
    return ce


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
        random_drops, random_rises = _random_nulls(params, mc, e_harm, e_safe, token_ids, ev,
                                                   float(np.linalg.norm(direction)), best["layer"], cfg)
        orth_diff, orth_scores = _orthogonalized_check(params, mc, unit, e_harm, abl, token_ids, bs)
    with _timed(seconds, "generation"):
        gen = {k: refusal_rate(model, p.texts, markers, edits, max_new_tokens=cfg.max_new_tokens, batch_size=bs)
               for k, (p, edits) in conditions.items()}
    with _timed(seconds, "ce"):
        ce = _ce_check(model, cfg, base, abl)
    seconds["total"] = time.time() - t0

    return Result(config=cfg, n_layers=mc.n_layers, d_model=mc.d_model, layers=layers, offsets=offsets,
                  pos_names=pos_names, token_ids=token_ids, token_strs=token_strs, markers=markers,
                  candidates=candidates, cand_pos=cand_pos, dirs=dirs, annotated=annotated, best=best, tier=tier,
                  fallback_used=tier != "strict", filt=filt, harmful_val_base=harmful_val_base,
                  harmless_val_base=harmless_val_base, direction=direction, unit=unit, e_harm=e_harm, e_safe=e_safe,
                  ev=ev, gen=gen, drop=drop, orth_diff=orth_diff, orth_scores=orth_scores, ce=ce, seconds=seconds,
                  random_drops=random_drops, random_rises=random_rises)


def report(res: Result, folder) -> Path:
    from experiments.report import Report, pyplot

    plt = pyplot()
    cfg, best = res.config, res.best
    rep = Report(folder, "Refusal direction (difference in means, directional ablation)", cfg)
    rep.section("Setup", _setup_text(res))
    rep.section("Baseline refusal", _baseline_text(res.gen["harmful_base"][0], res.gen["harmless_induced"][0]))
    rep.table("Selected direction", [dict(position=_candidate_name(best), layer=best["layer"], bypass=best["bypass"],
                                          induce=best["induce"], kl=best["kl"], norm=best["norm"], tier=res.tier)])
    rep.table("Candidates, lowest bypass first (top 15)",
              [dict(candidate=_candidate_name(r), bypass=r["bypass"], induce=r["induce"], kl=r["kl"], kept=r["kept"],
                    dropped_for=r["reason"]) for r in sorted(res.annotated, key=lambda r: r["bypass"])[:15]])
    rep.table(f"Held-out evaluation ({cfg.n_eval} prompts per side)", _heldout_rows(res))
    rep.section("Ablation effect", _ablation_text(res))
    rep.section("Example answers (greedy)", _examples_text(res))
    rep.figure("selection_scores", _selection_figure(plt, res),
               "Selection scores per (position, layer); blank = not evaluated; red star = selected; dashed line = "
               "layer cut.")
    rep.figure("heldout_logodds", _logodds_figure(plt, res.ev),
               "Held-out refusal log-odds before/after ablation and with the direction added.")
    rep.figure("direction_norms", _norms_figure(plt, res), "Norm of the difference in means per layer and position.")
    rep.save_vectors("refusal_direction", {"direction": res.direction, "unit": res.unit},
                     dict(model=cfg.model, layer=best["layer"], site="resid_pre", method="diff-in-means",
                          position_offset=best["offset"], position_token=best["token"], d_model=res.d_model))
    rep.save_vectors("candidate_directions", {"mean_diff": res.dirs},
                     dict(model=cfg.model, site="resid_pre", method="diff-in-means", layers="all",
                          position_offsets=res.offsets.tolist(), position_tokens=res.pos_names,
                          shape="position x layer x d_model"))
    for name, value in _metrics(res).items():
        rep.metric(name, value)
    rep.section("Timing", json.dumps({k: round(v, 1) for k, v in res.seconds.items()}))
    return rep.finish()


def _mean(x) -> float:
    """The mean as a plain float, for report text, tables and metrics.json."""
    return float(np.mean(x))


def _candidate_name(row: dict) -> str:
    """How the report names a candidate: template token (offset) / layer."""
    return f"{row['token']!s} ({row['offset']}) / L{row['layer']}"


def _filter_text(cfg: Config, filt: dict) -> str:
    """How many train prompts passed the score-sign filter and how many each side's direction uses."""
    if not cfg.filter_train:
        return f"the direction uses all {filt['harmful_before']} + {filt['harmless_before']} prompts."
    harmful_kind = "unfiltered" if filt["harmful_unfiltered_fallback"] else "filtered"
    harmless_kind = "unfiltered" if filt["harmless_unfiltered_fallback"] else "filtered"
    return (f"{filt['harmful_passing']} of {filt['harmful_before']} harmful prompts score > 0 and "
            f"{filt['harmless_passing']} of {filt['harmless_before']} harmless prompts score < 0. A side "
            f"with fewer than {cfg.min_filtered} passing prompts stays unfiltered: the direction uses "
            f"{filt['harmful_after']} harmful ({harmful_kind}) and {filt['harmless_after']} harmless "
            f"({harmless_kind}) prompts.")


def _setup_text(res: Result) -> str:
    """The report's Setup section: the prompts, the refusal score and rate, the filtering, the candidates and the
    selection rules, so the numbers below can be read without the code."""
    c, L = res.config, res.n_layers
    fallback_text = ("" if not res.fallback_used else
                     " (no candidate passed the strict rules; the pre-declared relaxations, in order: "
                     "induce >= unsteered harmless mean, then KL rule only, then layer rule only; "
                     "see `select_with_fallback`).")
    return f"""
Model `{c.model}` ({L} layers, d_model {res.d_model}). Harmful/harmless prompts from `psm_jax/persona/data/refusal`
(seeded shuffle, seed {c.seed}): {c.n_train} train per side for the direction, {c.n_val} val per side for the
selection, and {c.n_eval} further *train-split* prompts per side held out for the evaluation (never used for the
direction or the selection). Each prompt is one user turn with the chat template's generation prompt (a template with
a default system prompt inserts it).

Refusal score = log P(S) - log(1 - P(S)) at the last prompt position, S = first tokens of the score markers
{list(res.markers.score_tokens)} with and without a leading space: ids {res.token_ids} = {res.token_strs}.
Refusal rate = fraction of greedy answers ({c.max_new_tokens} new tokens) containing any refusal marker
(substring check; a prefix-only variant is reported alongside).

Filtering of train prompts by score sign: {'on' if c.filter_train else 'off'}; {_filter_text(c, res.filt)}

Post-instruction positions (offsets from the prompt end): {dict(zip(res.offsets.tolist(), res.pos_names))}.
Candidates evaluated: positions {res.cand_pos} x layers {list(res.layers)} = {len(res.candidates)} candidates
(difference in means is computed and saved for all {len(res.offsets)} positions x {L} layers).
Selection: drop layer >= {c.max_layer_frac} * {L}, KL > {c.kl_threshold}, induce < {c.induce_threshold};
lowest bypass wins. Unsteered val means: harmful {res.harmful_val_base:.3f}, harmless {res.harmless_val_base:.3f}.
Selection tier used: **{res.tier}**{fallback_text}
"""


def _heldout_rows(res: Result) -> list[dict]:
    """One table row per held-out condition: mean refusal log-odds and both refusal rates."""
    labels = {"harmful_base": ("harmful held-out", "baseline"), "harmful_ablated": ("harmful held-out", "ablated"),
              "harmless_base": ("harmless held-out", "baseline"),
              "harmless_induced": ("harmless held-out", f"+1x direction at L{res.best['layer']}")}
    return [dict(prompts=prompts, condition=condition, refusal_logodds=_mean(res.ev[k]), refusal_rate=res.gen[k][0],
                 prefix_rate=res.gen[k][1]) for k, (prompts, condition) in labels.items()]


def _ablation_text(res: Result) -> str:
    """The report's Ablation effect section: the log-odds drop, the weight-edit check and the CE cost."""
    c, ev, ce = res.config, res.ev, res.ce
    frac_lower = float(np.mean(ev["harmful_ablated"] < ev["harmful_base"]))
    return f"""
Mean refusal log-odds drop on held-out harmful prompts: **{res.drop:.3f} nats**
({_mean(ev['harmful_base']):.3f} -> {_mean(ev['harmful_ablated']):.3f}); lower for {frac_lower:.0%} of the prompts.
Null: {_drop_null(res)}.
Adding the direction to the held-out harmless prompts raises their refusal log-odds by
**{_mean(ev['harmless_induced'] - ev['harmless_base']):.3f} nats**; null: {_rise_null(res)}.
Weight orthogonalisation (embedding, o_proj, down_proj; untied unembedding) vs runtime ablation:
max |logit difference| at the last position over {len(res.e_harm)} prompts = {res.orth_diff:.3g};
refusal log-odds with orthogonalised weights {_mean(res.orth_scores):.3f}.
""" + (f"""
Cross-entropy on {c.n_ce} ShareGPT conversations ({ce['n_tokens']} assistant target tokens, first
{c.ce_max_tokens} tokens of each, seed {c.seed}): {ce['base']:.4f} -> {ce['ablated']:.4f} nats
(**{ce['change_pct']:+.2f}%**). Corpus: {ce['corpus']}.
""" if ce else "")


def _answer_pairs(prompts: Prompts, n: int, base: list[str], edited: list[str], label: str) -> list[str]:
    """Markdown items for the first `n` prompts: the baseline answer next to the answer under one edit."""
    return [f"- **{prompts.texts[i]}**\n  - baseline: {base[i]!r}\n  - {label}: {edited[i]!r}"
            for i in range(min(n, len(prompts)))]


def _examples_text(res: Result) -> str:
    """Greedy answers to a few held-out prompts, so the rates can be checked against the text itself."""
    gen = res.gen
    return "\n".join(_answer_pairs(res.e_harm, 6, gen["harmful_base"][2], gen["harmful_ablated"][2], "ablated")
                     + _answer_pairs(res.e_safe, 4, gen["harmless_base"][2], gen["harmless_induced"][2], "+direction"))


def _selection_figure(plt, res: Result):
    """Bypass, induce and KL per (position, layer) with the winner starred and the layer cut dashed: where the
    selection rules found the direction."""
    offsets, pos_names, L, best = res.offsets, res.pos_names, res.n_layers, res.best
    titles = {"bypass": " (harmful val, ablated)", "induce": " (harmless val, +direction)",
              "kl": " (harmless val, ablated vs base, last position)"}
    P = len(offsets)
    grids = {k: np.full((P, L), np.nan) for k in titles}
    for r in res.annotated:
        for k in grids:
            grids[k][r["position"], r["layer"]] = r[k]
    fig, axes = plt.subplots(3, 1, figsize=(10, 7.5), sharex=True)
    for ax, k in zip(axes, grids):
        im = ax.imshow(grids[k], aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(P), [f"{o} {n!r}" for o, n in zip(offsets.tolist(), pos_names)], fontsize=7)
        ax.set_title(k + titles[k], fontsize=9)
        fig.colorbar(im, ax=ax)
        ax.plot([best["layer"]], [best["position"]], "r*", ms=12)
        ax.axvline(res.config.max_layer_frac * L - 0.5, color="w", lw=1, ls="--")
    axes[-1].set_xlabel("layer (resid_pre)")
    return fig


def _logodds_figure(plt, ev: dict):
    """Histograms of the held-out refusal log-odds per condition: the ablation's effect prompt by prompt."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = np.linspace(min(min(v.min() for v in ev.values()), -8), max(max(v.max() for v in ev.values()), 2), 40)
    for k, v in ev.items():
        ax.hist(v, bins=bins, alpha=0.5, label=f"{k} (mean {v.mean():.2f})")
    ax.set_xlabel("refusal log-odds (last prompt position)")
    ax.legend(fontsize=7)
    return fig


def _norms_figure(plt, res: Result):
    """The norm of the difference in means per layer, one line per candidate position."""
    fig, ax = plt.subplots(figsize=(7, 3))
    for p in sorted({r["position"] for r in res.annotated}):
        rs = sorted([r for r in res.annotated if r["position"] == p], key=lambda r: r["layer"])
        ax.plot([r["layer"] for r in rs], [r["norm"] for r in rs], marker=".",
                label=f"{res.offsets[p]} {res.pos_names[p]!r}")
    ax.set_xlabel("layer")
    ax.set_ylabel("|mean diff|")
    ax.legend(fontsize=7)
    return fig


def _metrics(res: Result) -> dict:
    """metrics.json, in file order: the headline numbers first, then the selection, the evaluation, timings."""
    ev, gen, ce = res.ev, res.gen, res.ce
    return {"refusal_logodds_drop": res.drop, "refusal_ce_change": ce.get("change_pct"), "ce": ce,
            "random_ablation_drops": None if res.random_drops is None else [float(x) for x in res.random_drops],
            "random_induce_rises": None if res.random_rises is None else [float(x) for x in res.random_rises],
            "selected": dict(res.best, tier=res.tier),
            "val_baseline_logodds": dict(harmful=res.harmful_val_base, harmless=res.harmless_val_base),
            "candidates": res.annotated, "filtering": res.filt,
            "heldout_logodds": {k: dict(mean=_mean(v), values=v) for k, v in ev.items()},
            "heldout_refusal_rate": {k: dict(substring=v[0], prefix=v[1]) for k, v in gen.items()},
            "answers": {k: v[2] for k, v in gen.items()},
            "orthogonalized_max_abs_logit_diff": res.orth_diff,
            "orthogonalized_logodds_mean": _mean(res.orth_scores),
            "refusal_token_ids": res.token_ids, "seconds": res.seconds}


def _baseline_text(harmful_rate: float, induced_rate: float) -> str:
    """What the ablation result can mean given how often the model refuses harmful prompts unedited."""
    text = (f"The unedited model refuses {harmful_rate:.0%} of the held-out harmful prompts (substring check, no "
            f"judge); adding the direction to harmless prompts (the induce condition) gives {induced_rate:.0%}. ")
    if harmful_rate < 0.2:
        return text + ("It barely refuses at baseline, so the ablation result is a capability null (there is little "
                       "refusal to remove), not a replication of the paper's bypass.")
    return text + "The log-odds drop under ablation below is read against that baseline."


def _prompt_ci(diff: np.ndarray, seed: int) -> dict:
    """A 95% bootstrap interval over held-out prompts (the independent units) of a per-prompt difference."""
    ci = bootstrap_ci(np.asarray(diff, np.float64), seed=seed)
    return {"ci": [round(ci["low"], 4), round(ci["high"], 4)], "n": ci["n"]}


def records(res: Result) -> list[dict]:
    """The refusal log-odds drop under ablation (and its rise on harmless prompts when the direction is added), each
    with its interval over prompts, and the cross-entropy cost."""
    cfg, sel = res.config, res.best
    ref = (f"{cfg.model}; direction = diff-in-means resid_pre L{sel['layer']} offset {sel['offset']} ({sel['token']}), "
           f"selection tier {res.tier}; {cfg.n_eval} held-out harmful prompts, seed {cfg.seed}")
    out = [dict(metric="refusal_logodds_drop", value=round(res.drop, 4),
                unit="nats (mean refusal log-odds, baseline - ablated)",
                reference=ref + "; Arditi et al. 2024: ablation removes refusal",
                target="> 0 and above the random band",
                null=_drop_null(res), **({} if res.random_drops is None else
                                         {"random_drops": [round(float(x), 4) for x in res.random_drops]}),
                **_prompt_ci(res.ev["harmful_base"] - res.ev["harmful_ablated"], cfg.seed)),
           dict(metric="refusal_induce_rise", value=round(float(np.mean(res.ev["harmless_induced"]
                                                                      - res.ev["harmless_base"])), 4),
                unit="nats (mean refusal log-odds, induced - baseline, harmless prompts)",
                reference=ref.replace("harmful prompts", "harmful and harmless prompts")
                + "; Arditi et al. 2024: adding the direction induces refusal", target="> 0 and above the random band",
                null=_rise_null(res), **({} if res.random_rises is None else
                                         {"random_rises": [round(float(x), 4) for x in res.random_rises]}),
                **_prompt_ci(res.ev["harmless_induced"] - res.ev["harmless_base"], cfg.seed))]
    if res.ce:
        out.append(dict(metric="refusal_ce_change", value=round(res.ce["change_pct"], 4),
                        unit="% (CE ablated vs baseline)",
                        reference=f"{cfg.model}; {cfg.n_ce} ShareGPT conversations, {res.ce['n_tokens']} assistant "
                                  f"tokens; CE {res.ce['base']:.4f} -> {res.ce['ablated']:.4f}; Arditi et al. "
                                  "2024: gemma-2b-it Pile CE 3.506 -> 3.503", target="< 2",
                        null="none: a cost, read against its target"))
    return out
