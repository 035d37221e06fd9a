"""KV-cache editing of a persisted persona (after Beckmann & Butlin 2026).

A conversation establishes a non-Assistant persona. Before a probe question ("Who are you?" and
other identity probes) is appended, the cached states at the *assistant-token* positions of the
history are pushed along the Assistant Axis over a layer range, in two ways:
  recompute  re-run the prefill with a resid_pre edit masked to those positions (later layers'
             K/V change as a consequence), keep the cache, decode unedited;
  direct     rebuild K/V only at the chosen layers from the edited resid_pre, re-applying RoPE
             at the stored positions.
Strength is given two ways ("15%" is ambiguous): `norm` (default) adds s * mean|h| along the unit
axis (mean over the edited positions): s > 0 always moves toward the Assistant pole; `scale`
multiplies the projection onto the unit axis by (1 + s), which moves *away from zero* and so
toward the Assistant only where the projection is already positive. Negative strengths are the
converse control (toward the persona).

Measures per condition, for N sampled answers per probe with fixed seeds: the fraction of answers
that speak as an AI assistant (keyword scorer), the log-odds of an assistant-identity answer over a
persona answer, and the mean axis projection of the sampled answers' tokens. Control: capping on
assistant tokens only, and how much it moves user-token projections compared with assistant ones.

The independent unit is a (conversation, probe) pair: samples within it share the edited cache and are not
independent, so intervals are bootstrapped over pairs and `n` counts pairs. The identity log-odds is per token
(each answer's log-likelihood divided by its length), so answers of different lengths compare fairly.

    psm kv-editing --preset quick --out runs/kv_editing        psm kv-editing strength_kind=scale samples=8
"""
from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from psm_jax import edits as E
from psm_jax.chat import Role, encode_chat
from psm_jax.generate import decode, prefill
from psm_jax.kvcache import edit_cache_direct
from psm_jax.model import Capture, forward
from psm_jax.persona import DEFAULT_MODEL
from psm_jax.persona.directions import unit
from psm_jax.persona.stats import paired_effect

PERSONA_SOURCE = {
    "conversation": "The persona is established by the conversation only: its role-play system prompt is left out, "
                    "so the persona lives in the in-character assistant turns that the edit acts on.",
    "system": "The persona is set by the conversation's system prompt, which stays unedited in the cache.",
}
CONTROLS = ("control_user", "control_random")  # same edit on user-token positions; a random direction
PROBE_ROOM = 64  # cache slots reserved for a probe turn (template included)
ASSISTANT_ANSWER = "I am an AI assistant, a language model made to help people."


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = DEFAULT_MODEL
    conversations: tuple[str, ...] = ()  # ids from psm_jax/persona/data/conversations/roleplay.json
    n_conversations: int = 2  # used when `conversations` is empty: the first n
    probes: int = 3  # number of identity probe questions
    samples: int = 8  # sampled answers per probe and condition
    max_new_tokens: int = 32
    temperature: float = 0.8
    top_p: float = 0.95
    strengths: tuple[float, ...] = (-0.15, 0.15, 0.3)
    strength_kind: str = "norm"  # norm | scale
    layer_ranges: tuple[tuple[int, int], ...] = ((10, 20), (4, 26))  # [start, end) block inputs
    readout_layer: int = 15  # resid_post layer of the axis projection readout
    axis_file: str | None = None  # safetensors with key "axis" [n_layers, d_model]; None = estimate
    axis_roles: int = 12
    axis_questions: int = 4
    persona_source: str = "conversation"  # "conversation": the role-play's system prompt is left out, so the persona
    # lives in the assistant turns only (the paper's condition); "system": it stays in the cache, unedited
    controls: bool = True  # direct edits at the largest strength on user tokens, and along a random direction
    seed: int = 0

    def __post_init__(self):
        if self.strength_kind not in ("scale", "norm"):
            raise ValueError(f"strength_kind={self.strength_kind!r}; expected 'scale' or 'norm'")
        if self.persona_source not in ("conversation", "system"):
            raise ValueError(f"persona_source={self.persona_source!r}; expected 'conversation' or 'system'")
        if self.samples < 1 or self.probes < 1:
            raise ValueError(f"samples={self.samples}, probes={self.probes}; expected both >= 1")


