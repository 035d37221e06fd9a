"""Refusal directions (after Arditi et al. 2024): prompts, the refusal score, difference-in-means candidates, the
selection rules, directional ablation and induction as edits, and the random-direction nulls.

    encode_prompts(model, sets)      one user turn + generation prompt per instruction, left-padded to one length,
                                     and the post-instruction template offsets the candidates are read at
    refusal_token_ids(tok, markers)  first token of each refusal marker, with and without a leading space
    refusal_scores(...)              log P(S) - log(1 - P(S)) at the last prompt position, per prompt
    mean_diff_directions(...)        mean(harmful) - mean(harmless) of resid_pre [position, layer, d_model]
    condition_edits(config, ...)     one edit structure for every condition: ablation everywhere and/or +1 x the
                                     vector at one layer (switched-off parts leave activations bit-identical)
    evaluate_candidates(...)         bypass, induce and KL per candidate through one compiled forward
    select_direction / select_with_fallback   the selection rules and their pre-declared relaxations
    select_matched_damage(...)       the rule calibrated against damage: the largest drop z among null directions
                                     of matched KL on the validation prompts
    direction_nulls(...)             the drop, the rise and the KL cost along stand-in directions: the nulls
    ablation_nulls(...)              the drop and the KL cost alone (what the matched-damage rule reads)
    shuffled_label_directions(...)   difference in means with the harmful / harmless labels shuffled
    ablation_kl(...)                 the KL an ablation costs per prompt (the selection rule's measure)
    orthogonalized_check(...)        the weight edit against the runtime ablation
    refusal_rate(model, ...)         greedy answers and the share containing a refusal marker
    score_validity(scores, answers)  whether the score reads refusal here: its AUROC for the answers that refuse
    matched_damage_null(...)         the drop against null directions whose ablation does as much damage

Pure functions over a model and arrays; no files, no printing (progress bars only when asked).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psm_jax import edits as E
from psm_jax.chat import encode_chat, pad_batch, pad_id, post_instruction_positions
from psm_jax.logits import kl_divergence, token_set_log_odds
from psm_jax.model import Capture, forward
from psm_jax.persona.stats import auroc_ci, shuffled_label_null
from psm_jax.persona.rollouts import static_batches

ABLATION_SITES = ("resid_pre", "attn_out", "mlp_out")  # the stream's input and every write into it: nothing re-adds it
PAD_MULTIPLE = 16  # prompt lengths padded to a multiple of this: few compiled shapes across prompt sets
MATCH_FACTOR = 2.0  # null directions whose KL lies within this factor of the selected direction's count as matched
MIN_MATCHED = 9  # with fewer matched directions the rank p cannot reach 0.1


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
        bypass = refusal_scores(params, config, harmful_val, token_ids,
                                condition_edits(config, unit=vec / norm, ablate=True), batch_size)
        kl = ablation_kl(params, config, harmless_val, vec / norm, base_harmless, batch_size)
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


def select_matched_damage(scores: Sequence[dict], n_layers: int, *, null_drops, null_kls, harmful_baseline: float,
                          harmless_baseline: float, max_layer_frac: float = 0.8, factor: float = MATCH_FACTOR,
                          min_matched: int = MIN_MATCHED) -> tuple[dict | None, list[dict]]:
    """The selection rule calibrated against damage: each candidate's validation drop (`harmful_baseline` minus its
    bypass) is read against the null directions whose validation KL lies within `factor` of its own, as
    z = (drop - their mean drop) / their standard deviation; the largest z wins. Ablating anything lowers the
    refusal score in proportion to the damage it does, so the fixed-threshold rules' lowest bypass favours damaging
    directions; here damage is matched instead of capped. A candidate is dropped when layer >= max_layer_frac *
    n_layers, any score is NaN, induce < `harmless_baseline` (adding it does not raise the harmless prompts'
    refusal score), or fewer than `min_matched` null directions match its KL. Every row gains `drop`, `n_matched`,
    `matched_z` and `matched_p` (the rank p of `matched_damage_null`). Returns (winner or None, annotated rows)."""
    d, k = np.asarray(null_drops, np.float64), np.asarray(null_kls, np.float64)
    if d.shape != k.shape or d.ndim != 1 or d.size < 2:
        raise ValueError(f"null_drops has shape {d.shape}, null_kls {k.shape}; expected equal 1-d shapes of >= 2")
    annotated = []
    for s in scores:
        row, reasons = dict(s, drop=harmful_baseline - s["bypass"], n_matched=0, matched_z=float("nan"),
                            matched_p=float("nan")), []
        if s["layer"] >= max_layer_frac * n_layers:
            reasons.append(f"layer >= {max_layer_frac:g} * n_layers")
        if not all(np.isfinite(s[name]) for name in ("bypass", "induce", "kl")) or not s["kl"] > 0:
            reasons.append("zero direction or non-finite score")
        else:
            if s["induce"] < harmless_baseline:
                reasons.append("induce < unsteered harmless mean")
            matched = d[(k >= s["kl"] / factor) & (k <= s["kl"] * factor)]
            row["n_matched"] = int(matched.size)
            if matched.size < min_matched:
                reasons.append(f"< {min_matched} null directions of matched KL")
            else:
                row["matched_z"] = float((row["drop"] - matched.mean()) / max(matched.std(ddof=1), 1e-12))
                row["matched_p"] = float((1 + (matched >= row["drop"]).sum()) / (1 + matched.size))
        annotated.append(dict(row, kept=not reasons, reason="; ".join(reasons)))
    kept = [r for r in annotated if r["kept"]]
    return (max(kept, key=lambda r: r["matched_z"]) if kept else None), annotated


# ------------------------------------------------------------------------------------ nulls and checks


def ablation_kl(params, config, prompts: Prompts, unit: np.ndarray, base_logits: np.ndarray,
                batch_size: int = 16) -> np.ndarray:
    """Per prompt, KL(unedited || ablated) of the next-token distribution at the last position when `unit` is
    ablated everywhere: the selection rule's measure of what an ablation costs on prompts it should leave alone.
    `base_logits`: the prompts' unedited last logits (`last_logits`), computed once for many directions."""
    ablated = last_logits(params, config, prompts, condition_edits(config, unit=unit, ablate=True), batch_size)
    return np.asarray(_kl_rows(jnp.asarray(base_logits), jnp.asarray(ablated)), np.float64)


