"""The identity of a persona held in a KV cache, and how cache edits shift it (after Beckmann & Butlin 2026).

A conversation is prefilled into a KV cache (possibly edited there); a probe turn ("Who are you?") continues it.
What the cache "is" is read two ways, with no sampling:

    per_token_logprob      mean log p of a given answer's tokens after the probe, continuing the cache
    identity_logodds       per-token log-odds of an Assistant answer over a persona answer (length matched)
    identity_logodds_band  the same after a direct cache edit along each of many directions (one compiled body)
    projection_readout     mean projection of tokens continuing the cache on a direction at one resid_post layer

Per token, not summed: the two answers differ in length, and a summed log-likelihood favours the shorter one
whatever the cache holds; each answer's mean over its own tokens compares them at equal length. Inputs may be
padded (probe left-padded, answers right-padded, masks marking the real tokens) so one compiled function serves
many lengths; padded slots are never attended to and never counted.

Row statistics. A study writes one row per (conversation, history, probe, condition), a dict with `conversation`,
`history` (a history kind: several histories may carry one conversation's persona), `probe`, `mode` (`UNEDITED`,
one of `EDIT_MODES`, `MATCHED` or one of `CONTROLS`), `kind` and `strength` of the edit, `layers` (a label), `n`
(sampled answers), `assistant_rate`, `identity_logodds`, `answer_projection` (NaN where nothing was sampled), and for
the random-direction control `band_logodds` (one value per direction); optionally `assistant_tokens` and
`user_tokens` (edited positions per history). Every shift is taken against the unedited cache of the same
(conversation, history, probe).

The independent unit is a (conversation, probe) pair, not a sample and not a history: the samples of a unit share
one edited cache, and the histories of a conversation share its persona and user turns. So a unit's shift is the
mean over its histories, intervals bootstrap those unit means (`psm_jax.persona.stats`), and `n` counts units.

    condition_means       per condition: means over rows, n in units
    unit_shifts           per unit: mean over its histories of a field's shift against the unedited cache
    mean_unit_shift       the mean of those over units (a point estimate)
    shift_interval        the identity log-odds shift with its 95% bootstrap interval over units
    identity_shifts       per edit mode and kind at the largest positive strength: the shift with its interval
    identity_validity     the measure's check: unedited log-odds after the Assistant's own replies minus after the
                          persona history, paired over units
    assistant_minus_user  paired over units: an edit's shift on assistant tokens minus the same edit's on user tokens
    assistant_vs_user     the user-token control against the edit on all and on as many assistant tokens
    control_shifts        per control and kind: the shift, the user-token pairings, the random-direction null band
    matched_positions     a seeded subset of assistant positions as large as another position set

Pure functions over arrays, models and row dicts; no files, no printing.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from psm_jax.kvcache import edit_cache_direct
from psm_jax.model import Capture, forward
from psm_jax.persona.stats import bootstrap_ci, finite_mean, null_band, outside_band, paired_effect

UNEDITED = "none"  # the mode of the unedited cache: every shift's baseline
EDIT_MODES = ("recompute", "direct")  # the axis edits on assistant tokens: prefill re-run, or K/V rebuilt in place
CONTROLS = ("control_user", "control_random")  # same edit on user-token positions; random directions (a band)
# the direct edit on a seeded subset of the assistant-token positions as large as the user-token ones: the user-token
# control's comparison at an equal number of edited positions
MATCHED = "direct_matched"


# --------------------------------------------------------------------------- the identity measure on a cache


def _ones(x):
    return jnp.ones(x.shape, bool)


def _masked_mean(x, mask):
    """Mean of x [B, T] over the positions where mask is true (float32 weights; 0 where none is), so padded
    slots do not count. (`psm_jax.reductions.masked_mean` averages vectors [..., T, D] with weights in x's dtype;
    this one averages one scalar per token.)"""
    m = mask.astype(jnp.float32)
    return jnp.sum(x * m, -1) / jnp.maximum(jnp.sum(m, -1), 1.0)


def per_token_logprob(params, config, cache, probe, answer, probe_mask=None, answer_mask=None):
    """Mean log p(answer token) after the probe turn, continuing `cache`: [B]. probe [B, P] (left-padded where
    probe_mask is false), answer [B, A] (right-padded where answer_mask is false; the mean is over its real
    tokens). The answer is teacher-forced in the same pass as the probe; `cache` itself is not changed (JAX
    arrays), so one cache serves several answers."""
    probe_mask = _ones(probe) if probe_mask is None else probe_mask
    answer_mask = _ones(answer) if answer_mask is None else answer_mask
    tokens = jnp.concatenate([probe, answer], axis=1)
    out = forward(params, config, tokens, attention_mask=jnp.concatenate([probe_mask, answer_mask], axis=1),
                  cache=cache)
    P, A = probe.shape[1], answer.shape[1]
    lp = jax.nn.log_softmax(out.logits[:, P - 1:P + A - 1].astype(jnp.float32), -1)
    tok = jnp.take_along_axis(lp, answer[..., None], -1)[..., 0]
    return _masked_mean(tok, answer_mask)


def identity_logodds(params, config, cache, probe, assistant, persona, masks=(None, None, None)):
    """Per-token log-odds of the assistant identity answer over the persona answer after the probe: [B], the mean
    log p of the assistant answer's tokens minus that of the persona answer's (length matched: neither answer
    gains by being shorter). > 0: the cache answers "who are you" more as the Assistant than as the persona.
    masks: (probe, assistant, persona) masks of padded inputs (None: unpadded)."""
    pm, am, bm = masks
    return (per_token_logprob(params, config, cache, probe, assistant, pm, am)
            - per_token_logprob(params, config, cache, probe, persona, pm, bm))


def identity_logodds_band(params, config, cache, resid, probe, assistant, persona, edit, vectors,
                          masks=(None, None, None)):
    """Identity log-odds after the direct edit `edit` (`psm_jax.kvcache.edit_cache_direct` of `cache` from the
    block inputs `resid`) with its vector replaced by each of `vectors` [n, L, D]: [n, B]. One compiled body is
    mapped over the directions, in batches of 10: the random-direction null band of an axis edit at matched norm."""
    def one(v):
        edited = edit_cache_direct(params, config, cache, resid, edit.replace(vector=v))
        return identity_logodds(params, config, edited, probe, assistant, persona, masks)
    return jax.lax.map(one, vectors, batch_size=10)


def projection_readout(params, config, cache, tokens, mask, layer, u):
    """Mean projection on the unit direction u [D] of resid_post[layer] over the tokens [B, T] continuing `cache`
    where mask is true: [B] (e.g. how far along the Assistant Axis a sampled answer sits)."""
    out = forward(params, config, tokens, attention_mask=mask, cache=cache,
                  capture=Capture(sites=("resid_post",), layers=(layer,)), return_logits=False)
    return _masked_mean(out.captured["resid_post"][0] @ u, mask)


# --------------------------------------------------------------------------- row statistics


def condition_means(rows: list[dict]) -> list[dict]:
    """Per condition (mode, kind, layers, strength), unedited first and controls last: the means over rows of the
    assistant rate, identity log-odds and answer projection (NaN rows left out), with n = (conversation, probe)
    units (the histories of one conversation share its persona and user turns, so they are not separate units)
    and `samples`, the sampled answers behind them."""
    keys = sorted({(r["mode"], r["kind"], r["layers"], r["strength"]) for r in rows},
                  key=lambda k: (k[0] != UNEDITED, k[0] in CONTROLS, k))
    agg = []
    for mode, kind, layers, s in keys:
        sel = [r for r in rows if (r["mode"], r["kind"], r["layers"], r["strength"]) == (mode, kind, layers, s)]
        agg.append(dict(mode=mode, kind=kind, layers=layers, strength=s,
                        n=len({(r["conversation"], r["probe"]) for r in sel}), samples=sum(r["n"] for r in sel),
                        assistant_rate=finite_mean([r["assistant_rate"] for r in sel]),
                        identity_logodds=finite_mean([r["identity_logodds"] for r in sel]),
                        answer_projection=finite_mean([r["answer_projection"] for r in sel])))
    return agg


def _cell(r: dict) -> tuple:
    """The (conversation, history, probe) a row was measured on: where it meets its unedited baseline."""
    return r["conversation"], r["history"], r["probe"]


def unedited_baseline(rows: list[dict], field: str = "identity_logodds") -> dict:
    """`field` of the unedited cache per (conversation, history, probe): the baseline every shift is taken from."""
    return {_cell(r): r[field] for r in rows if r["mode"] == UNEDITED}


def _kinds(rows: list[dict], mode: str) -> list[str]:
    """The strength kinds that `mode` was run with, norm first (the order of the report's keys)."""
    return sorted({r["kind"] for r in rows if r["mode"] == mode}, key=lambda k: k != "norm")


def unit_shifts(rows: list[dict], sel: list[dict], field: str = "identity_logodds") -> dict:
    """Per (conversation, probe) unit: the mean over its histories of `field` in the rows `sel` minus the unedited
    cache's of the same history (from `rows`). One value per independent unit, ready for a bootstrap."""
    base = unedited_baseline(rows, field)
    per_unit: dict = {}
    for r in sel:
        per_unit.setdefault((r["conversation"], r["probe"]), []).append(r[field] - base[_cell(r)])
    return {k: float(np.mean(v)) for k, v in per_unit.items()}


def mean_unit_shift(rows: list[dict], sel: list[dict], field: str = "identity_logodds") -> float:
    """The mean over units of `unit_shifts`: a point estimate without an interval."""
    return float(np.mean(list(unit_shifts(rows, sel, field).values())))


def shift_interval(rows: list[dict], sel: list[dict], seed: int) -> dict:
    """The identity log-odds shift of the rows `sel` against the unedited cache: {n, logodds_shift, ci_low,
    ci_high}, a 95% percentile bootstrap interval over (conversation, probe) units (`stats.bootstrap_ci`)."""
    ci = bootstrap_ci(list(unit_shifts(rows, sel).values()), seed=seed)
    return dict(n=ci["n"], logodds_shift=ci["estimate"], ci_low=ci["low"], ci_high=ci["high"])


def _only(rows: list[dict], history: str | None) -> list[dict]:
    return rows if history is None else [r for r in rows if r["history"] == history]


def identity_shifts(rows: list[dict], seed: int = 0, history: str | None = None) -> dict:
    """Per edit mode and strength kind ("mode/kind", modes `EDIT_MODES`), at the largest positive strength (first
    layer range): the identity log-odds shift against the unedited cache, with a 95% bootstrap interval over
    (conversation, probe) units (`shift_interval`), and the mean shifts of the assistant rate and answer projection.
    `history`: only that history kind; None: their mean within a unit."""
    rows = _only(rows, history)
    out = {}
    for mode in EDIT_MODES:
        for kind in _kinds(rows, mode):
            cand = [r for r in rows if r["mode"] == mode and r["kind"] == kind and r["strength"] > 0]
            if not cand:
                continue
            top = max(r["strength"] for r in cand)
            layers = sorted({r["layers"] for r in cand if r["strength"] == top})[0]
            sel = [r for r in cand if r["strength"] == top and r["layers"] == layers]
            out[f"{mode}/{kind}"] = dict(
                mode=mode, kind=kind, strength=top, layers=layers, samples_per_unit=sel[0]["n"],
                **shift_interval(rows, sel, seed),
                assistant_rate_shift=mean_unit_shift(rows, sel, "assistant_rate"),
                projection_shift=mean_unit_shift(rows, sel, "answer_projection"))
    return out


def identity_validity(rows: list[dict], reference: list[dict], seed: int = 0) -> dict | None:
    """The identity measure's validity check, paired over (conversation, probe) units: the unedited log-odds after
    the Assistant's own replies (`reference`: rows with conversation, probe, identity_logodds) minus after the
    persona history (the mean over its history kinds), with a 95% bootstrap interval. Valid when the interval lies
    above 0: the measure reads the persona that the history carries, so its shifts under an edit can be read as
    moving that persona. None without reference rows."""
    base: dict = {}
    for r in rows:
        if r["mode"] == UNEDITED:
            base.setdefault((r["conversation"], r["probe"]), []).append(r["identity_logodds"])
    ref = {(r["conversation"], r["probe"]): r["identity_logodds"] for r in reference}
    units = [u for u in ref if u in base]
    if not units:
        return None
    persona = [float(np.mean(base[u])) for u in units]
    d = paired_effect([ref[u] for u in units], persona, seed=seed)
    return dict(effect=d["estimate"], low=d["low"], high=d["high"], n=d["n"], valid=bool(d["low"] > 0),
                assistant_history_logodds=float(np.mean([ref[u] for u in units])),
                persona_history_logodds=float(np.mean(persona)))


def assistant_minus_user(rows: list[dict], user_rows: list[dict], axis_rows: list[dict], seed: int) -> dict:
    """Paired over the units both cover: the identity shift of an edit on assistant tokens (`axis_rows`) minus the
    same edit's on user tokens (`user_rows`), {estimate, low, high, n} with a 95% bootstrap interval. Above 0: the
    assistant turns carry more of the identity than the user turns."""
    on_user, on_asst = unit_shifts(rows, user_rows), unit_shifts(rows, axis_rows)
    units = sorted(set(on_user) & set(on_asst))
    d = paired_effect([on_asst[u] for u in units], [on_user[u] for u in units], seed=seed)
    return dict(estimate=d["estimate"], low=d["low"], high=d["high"], n=d["n"])


def assistant_vs_user(rows: list[dict], user_rows: list[dict], seed: int) -> dict:
    """The user-token control against the same edit on assistant tokens, paired over units: on every assistant
    token ("all_tokens", mode "direct"), and on a seeded subset as large as the user turns ("matched_tokens", mode
    `MATCHED`; the edit acts per position, so more edited positions move the cache more), with the mean
    edited-token counts per history (None where rows lack them). {} when neither assistant edit was run."""
    ref = user_rows[0]
    same = lambda r: (r["kind"], r["strength"], r["layers"]) == (ref["kind"], ref["strength"], ref["layers"])  # noqa: E731
    out = {}
    for name, mode in (("all_tokens", "direct"), ("matched_tokens", MATCHED)):
        axis_rows = [r for r in rows if r["mode"] == mode and same(r)]
        if axis_rows:
            out[name] = assistant_minus_user(rows, user_rows, axis_rows, seed)
    tokens = {k: float(np.mean([r[k] for r in user_rows])) if all(k in r for r in user_rows) else None
              for k in ("assistant_tokens", "user_tokens")}
    return dict(assistant_minus_user=out, **tokens) if out else {}


def control_shifts(rows: list[dict], seed: int = 0, history: str | None = None) -> dict:
    """Per control and kind ("control/kind"): the identity log-odds shift against the unedited cache, 95% bootstrap
    interval over units; a control that works has an interval containing 0. For the user-token control also its
    paired differences from the direct axis edit on every assistant token and on as many assistant tokens as there
    are user tokens (`assistant_vs_user`). For the random directions the null band: the central 95% of the
    per-direction mean shifts (`stats.null_band`), and whether the direct axis edit of the same kind, strength and
    layers lies outside it."""
    rows = _only(rows, history)
    out = {}
    for ctl in CONTROLS:
        for kind in _kinds(rows, ctl):
            sel = [r for r in rows if r["mode"] == ctl and r["kind"] == kind]
            v = dict(control=ctl, kind=kind, strength=sel[0]["strength"], layers=sel[0]["layers"],
                     **shift_interval(rows, sel, seed))
            if ctl == "control_user":
                v.update(assistant_vs_user(rows, sel, seed))
            if ctl == "control_random":
                per_dir = np.asarray([r["band_logodds"] for r in sel])  # [rows, directions]
                base = unedited_baseline(rows)
                b = np.asarray([base[_cell(r)] for r in sel])
                band = null_band((per_dir - b[:, None]).mean(axis=0))
                axis_edit = [r for r in rows if r["mode"] == "direct" and r["kind"] == kind
                             and r["strength"] == v["strength"] and r["layers"] == v["layers"]]
                axis_shift = mean_unit_shift(rows, axis_edit) if axis_edit else None
                v.update(band_low=band["low"], band_high=band["high"], n_directions=band["n"],
                         direct_axis_shift=axis_shift,
                         axis_outside_band=None if axis_shift is None else outside_band(axis_shift, band))
            out[f"{ctl}/{kind}"] = v
    return out


def matched_positions(assistant: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded subset of min(n, count) of the True positions of `assistant` [S], spread over all assistant turns:
    the assistant-token edit at as many positions as another edit (the user-token control) acts on, since an edit
    acting per position moves the cache more the more positions it touches."""
    idx = np.flatnonzero(assistant)
    out = np.zeros_like(assistant, dtype=bool)
    out[rng.choice(idx, size=min(int(n), idx.size), replace=False)] = True
    return out