PRESETS = {
    "ci": dict(n_conversations=1, probes=1, samples=2, strengths=(0.3,), max_new_tokens=8, layer_ranges=((10, 20),)),
    "quick": dict(n_conversations=1, probes=2, samples=4, strengths=(-0.15, 0.3), max_new_tokens=24,
                  layer_ranges=((10, 20),)),
    "full": {},
}


@dataclasses.dataclass
class Result:
    config: Config
    rows: list[dict]  # one per (conversation, probe, condition)
    control: list[dict]  # assistant-token capping: projection shifts per conversation
    samples: list[tuple]  # (conversation, mode, strength, layers, first answers) for the report
    seconds: float


def estimate_axis(model, n_roles: int, n_questions: int, seed: int = 0, batch_size: int = 16) -> np.ndarray:
    """A small Assistant Axis [L, D]: mean(default-prompt responses) - mean(role responses),
    response-token means of resid_post (see experiments/assistant_axis.py for the full method)."""
    from psm_jax.persona import datasets
    from psm_jax.persona.axis import role_and_default_vectors
    from psm_jax.persona.directions import axis_from_vectors

    roles = [r for r in datasets.load_roles().roles if r.name != "assistant"]
    rng = np.random.default_rng(seed)
    roles = [roles[i] for i in rng.choice(len(roles), size=min(n_roles, len(roles)), replace=False)]
    questions = datasets.load_role_questions()[:n_questions]
    role_vecs, default_vec = role_and_default_vectors(model, roles, questions, batch_size=batch_size, seed=seed)
    role_vecs = role_vecs[~np.isnan(role_vecs).any(axis=(1, 2))]  # roles with no response have NaN rows
    return axis_from_vectors(default_vec, role_vecs).astype(np.float32)


def _history_and_probe(model, history: list[dict], probe: str):
    """Tokens of history (cache prefix) and of the probe turn + generation prompt, checked to be a
    prefix split of the full rendering."""
    hist = encode_chat(model.tokenizer, history, chat_template=model.chat_template)
    full = encode_chat(model.tokenizer, history + [{"role": "user", "content": probe}], add_generation_prompt=True,
                       chat_template=model.chat_template)
    n = len(hist)
    if not np.array_equal(full.tokens[:n], hist.tokens):
        raise ValueError("the chat template does not render the history as a prefix of history + probe; "
                         "KV-cache editing needs prefix-stable templates")
    return hist, full.tokens[n:]


def _edit(config, model, kind: str, strength: float, layers, positions, u, mean_norms):
    if kind == "scale":
        return E.scale_projection(model.config, u, 1.0 + strength, layers=layers, site="resid_pre",
                                  positions=positions, extend=False)
    coef = jnp.asarray(strength * mean_norms, jnp.float32)  # per layer
    return E.add(model.config, u, layers=layers, coef=coef, site="resid_pre", positions=positions, extend=False)


def _answer_logprob(params, config, cache, tokens):
    """Sum log p(tokens[1:]) continuing `cache` (tokens[0] is scored from the cache's last logits)."""
    out = forward(params, config, tokens, cache=cache)
    lp = jax.nn.log_softmax(out.logits[:, :-1], -1)
    return jnp.sum(jnp.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0], axis=-1)


class _Runner:
    """Jitted pieces shared by all conditions (one compilation per shape)."""

    def __init__(self, model, cfg: Config, u_all):
        self.m, self.cfg, self.u_all = model, cfg, u_all
        c = model.config
        self.prefill = jax.jit(lambda p, t, e: prefill(p, c, t, cache_size=self._size, edits=e,
                                                       capture=Capture(sites=("resid_pre",))))
        self.extend = jax.jit(lambda p, cache, t: forward(p, c, t, cache=cache, logits_positions="last"))
        self.decode = jax.jit(lambda p, cache, logits, key: decode(
            p, c, cache, logits, max_new_tokens=cfg.max_new_tokens, key=key, temperature=cfg.temperature,
            top_p=cfg.top_p, sample=True, use_top_p=cfg.top_p < 1.0, eos_ids=self.eos, pad_id=self.pad))
        self.readout = jax.jit(lambda p, cache, t, mask: _readout(p, c, cache, t, mask, cfg.readout_layer,
                                                                  u_all[cfg.readout_layer]))
        self.logprob = jax.jit(lambda p, cache, t: _answer_logprob(p, c, cache, t))
        self.direct = jax.jit(lambda p, cache, resid, e: edit_cache_direct(p, c, cache, resid, e))

    def set_sizes(self, size, eos, pad):
        self._size, self.eos, self.pad = size, eos, pad