def direction_nulls(params, config, units: np.ndarray, harmful: Prompts, harmless: Prompts, token_ids, *,
                    harmful_base: float, harmless_base: float, norm: float, layer: int, batch_size: int = 16,
                    harmless_logits: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """What each of `units` [n, D] (unit directions standing in for the selected one) does, one value per direction:
    `drops`, the mean refusal log-odds drop on `harmful` when it is ablated (what removing some other direction does
    to refusal); `rises`, the mean rise on `harmless` when it is added at the selected direction's `norm` at `layer`
    (what any push of that size does); `kls`, the mean KL it costs on `harmless` when ablated (how much it damages
    the model where refusal is not wanted). `harmful_base` / `harmless_base`: the unedited mean scores;
    `harmless_logits`: the harmless prompts' unedited last logits when the caller has them. The directions are
    traced inputs, so every one runs through the same compiled forwards."""
    ablated = ablation_nulls(params, config, units, harmful, harmless, token_ids, harmful_base=harmful_base,
                             batch_size=batch_size, harmless_logits=harmless_logits)
    rises = [float(refusal_scores(params, config, harmless, token_ids,
                                  condition_edits(config, vector=norm * u, induce_layer=layer), batch_size).mean())
             - harmless_base for u in units]
    return {"drops": ablated["drops"], "rises": np.array(rises, np.float64), "kls": ablated["kls"]}


def ablation_nulls(params, config, units: np.ndarray, harmful: Prompts, harmless: Prompts, token_ids, *,
                   harmful_base: float, batch_size: int = 16,
                   harmless_logits: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The ablation half of `direction_nulls`: per unit direction of `units` [n, D], the mean refusal log-odds
    drop on `harmful` from `harmful_base` and the mean KL the ablation costs on `harmless`. The matched-damage
    selection rule reads these on the validation prompts, where no induce null is needed."""
    base_logits = (last_logits(params, config, harmless, condition_edits(config), batch_size)
                   if harmless_logits is None else harmless_logits)
    drops = [harmful_base - float(refusal_scores(params, config, harmful, token_ids,
                                                 condition_edits(config, unit=u, ablate=True), batch_size).mean())
             for u in units]
    kls = [float(ablation_kl(params, config, harmless, u, base_logits, batch_size).mean()) for u in units]
    return {"drops": np.array(drops, np.float64), "kls": np.array(kls, np.float64)}


def prompt_activations(params, config, prompts: Prompts, offset: int, layer: int,
                       batch_size: int = 16) -> np.ndarray:
    """resid_pre at one post-instruction `offset` and `layer` for every prompt: [N, D] float64 (the rows whose
    group means `mean_diff_directions` differences)."""
    offsets = jnp.asarray(np.array([offset], np.int32))
    rows = [np.asarray(_capture_resid_pre(params, config, tok, mask, offsets))[layer, :n, 0]
            for tok, mask, n in batches(prompts, batch_size)]
    return np.concatenate(rows).astype(np.float64)


def shuffled_label_directions(params, config, harmful: Prompts, harmless: Prompts, *, offset: int, layer: int,
                              n: int, seed: int, batch_size: int = 16) -> np.ndarray:
    """`n` unit difference-in-means directions at `offset` and `layer` with the harmful / harmless labels of the
    prompts shuffled (group sizes kept): directions from the same activations and the same recipe as the selected
    one, but carrying no harmfulness, so their effects are the null for what the labels add. [n, D] float64."""
    a = prompt_activations(params, config, harmful, offset, layer, batch_size)
    b = prompt_activations(params, config, harmless, offset, layer, batch_size)
    diffs = shuffled_label_null(lambda x, y: x.mean(axis=0) - y.mean(axis=0), a, b, n_shuffles=n, seed=seed)
    return diffs / np.linalg.norm(diffs, axis=1, keepdims=True)


def orthogonalized_check(params, config, unit: np.ndarray, prompts: Prompts, token_ids,
                         batch_size: int = 16) -> tuple[float, np.ndarray]:
    """Max |logit difference| at the last position between runtime ablation of `unit` and orthogonalised weights
    (the weight edit must match the runtime edit), and the refusal scores with the orthogonalised weights."""
    from psm_jax.weights import orthogonalize

    p_orth, c_orth = orthogonalize(params, config, unit)
    lg_runtime = last_logits(params, config, prompts, condition_edits(config, unit=unit, ablate=True), batch_size)
    lg_orth = last_logits(p_orth, c_orth, prompts, (), batch_size)
    orth_diff = float(np.max(np.abs(lg_runtime - lg_orth)))
    return orth_diff, refusal_scores(p_orth, c_orth, prompts, token_ids, logits=lg_orth)


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


VALIDITY_MIN_PER_SIDE = 5  # fewer refusing (or non-refusing) answers than this leave the AUROC's interval unsupported


def score_validity(scores: np.ndarray, answers: Sequence[str], markers, *, seed: int = 0) -> dict | None:
    """The refusal score's validity check on this model: how well the unedited score of each prompt tells the
    prompts whose greedy answer refuses (a marker anywhere) from those whose answer does not, as an AUROC with a
    bootstrap interval over prompts (`stats.auroc_ci`; chance 0.5). The log-odds is evidence about refusal only
    where the interval lies above 0.5 and each side holds at least VALIDITY_MIN_PER_SIDE answers (`enough`): a
    bootstrap over three refusals cannot support an interval. None when every answer falls on one side."""
    refused = np.array([markers.is_refusal(a, anywhere=True) for a in answers], bool)
    if len(refused) != len(scores):
        raise ValueError(f"{len(scores)} scores and {len(answers)} answers; expected one answer per score")
    if refused.all() or not refused.any():
        return None
    ci = auroc_ci(refused, np.asarray(scores, np.float64), seed=seed)
    enough = bool(min(refused.sum(), (~refused).sum()) >= VALIDITY_MIN_PER_SIDE)
    return dict(ci, enough=enough, valid=bool(enough and ci["low"] > 0.5))



def pooled_nulls(nulls: dict) -> tuple[np.ndarray, np.ndarray]:
    """The drops and KLs of every null direction, all kinds pooled (`nulls`: kind -> {drops, kls, ...}, as the
    study's result and its metrics.json hold them): the candidates of `matched_damage_null`."""
    kinds = list(nulls.values())
    return (np.array([x for n in kinds for x in n["drops"]], np.float64),
            np.array([x for n in kinds for x in n["kls"]], np.float64))


def matched_damage_null(drop: float, kl: float, null_drops, null_kls, *, factor: float = MATCH_FACTOR) -> dict:
    """The selected direction's refusal drop against null directions that do as much damage: those whose ablation
    KL on the harmless prompts lies within `factor` of the selected one's `kl` (either way). An ablation that
    damages the model also moves the refusal score, so only equally damaging directions say what the selected
    one adds. Returns {n_matched, n_at_least (matched drops >= `drop`), p = (1 + n_at_least) / (1 + n_matched),
    enough (n_matched >= MIN_MATCHED), matched_max_drop (None when nothing matches)}."""
    d, k = np.asarray(null_drops, np.float64), np.asarray(null_kls, np.float64)
    if d.shape != k.shape or d.ndim != 1:
        raise ValueError(f"null_drops has shape {d.shape}, null_kls {k.shape}; expected equal 1-d shapes")
    if not (kl > 0 and factor > 1):
        raise ValueError(f"kl={kl}, factor={factor}; expected kl > 0 and factor > 1")
    matched = (k >= kl / factor) & (k <= kl * factor)
    n, at_least = int(matched.sum()), int((d[matched] >= drop).sum())
    return {"n_matched": n, "n_at_least": at_least, "p": (1 + at_least) / (1 + n), "enough": n >= MIN_MATCHED,
            "matched_max_drop": float(d[matched].max()) if n else None, "factor": float(factor)}