def _readout(params, config, cache, tokens, mask, layer, u):
    out = forward(params, config, tokens, attention_mask=mask, cache=cache,
                  capture=Capture(sites=("resid_post",), layers=(layer,)), return_logits=False)
    proj = out.captured["resid_post"][0] @ u
    m = mask.astype(jnp.float32)
    return jnp.sum(proj * m, -1) / jnp.maximum(jnp.sum(m, -1), 1.0)


def run(cfg: Config, model, progress: Callable[[str], None] | None = None) -> Result:
    """Every condition on every (conversation, probe) pair, and the capping control. No files."""
    from psm_jax.persona import datasets
    from psm_jax.persona.rollouts import eos_ids

    t0 = time.time()
    c = model.config
    for lo, hi in cfg.layer_ranges:
        if not 0 <= lo < hi <= c.n_layers:
            raise ValueError(f"layer range ({lo}, {hi}) is invalid; expected 0 <= start < end <= {c.n_layers}")
    c.check_layer(cfg.readout_layer, "readout_layer")
    if cfg.axis_file:
        from experiments.report import load_vectors

        tensors, _ = load_vectors(cfg.axis_file, expect_width=c.d_model)
        if "axis" not in tensors:
            raise ValueError(f"{cfg.axis_file} has no tensor 'axis'; found {sorted(tensors)}")
        axis = np.asarray(tensors["axis"], np.float32)
    else:
        axis = estimate_axis(model, cfg.axis_roles, cfg.axis_questions, cfg.seed)
    if axis.shape != (c.n_layers, c.d_model):
        raise ValueError(f"axis has shape {axis.shape}; expected ({c.n_layers}, {c.d_model})")
    u_all = axis / np.linalg.norm(axis, axis=-1, keepdims=True)

    convs = datasets.load_conversations("roleplay")
    if cfg.conversations:
        by_id = {cv.id: cv for cv in convs}
        missing = [i for i in cfg.conversations if i not in by_id]
        if missing:
            raise ValueError(f"unknown conversation ids {missing}; expected some of {sorted(by_id)}")
        convs = [by_id[i] for i in cfg.conversations]
    else:
        convs = convs[:cfg.n_conversations]
    probes_all = datasets.load_identity_probes()
    probes = list(probes_all.questions[:cfg.probes])
    markers = [re.compile(rf"\b{re.escape(mk)}\b", re.I) for mk in probes_all.assistant_markers]
    is_assistant = lambda text: any(p.search(text) for p in markers)  # noqa: E731

    runner = _Runner(model, cfg, jnp.asarray(u_all))
    eos, pad = eos_ids(model), (model.config.pad_token_id or 0)
    rows, key = [], jax.random.key(cfg.seed)
    samples_shown = []
    conditions = [("none", 0.0, None)] + [(mode, s, lr) for mode in ("recompute", "direct")
                                          for lr in cfg.layer_ranges for s in cfg.strengths]
    if cfg.controls and max(cfg.strengths) > 0:  # the largest positive edit, where the hypothesis says it cannot act
        conditions += [(ctl, max(cfg.strengths), cfg.layer_ranges[0]) for ctl in CONTROLS]
    u_random = np.asarray(unit(np.random.default_rng(cfg.seed + 1).normal(size=u_all.shape)), np.float32)
    for conv in convs:
        history = [{"role": m.role, "content": m.content} for m in conv.messages
                   if m.role != "system" or cfg.persona_source == "system"]
        persona_answer = f"I am {conv.role.replace('_', ' ')}." if conv.role else "I am not an assistant."
        for probe in probes:
            if progress:
                progress(f"conversation {conv.id}, probe {probe!r}")
            hist, probe_tokens = _history_and_probe(model, history, probe)
            n = len(hist)
            if len(probe_tokens) > PROBE_ROOM:
                raise ValueError(f"probe {probe!r} takes {len(probe_tokens)} tokens; at most {PROBE_ROOM} fit")
            size = n + PROBE_ROOM + cfg.max_new_tokens  # a function of n only: jitted shapes stay consistent
            runner.set_sizes(size, eos, pad)
            B = cfg.samples
            hist_tokens = jnp.asarray(np.repeat(hist.tokens[None], B, 0))
            asst = np.zeros((B, size), bool)
            asst[:, :n] = (hist.roles == Role.ASSISTANT)[None]
            user = np.zeros((B, size), bool)
            user[:, :n] = (hist.roles == Role.USER)[None]
            base = runner.prefill(model.params, hist_tokens, ())
            resid = jnp.pad(base.captured["resid_pre"], ((0, 0), (0, 0), (0, size - n), (0, 0)))
            h_asst = np.asarray(base.captured["resid_pre"][:, 0][:, hist.roles == Role.ASSISTANT])
            mean_norms = np.linalg.norm(h_asst, axis=-1).mean(axis=1)  # [L]
            for mode, strength, lr in conditions:
                if mode == "none":
                    cache = base.cache
                else:
                    layers = list(range(*lr))
                    positions = user if mode == "control_user" else asst
                    direction = u_random if mode == "control_random" else u_all
                    edit = _edit(cfg, model, cfg.strength_kind, strength, layers, positions, direction, mean_norms)
                    if mode == "recompute":
                        cache = runner.prefill(model.params, hist_tokens, (edit,)).cache
                    else:
                        cache = runner.direct(model.params, base.cache, resid, edit)
                probe_b = jnp.asarray(np.repeat(probe_tokens[None], B, 0))
                ext = runner.extend(model.params, cache, probe_b)
                key, sub = jax.random.split(jax.random.fold_in(jax.random.key(cfg.seed), len(rows)))
                gen = runner.decode(model.params, ext.cache, ext.logits[:, -1], sub)
                toks, lengths, done = jax.device_get((gen.tokens, gen.lengths, gen.finished))
                texts = [model.tokenizer.decode(toks[i, :lengths[i] - int(done[i])], skip_special_tokens=True)
                         for i in range(B)]
                valid = np.arange(cfg.max_new_tokens)[None] < (lengths - done)[:, None]
                proj = np.asarray(runner.readout(model.params, ext.cache, jnp.asarray(toks), jnp.asarray(valid)))
                lp = {}
                for name, ans in (("assistant", ASSISTANT_ANSWER), ("persona", persona_answer)):
                    ids = model.tokenizer(ans, add_special_tokens=False)["input_ids"]
                    first = float(jax.nn.log_softmax(ext.logits[0, -1])[ids[0]])
                    rest = runner.logprob(model.params, ext.cache, jnp.asarray([ids] * B, jnp.int32))
                    lp[name] = (first + float(rest[0])) / len(ids)  # per token: the answers differ in length
                row = dict(conversation=conv.id, probe=probe, mode=mode, strength=strength,
                           layers=f"{lr[0]}-{lr[1] - 1}" if lr else "-", n=B,
                           assistant_rate=float(np.mean([is_assistant(t) for t in texts])),
                           identity_logodds=lp["assistant"] - lp["persona"], answer_projection=float(proj.mean()))
                rows.append(row)
                if probe == probes[0] and (mode == "none" or strength == max(cfg.strengths)):
                    samples_shown.append((conv.id, mode, strength, row["layers"], texts[:2]))

    control = capping_control(model, convs, u_all, cfg)
    return Result(config=cfg, rows=rows, control=control, samples=samples_shown, seconds=time.time() - t0)


def capping_control(model, convs, u_all, cfg: Config):
    """Experiment 1 of the paper: floor the axis projection on assistant tokens only; compare the change
    in user-token and assistant-token projections at the readout layer."""
    from psm_jax.reductions import percentile

    c = model.config
    layer = cfg.readout_layer
    out = []
    for conv in convs:
        enc = encode_chat(model.tokenizer, [{"role": m.role, "content": m.content} for m in conv.messages],
                          chat_template=model.chat_template)
        tokens = jnp.asarray(enc.tokens[None])
        cap = Capture(sites=("resid_post",), layers=(layer,))
        base = forward(model.params, c, tokens, capture=cap).captured["resid_post"][0, 0] @ u_all[layer]
        asst = enc.roles == Role.ASSISTANT
        user = enc.roles == Role.USER
        tau = float(percentile(np.asarray(base)[asst], 75))  # a floor that binds on most assistant tokens
        lo, hi = cfg.layer_ranges[0]
        edit = E.clamp(c, u_all, layers=list(range(lo, min(hi, layer + 1))), floor=tau,
                       positions=asst[None], site="resid_post")
        capped = forward(model.params, c, tokens, edits=(edit,), capture=cap).captured["resid_post"][0, 0] \
            @ u_all[layer]
        d = np.asarray(capped - base)
        out.append(dict(conversation=conv.id, tau=tau, assistant_shift=float(d[asst].mean()),
                        user_shift=float(d[user].mean()), user_abs_shift=float(np.abs(d[user]).mean()),
                        user_tokens=int(user.sum()), assistant_tokens=int(asst.sum())))
    return out


def aggregate(rows: list[dict]) -> list[dict]:
    """Per condition (mode, layers, strength): means over (conversation, probe) pairs, n = pairs."""
    keys = sorted({(r["mode"], r["layers"], r["strength"]) for r in rows}, key=lambda k: (k[0] != "none", k))
    agg = []
    for mode, layers, s in keys:
        sel = [r for r in rows if (r["mode"], r["layers"], r["strength"]) == (mode, layers, s)]
        agg.append(dict(mode=mode, layers=layers, strength=s, n=len(sel), samples=sum(r["n"] for r in sel),
                        assistant_rate=float(np.mean([r["assistant_rate"] for r in sel])),
                        identity_logodds=float(np.mean([r["identity_logodds"] for r in sel])),
                        answer_projection=float(np.mean([r["answer_projection"] for r in sel]))))
    return agg


def control_shifts(rows: list[dict], seed: int = 0) -> dict:
    """Per control condition: the identity log-odds shift against the unedited cache, paired by (conversation,
    probe), with a 95% bootstrap interval; a control that works has an interval containing 0."""
    base = {(r["conversation"], r["probe"]): r for r in rows if r["mode"] == "none"}
    out = {}
    for ctl in CONTROLS:
        sel = [r for r in rows if r["mode"] == ctl]
        if sel:
            eff = paired_effect([r["identity_logodds"] for r in sel],
                                [base[(r["conversation"], r["probe"])]["identity_logodds"] for r in sel], seed=seed)
            out[ctl] = dict(strength=sel[0]["strength"], layers=sel[0]["layers"], n=eff["n"],
                            logodds_shift=eff["estimate"], ci_low=eff["low"], ci_high=eff["high"])
    return out


def identity_shifts(rows: list[dict], seed: int = 0) -> dict:
    """Per edit mode, at its largest positive strength: the identity log-odds shift against the unedited cache,
    paired by (conversation, probe), with a 95% bootstrap interval over those pairs."""
    base = {(r["conversation"], r["probe"]): r for r in rows if r["mode"] == "none"}
    out = {}
    for mode in ("recompute", "direct"):
        cand = [r for r in rows if r["mode"] == mode and r["strength"] > 0]
        if not cand:
            continue
        top = max(r["strength"] for r in cand)
        layers = sorted({r["layers"] for r in cand if r["strength"] == top})[0]
        sel = [r for r in cand if r["strength"] == top and r["layers"] == layers]
        b = [base[(r["conversation"], r["probe"])] for r in sel]
        eff = paired_effect([r["identity_logodds"] for r in sel], [x["identity_logodds"] for x in b], seed=seed)
        out[mode] = dict(strength=top, layers=layers, n=eff["n"], samples_per_unit=sel[0]["n"],
                         logodds_shift=eff["estimate"], ci_low=eff["low"], ci_high=eff["high"],
                         assistant_rate_shift=float(np.mean([r["assistant_rate"] - x["assistant_rate"]
                                                             for r, x in zip(sel, b)])),
                         projection_shift=float(np.mean([r["answer_projection"] - x["answer_projection"]
                                                         for r, x in zip(sel, b)])))
    return out


def report(result: Result, folder) -> Path:
    from experiments.report import Report, pyplot

    plt = pyplot()
    cfg, rows, control = result.config, result.rows, result.control
    n_convs = len({r["conversation"] for r in rows})
    rep = Report(folder, "KV-cache editing of a persisted persona", cfg)
    rep.section("Setup", f"""
Model {cfg.model}; {n_convs} role-play conversation(s) x {cfg.probes} identity probe(s) = {n_convs * cfg.probes}
independent units; {cfg.samples} sampled answers per unit and condition (temperature {cfg.temperature}, top-p
{cfg.top_p}, {cfg.max_new_tokens} tokens, seed {cfg.seed}). Edits act on the cached assistant-token positions of the
history only (resid_pre, block inputs of the listed layers); strength kind `{cfg.strength_kind}` ("scale":
projection x (1+s); "norm": + s * mean|h| along the unit axis). Negative strengths push toward the persona. Identity
log-odds: per-token log-likelihood of an assistant answer minus that of a persona answer after the probe. Readout:
mean projection of the sampled answer tokens on the unit axis at resid_post[{cfg.readout_layer}]. The
assistant-rate scorer is a keyword check. {PERSONA_SOURCE[cfg.persona_source]} Run time {result.seconds:.0f} s.""")
    agg = aggregate(rows)
    rep.table("Effect of cache edits (mean over conversation x probe units; n = units)", agg)
    base = next(a for a in agg if a["mode"] == "none")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, ls in (("recompute", "-"), ("direct", "--")):
        for lr in sorted({a["layers"] for a in agg if a["mode"] == mode}):
            pts = sorted([(0.0, base)] + [(a["strength"], a) for a in agg if a["mode"] == mode and a["layers"] == lr],
                         key=lambda p: p[0])
            for ax, k in zip(axes, ("identity_logodds", "answer_projection")):
                ax.plot([p[0] for p in pts], [p[1][k] for p in pts], ls, marker="o", label=f"{mode} L{lr}")
    for ax, k in zip(axes, ("identity log-odds per token (assistant vs persona)", "answer projection on axis")):
        ax.set_xlabel("edit strength")
        ax.set_title(k)
        ax.axvline(0, color="grey", lw=0.5)
    axes[0].legend(fontsize=7)
    rep.figure("kv_edit_effects", fig, "Identity log-odds and answer projection vs edit strength.")
    shifts = identity_shifts(rows, cfg.seed)
    rep.table("Identity log-odds shift at the largest strength (95% bootstrap interval over units)",
              [dict(mode=m, **v) for m, v in shifts.items()])
    controls = control_shifts(rows, cfg.seed)
    if controls:
        rep.table("Control edits: the same direct edit on user-token positions, and along a random direction "
                  "(identity log-odds shift, 95% interval over units; expected to contain 0)",
                  [dict(control=k, **v) for k, v in controls.items()])
    rep.table("Control: capping on assistant tokens only (projection shift at the readout layer)", control)
    rep.section("Sample answers (first probe)", "\n".join(
        f"- {cid} / {mode} s={s} L{lr}: " + " | ".join(repr(t[:120]) for t in texts)
        for cid, mode, s, lr, texts in result.samples))
    rep.metric("kv_edit_identity_shift", shifts)
    rep.metric("kv_edit_control_shift", controls)
    rep.metric("rows", rows)
    rep.metric("control", control)
    rep.metric("seconds", result.seconds)
    return rep.finish()


def records(result: Result) -> list[dict]:
    cfg = result.config
    out = []
    for mode, v in identity_shifts(result.rows, cfg.seed).items():
        out.append(dict(metric="kv_edit_identity_shift_ci_low", value=round(v["ci_low"], 4),
                        unit="nats per token (identity log-odds shift, 95% CI low)",
                        reference=f"unedited cache; {mode} edit, strength {v['strength']} ({cfg.strength_kind}), layers "
                                  f"{v['layers']}, n={v['n']} conversation x probe units ({v['samples_per_unit']} "
                                  f"samples each), model {cfg.model}, seed {cfg.seed}; shift "
                                  f"{v['logodds_shift']:+.4f} [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}]",
                        target="> 0 (toward the Assistant)", mode=mode, key=mode))
    for ctl, v in control_shifts(result.rows, cfg.seed).items():
        out.append(dict(metric="kv_edit_control_shift_ci", value=f"[{v['ci_low']:+.4f}, {v['ci_high']:+.4f}]",
                        unit="nats per token (identity log-odds shift, 95% CI)",
                        reference=f"unedited cache; {ctl}: direct edit, strength {v['strength']} ({cfg.strength_kind}), "
                                  f"layers {v['layers']}, n={v['n']} conversation x probe units, model {cfg.model}, "
                                  f"seed {cfg.seed}; shift {v['logodds_shift']:+.4f}",
                        target="contains 0", control=ctl, key=ctl, ci_low=v["ci_low"], ci_high=v["ci_high"]))
    return out
