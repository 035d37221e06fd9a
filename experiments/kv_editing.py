"""KV-cache editing of a persisted persona (after Beckmann & Butlin 2026).

A conversation establishes a non-Assistant persona through its assistant turns only (the role-play system
prompt is left out of the cache): either the packaged scripted replies or the model's own replies, sampled turn
by turn under that system prompt. Before a probe question ("Who are you?" and other identity probes) is
appended, the cached states at the *assistant-token* positions of the history are pushed along the Assistant
Axis over a layer range, in two modes:
  recompute  re-run the prefill with a resid_pre edit masked to those positions (later layers'
             K/V change as a consequence), keep the cache, decode unedited;
  direct     rebuild K/V only at the chosen layers from the edited resid_pre, re-applying RoPE
             at the stored positions.
Strength is given two ways ("15%" is ambiguous), `strength_kind=both` runs each: `norm` adds s * mean|h| along
the unit axis (mean over the edited positions): s > 0 always moves toward the Assistant pole; `scale`
multiplies the projection onto the unit axis by (1 + s), which moves *away from zero* and so toward the
Assistant only where the projection is already positive. Negative strengths push toward the persona.

Measures per condition, for N sampled answers per probe with fixed seeds: the fraction of answers that speak as
an AI assistant (keyword scorer), the per-token identity log-odds of an assistant answer over a persona answer
(each answer's log-likelihood divided by its length, so answers of different lengths compare fairly), and the
mean axis projection of the sampled answers' tokens. The identity log-odds carries a validity check: unedited, it
must read higher (more Assistant) after the same user turns answered by the model as its default Assistant than
after the persona history (`identity_validity`, paired over units); its shifts are evidence only where it passes.
Controls at the largest strength: the same edit on the user-token positions, and a band of random directions at
the axis edit's per-layer displacement (matched norm; log-odds only, one compiled body mapped over the
directions); capping on assistant tokens only, and how much it moves user-token projections compared with
assistant ones. The measures on a cache and the row statistics (shifts, intervals, validity, controls) are
`psm_jax.persona.kv_identity`; this module builds the histories, caches, edits and rows.

Shapes: histories are left-padded (and probes left-padded, identity answers right-padded) with masked slots to a
few bucket lengths (`bucket`), so one compiled function serves every conversation and probe of a bucket; masked
slots get no position and are never attended to, so the numbers equal the unpadded computation's.

The independent unit is a (conversation, probe) pair: samples within it share the edited cache, and the histories
of one conversation share its persona and user turns, so intervals are bootstrapped over pairs and `n` counts them.

    psm kv-editing --preset quick --out runs/kv_editing        psm kv-editing strength_kind=scale samples=8
"""
from __future__ import annotations

import dataclasses
import re
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments.study import written_by
from psm_jax import edits as E
from psm_jax.chat import Role, encode_chat
from psm_jax.generate import decode, prefill
from psm_jax.kvcache import edit_cache_direct
from psm_jax.model import Capture, forward, jit_forward
from psm_jax.persona import DEFAULT_MODEL
from psm_jax.persona.capping import capping_edit
from psm_jax.persona.directions import unit
from psm_jax.persona.kv_identity import (CONTROLS, EDIT_MODES, MATCHED, UNEDITED, identity_logodds,
                                         identity_logodds_band, matched_positions, projection_readout)
from psm_jax.persona.stats import MIN_NULL_DRAWS

PERSONA_SOURCE = {
    "conversation": "The persona is established by the conversation only: its role-play system prompt is left out, "
                    "so the persona lives in the in-character assistant turns that the edit acts on.",
    "system": "The persona is set by the conversation's system prompt, which stays unedited in the cache.",
}
CONVERSATION_SETS = {
    "roleplay": "the packaged scripted role-play conversations",
    "roles": "open role-play conversations built from the packaged role archetypes (the role's first instruction as "
             "system prompt, user turns drawn from the role questions; only generated histories)",
}
HISTORIES = {
    "scripted": "the packaged role-play replies",
    "generated": "the model's own replies, sampled turn by turn under the role-play system prompt (then left out)",
}
KINDS = {"norm": ("norm",), "scale": ("scale",), "both": ("norm", "scale")}
PROBE_ROOM = 64  # cache slots reserved for a probe turn (template included)
ANSWER_ROOM = 32  # cache slots reserved for a scored identity answer
ASSISTANT_ANSWER = "I am an AI assistant, a language model made to help people."
REFERENCE_STREAM = 1  # folded into a conversation's key for its Assistant reference history (its own samples)
BUCKET_BASE = 16  # bucket lengths: 16, 24, 32, 48, 64, 96, ... (each at most 1.5x the previous)


def bucket(n: int) -> int:
    """The padded length of a sequence of n tokens: the smallest of 16, 24, 32, 48, 64, 96, ... that holds it."""
    b = BUCKET_BASE
    while True:
        for length in (b, b * 3 // 2):
            if length >= n:
                return length
        b *= 2


def left_pad(tokens: np.ndarray, length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) left-padded to `length`: positions follow the mask, so the real tokens keep theirs."""
    off = length - len(tokens)
    return (np.concatenate([np.full(off, pad, np.int32), np.asarray(tokens, np.int32)]),
            np.arange(length) >= off)


def right_pad(tokens: np.ndarray, length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) right-padded to `length` (for scored answers: the mask drops the tail from the mean)."""
    n = len(tokens)
    return np.concatenate([np.asarray(tokens, np.int32), np.full(length - n, pad, np.int32)]), np.arange(length) < n


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = DEFAULT_MODEL
    conversation_set: str = "roleplay"  # "roleplay" | "roles" (CONVERSATION_SETS)
    conversations: tuple[str, ...] = ()  # ids of the set: roleplay.json conversations, or role names for "roles"
    n_conversations: int = 3  # used when `conversations` is empty: the first n (roleplay), n stratified roles (roles)
    role_turns: int = 4  # user turns of an open role conversation (the scripted ones have 4)
    probes: int = 3  # number of identity probe questions
    samples: int = 6  # sampled answers per probe and condition
    max_new_tokens: int = 32
    temperature: float = 0.8
    top_p: float = 0.95
    strengths: tuple[float, ...] = (-0.15, 0.15, 0.3)
    strength_kind: str = "norm"  # norm | scale | both (each strength applied in each kind)
    layer_ranges: tuple[tuple[int, int], ...] = ((10, 20),)  # [start, end) block inputs
    readout_layer: int = 15  # resid_post layer of the axis projection readout
    axis_file: str | None = None  # safetensors with key "axis" [n_layers, d_model]; None = estimate
    axis_roles: int = 12
    axis_questions: int = 4
    persona_source: str = "conversation"  # "conversation": the role-play's system prompt is left out, so the persona
    # lives in the assistant turns only (the paper's condition); "system": it stays in the cache, unedited
    histories: tuple[str, ...] = ("scripted", "generated")  # where the in-character assistant turns come from
    history_tokens: int = 64  # new tokens per generated assistant turn
    controls: bool = True  # at the largest strength: the edit on user tokens, and a band of random directions
    n_random: int = 20  # random directions (matched norm) in the control band; identity log-odds only
    seed: int = 0

    def __post_init__(self):
        if self.strength_kind not in KINDS:
            raise ValueError(f"strength_kind={self.strength_kind!r}; expected 'norm', 'scale' or 'both'")
        if self.persona_source not in ("conversation", "system"):
            raise ValueError(f"persona_source={self.persona_source!r}; expected 'conversation' or 'system'")
        if self.samples < 1 or self.probes < 1:
            raise ValueError(f"samples={self.samples}, probes={self.probes}; expected both >= 1")
        if self.conversation_set not in CONVERSATION_SETS:
            raise ValueError(f"conversation_set={self.conversation_set!r}; expected one of {tuple(CONVERSATION_SETS)}")
        if self.conversation_set == "roles" and "scripted" in self.histories:
            raise ValueError(f"histories={self.histories!r} with conversation_set='roles'; expected ('generated',): "
                             "open role conversations have no scripted assistant turns")
        if self.n_conversations < 1 or self.role_turns < 1:
            raise ValueError(f"n_conversations={self.n_conversations}, role_turns={self.role_turns}; expected >= 1")
        bad = [h for h in self.histories if h not in HISTORIES]
        if bad or not self.histories:
            raise ValueError(f"histories={self.histories!r}; expected a non-empty subset of {tuple(HISTORIES)}")
        if self.history_tokens < 1:
            raise ValueError(f"history_tokens={self.history_tokens}; expected >= 1")
        if self.n_random < MIN_NULL_DRAWS:
            raise ValueError(f"n_random={self.n_random}; expected >= {MIN_NULL_DRAWS} (the control band's random "
                             "directions)")


PRESETS = {
    "ci": dict(n_conversations=1, probes=1, samples=2, strengths=(0.3,), max_new_tokens=8, histories=("scripted",)),
    "quick": dict(n_conversations=1, probes=2, samples=3, strengths=(-0.15, 0.3), max_new_tokens=16,
                  histories=("scripted",)),
    "full": dict(strength_kind="both"),
}


@dataclasses.dataclass
class Result:
    config: Config
    rows: list[dict]  # one per (conversation, history, probe, condition)
    control: list[dict]  # assistant-token capping: projection shifts per conversation
    samples: list[tuple]  # (conversation, history, mode, kind, strength, layers, first answers) for the report
    seconds: float
    histories: dict = dataclasses.field(default_factory=dict)  # "conversation/history" -> assistant turns shown
    # the identity measure's validity reference: per (conversation, probe), the unedited log-odds after the same user
    # turns answered by the model as its default Assistant (`_reference_rows`)
    reference: list = dataclasses.field(default_factory=list)
    reference_histories: dict = dataclasses.field(default_factory=dict)  # conversation -> the Assistant's turns


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


def generated_history(model, conv, cfg: Config, key) -> list[dict]:
    """The conversation's user turns with the model's own in-character replies: each assistant turn is sampled
    under the role-play system prompt and the history so far (so the persona persists in the model's own words).
    The system prompt is kept in the returned messages; `_cached_messages` drops it when the persona comes from
    the conversation only."""
    from psm_jax.persona.rollouts import generate_responses

    msgs = [{"role": m.role, "content": m.content} for m in conv.messages if m.role == "system"]
    for m in conv.messages:
        if m.role != "user":
            continue
        msgs.append({"role": "user", "content": m.content})
        key, sub = jax.random.split(key)
        roll = generate_responses(model, [msgs], max_new_tokens=cfg.history_tokens, temperature=cfg.temperature,
                                  top_p=1.0, key=sub, batch_size=1)[0]
        msgs.append({"role": "assistant", "content": roll.response or "..."})
    return msgs


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


def _edit(model, kind: str, strength: float, layers, positions, u, scale_l):
    """The cache edit: `norm` adds strength * scale_l[l] along the unit direction (scale_l: mean |h| per layer);
    `scale` multiplies the projection onto it by (1 + strength)."""
    if kind == "scale":
        return E.scale_projection(model.config, u, 1.0 + strength, layers=layers, site="resid_pre",
                                  positions=positions, extend=False)
    coef = jnp.asarray(strength * scale_l, jnp.float32)  # per layer
    return E.add(model.config, u, layers=layers, coef=coef, site="resid_pre", positions=positions, extend=False)


class _Runner:
    """Jitted pieces shared by all conditions: one compilation per bucket of padded shapes (the cache size is a
    function of the history's bucket, so a shape fixes it)."""

    def __init__(self, model, cfg: Config, u_all):
        self.m, self.cfg, self.u_all = model, cfg, u_all
        c = model.config
        self.prefill = jax.jit(lambda p, t, mask, e: prefill(p, c, t, mask, cache_size=self._size, edits=e,
                                                             capture=Capture(sites=("resid_pre",))))
        self.extend = jax.jit(lambda p, cache, t, mask: forward(p, c, t, attention_mask=mask, cache=cache,
                                                                logits_positions="last"))
        self.decode = jax.jit(lambda p, cache, logits, key: decode(
            p, c, cache, logits, max_new_tokens=cfg.max_new_tokens, key=key, temperature=cfg.temperature,
            top_p=cfg.top_p, sample=True, use_top_p=cfg.top_p < 1.0, eos_ids=self.eos, pad_id=self.pad))
        self.readout = jax.jit(lambda p, cache, t, mask: projection_readout(p, c, cache, t, mask, cfg.readout_layer,
                                                                            u_all[cfg.readout_layer]))
        self.logodds = jax.jit(lambda p, cache, t, a, b, masks: identity_logodds(p, c, cache, t, a, b, masks))
        self.direct = jax.jit(lambda p, cache, resid, e: edit_cache_direct(p, c, cache, resid, e))
        self.band = jax.jit(lambda p, cache, resid, t, a, b, e, v, masks: identity_logodds_band(
            p, c, cache, resid, t, a, b, e, v, masks))

    def set_sizes(self, size, eos, pad):
        self._size, self.eos, self.pad = size, eos, pad


def _conditions(cfg: Config) -> list[tuple]:
    """(mode, kind, strength, layer range) for every condition; "none" is the unedited cache."""
    kinds = KINDS[cfg.strength_kind]
    out = [(UNEDITED, "-", 0.0, None)] + [(mode, kind, s, lr) for kind in kinds for mode in EDIT_MODES
                                        for lr in cfg.layer_ranges for s in cfg.strengths]
    if cfg.controls and max(cfg.strengths) > 0:  # the largest positive edit, where the hypothesis says it cannot act
        out += [(ctl, kind, max(cfg.strengths), cfg.layer_ranges[0]) for kind in kinds
                for ctl in CONTROLS + (MATCHED,)]
    return out


def _answer_ids(model, text: str) -> np.ndarray:
    ids = np.asarray(model.tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    if not 0 < len(ids) <= ANSWER_ROOM:
        raise ValueError(f"identity answer {text!r} takes {len(ids)} tokens; expected 1..{ANSWER_ROOM}")
    return ids


def _check_layers(cfg: Config, config) -> None:
    """Fail before any model work when a layer range or the readout layer does not fit the model."""
    for lo, hi in cfg.layer_ranges:
        if not 0 <= lo < hi <= config.n_layers:
            raise ValueError(f"layer range ({lo}, {hi}) is invalid; expected 0 <= start < end <= {config.n_layers}")
    config.check_layer(cfg.readout_layer, "readout_layer")


def _unit_axis(cfg: Config, model) -> np.ndarray:
    """The Assistant Axis [L, D] from `axis_file` (or estimated here), unit length per layer: every edit, band
    direction and readout is taken along it."""
    c = model.config
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
    return axis / np.linalg.norm(axis, axis=-1, keepdims=True)


def _select_conversations(cfg: Config) -> list:
    """The role-play conversations named in `conversations` (in that order), else the first `n_conversations`; for
    the "roles" set, open conversations of those roles, else of `n_conversations` stratified ones."""
    from psm_jax.persona import datasets
    from psm_jax.persona.prompts import open_role_conversations

    if cfg.conversation_set == "roles":
        return open_role_conversations(datasets.load_roles(), datasets.load_role_questions(), cfg.n_conversations,
                                       cfg.role_turns, cfg.seed, names=cfg.conversations)
    convs = datasets.load_conversations("roleplay")
    if not cfg.conversations:
        return convs[:cfg.n_conversations]
    by_id = {cv.id: cv for cv in convs}
    missing = [i for i in cfg.conversations if i not in by_id]
    if missing:
        raise ValueError(f"unknown conversation ids {missing}; expected some of {sorted(by_id)}")
    return [by_id[i] for i in cfg.conversations]


def _probes_and_scorer(cfg: Config) -> tuple[list[str], Callable[[str], bool]]:
    """The first `probes` identity questions, and the keyword scorer: does an answer name an assistant marker."""
    from psm_jax.persona import datasets

    probes_all = datasets.load_identity_probes()
    markers = [re.compile(rf"\b{re.escape(mk)}\b", re.I) for mk in probes_all.assistant_markers]
    return list(probes_all.questions[:cfg.probes]), lambda text: any(p.search(text) for p in markers)


def _random_directions(cfg: Config, shape: tuple) -> np.ndarray:
    """The `n_random` unit directions [n, L, D] of the random-direction control band, seeded apart from sampling."""
    rng = np.random.default_rng(cfg.seed + 1)
    return np.asarray(unit(rng.normal(size=(cfg.n_random,) + shape)), np.float32)


@dataclasses.dataclass(frozen=True)
class _Study:
    """What every (conversation, history, probe) of one run shares."""
    cfg: Config
    model: object
    runner: _Runner
    probes: list[str]
    is_assistant: Callable[[str], bool]  # the keyword scorer of a sampled answer
    eos: tuple
    pad: int
    conditions: list[tuple]
    u_all: np.ndarray  # the unit axis [L, D]
    u_random: np.ndarray  # the control band's directions [n, L, D]
    assistant_ids: np.ndarray  # tokens of the assistant identity answer


def _study(cfg: Config, model, u_all: np.ndarray) -> _Study:
    """The jitted runner, conditions, probes, scorer, control directions and assistant answer, built once per run."""
    from psm_jax.persona.rollouts import eos_ids

    probes, is_assistant = _probes_and_scorer(cfg)
    return _Study(cfg=cfg, model=model, runner=_Runner(model, cfg, jnp.asarray(u_all)), probes=probes,
                  is_assistant=is_assistant, eos=eos_ids(model), pad=model.config.pad_token_id or 0,
                  conditions=_conditions(cfg), u_all=u_all, u_random=_random_directions(cfg, u_all.shape),
                  assistant_ids=_answer_ids(model, ASSISTANT_ANSWER))


def _full_history(model, conv, cfg: Config, ci: int, history_kind: str) -> list[dict]:
    """The conversation with scripted or generated assistant turns, system prompt included."""
    return (conv.as_dicts() if history_kind == "scripted" else
            generated_history(model, conv, cfg, jax.random.fold_in(jax.random.key(cfg.seed), ci)))


def _cached_messages(full: list[dict], cfg: Config) -> list[dict]:
    """The messages cached before the probe: the system prompt only when the persona comes from it."""
    return [m for m in full if m["role"] != "system" or cfg.persona_source == "system"]


def _token_counts(hist) -> dict:
    """Assistant and user tokens in a history: how many positions the axis edit and the user-token control edit."""
    roles = np.asarray(hist.roles)
    return dict(assistant_tokens=int(np.sum(roles == Role.ASSISTANT)), user_tokens=int(np.sum(roles == Role.USER)))


def _repeat(x: np.ndarray, n: int) -> jax.Array:
    """x as n identical batch rows (one per sampled answer), on the device."""
    return jnp.asarray(np.repeat(x[None], n, 0))


class _ProbeInputs(NamedTuple):
    """One probe turn and the two identity answers as batched model inputs (identical rows, one per sample)."""
    tokens: jax.Array  # the probe turn [B, P], left-padded
    mask: jax.Array  # [B, P]
    answers: list  # the assistant and persona answers [B, A], right-padded
    masks: tuple  # (probe, assistant answer, persona answer) masks


def _probe_inputs(model, history: list[dict], probe: str, answers: list[tuple], pad: int, n: int) -> _ProbeInputs:
    """The probe turn after `history`, padded to its bucket, and the padded answers, each repeated n times."""
    _, probe_tokens = _history_and_probe(model, history, probe)
    if len(probe_tokens) > PROBE_ROOM:
        raise ValueError(f"probe {probe!r} takes {len(probe_tokens)} tokens; at most {PROBE_ROOM} fit")
    probe_p, probe_m = left_pad(probe_tokens, bucket(len(probe_tokens)), pad)
    tokens, mask = _repeat(probe_p, n), _repeat(probe_m, n)
    return _ProbeInputs(tokens, mask, [_repeat(t, n) for t, _ in answers],
                        (mask, *(_repeat(m, n) for _, m in answers)))


def _band_row(st: _Study, band: tuple, inputs: _ProbeInputs, row: dict) -> dict:
    """The random-direction control on one probe: identity log-odds after the direct edit along each direction (one
    batch row; nothing is sampled, so the rates are NaN and the row's log-odds is the mean over directions)."""
    cache1, resid1, edit1 = band
    lo = st.runner.band(st.model.params, cache1, resid1, inputs.tokens[:1], inputs.answers[0][:1],
                        inputs.answers[1][:1], edit1, jnp.asarray(st.u_random), tuple(x[:1] for x in inputs.masks))
    per_dir = np.asarray(lo)[:, 0]
    return dict(row, n=0, assistant_rate=float("nan"), answer_projection=float("nan"),
                identity_logodds=float(per_dir.mean()), band_logodds=[float(x) for x in per_dir])


def _sampled_row(st: _Study, cache, inputs: _ProbeInputs, key, row: dict) -> tuple[dict, list[str]]:
    """A decoded condition on one probe: answers sampled from `cache` with `key` (their assistant rate and mean axis
    projection) and the identity log-odds on the cache; also the answer texts."""
    params, runner = st.model.params, st.runner
    ext = runner.extend(params, cache, inputs.tokens, inputs.mask)
    gen = runner.decode(params, ext.cache, ext.logits[:, -1], key)
    toks, lengths, done = jax.device_get((gen.tokens, gen.lengths, gen.finished))
    texts = [st.model.tokenizer.decode(toks[i, :lengths[i] - int(done[i])], skip_special_tokens=True)
             for i in range(len(toks))]
    valid = np.arange(toks.shape[1])[None] < (lengths - done)[:, None]
    proj = np.asarray(runner.readout(params, ext.cache, jnp.asarray(toks), jnp.asarray(valid)))
    logodds = float(runner.logodds(params, cache, inputs.tokens, *inputs.answers, inputs.masks)[0])
    return dict(row, assistant_rate=float(np.mean([st.is_assistant(t) for t in texts])), identity_logodds=logodds,
                answer_projection=float(proj.mean())), texts


def _cache_size(cfg: Config, n_pad: int) -> int:
    """Cache slots for a history padded to n_pad, a probe turn and an answer: a function of the bucket only, so one
    compilation serves every history of a bucket."""
    return n_pad + PROBE_ROOM + max(cfg.max_new_tokens, ANSWER_ROOM)


def _padded_answers(st: _Study, persona_ids: np.ndarray) -> list[tuple]:
    """The assistant and persona identity answers, each right-padded to its bucket (tokens, mask)."""
    return [right_pad(a, bucket(len(a)), st.pad) for a in (st.assistant_ids, persona_ids)]


def _history_rows(st: _Study, conv, ci: int, history_kind: str, history: list[dict], persona_ids: np.ndarray,
                  first: int, progress) -> tuple[list[dict], list[tuple]]:
    """Every probe under every condition for one history, whose edited caches are built once; sampling keys fold in
    each row's index in the whole run (`first` rows came before). Also the first probe's sample answers to show."""
    cfg, model = st.cfg, st.model
    hist, _ = _history_and_probe(model, history, st.probes[0])
    counts = _token_counts(hist)
    n_pad = bucket(len(hist))
    size = _cache_size(cfg, n_pad)
    st.runner.set_sizes(size, st.eos, st.pad)
    caches, band = _history_caches(model, cfg, st.runner, hist, n_pad, size, st.conditions, st.u_all, st.u_random,
                                   st.pad, np.random.default_rng((cfg.seed, ci)))
    answers = _padded_answers(st, persona_ids)
    rows, shown = [], []
    for probe in st.probes:
        if progress:
            progress(f"conversation {conv.id} ({history_kind}), probe {probe!r}")
        inputs = _probe_inputs(model, history, probe, answers, st.pad, cfg.samples)
        for cond in st.conditions:
            mode, kind, strength, lr = cond
            row = dict(conversation=conv.id, history=history_kind, probe=probe, mode=mode, kind=kind,
                       strength=strength, layers=f"{lr[0]}-{lr[1] - 1}" if lr else "-", n=cfg.samples, **counts)
            if mode == "control_random":
                rows.append(_band_row(st, band[kind], inputs, row))
                continue
            key = jax.random.fold_in(jax.random.key(cfg.seed), first + len(rows))
            row, texts = _sampled_row(st, caches[cond], inputs, key, row)
            rows.append(row)
            if probe == st.probes[0] and (mode == UNEDITED or strength == max(cfg.strengths)):
                shown.append((conv.id, history_kind, mode, kind, strength, row["layers"], texts[:2]))
    return rows, shown


def _reference_rows(st: _Study, conv, ci: int, persona_ids: np.ndarray) -> tuple[list[dict], list[dict]]:
    """The validity reference of the identity measure for one conversation: its user turns answered by the model with
    no role prompt (its default Assistant, sampled like a generated history on a key of its own), and per probe the
    unedited identity log-odds after that history. A valid measure reads a higher (more Assistant) value here than
    after the persona history. Returns (one row per probe, the reference history)."""
    from psm_jax.persona.datasets import Conversation

    cfg, model = st.cfg, st.model
    users = Conversation(conv.id, conv.role, tuple(m for m in conv.messages if m.role == "user"))
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), ci), REFERENCE_STREAM)
    history = generated_history(model, users, cfg, key)
    hist, _ = _history_and_probe(model, history, st.probes[0])
    n_pad = bucket(len(hist))
    st.runner.set_sizes(_cache_size(cfg, n_pad), st.eos, st.pad)
    tokens, mask = left_pad(hist.tokens, n_pad, st.pad)
    cache = st.runner.prefill(model.params, _repeat(tokens, cfg.samples), _repeat(mask, cfg.samples), ()).cache
    answers = _padded_answers(st, persona_ids)
    rows = []
    for probe in st.probes:
        inputs = _probe_inputs(model, history, probe, answers, st.pad, cfg.samples)
        logodds = st.runner.logodds(model.params, cache, inputs.tokens, *inputs.answers, inputs.masks)
        rows.append(dict(conversation=conv.id, probe=probe, identity_logodds=float(logodds[0])))
    return rows, history


def run(cfg: Config, model, progress: Callable[[str], None] | None = None) -> Result:
    """Every condition on every (conversation, history, probe), and the capping control. No files."""
    t0 = time.time()
    _check_layers(cfg, model.config)
    u_all = _unit_axis(cfg, model)
    convs = _select_conversations(cfg)
    st = _study(cfg, model, u_all)
    rows, samples_shown, shown_histories, capped, reference, reference_histories = [], [], {}, [], [], {}
    for ci, conv in enumerate(convs):
        persona_ids = _answer_ids(model, f"I am {conv.role.replace('_', ' ')}." if conv.role
                                  else "I am not an assistant.")
        if progress:
            progress(f"conversation {conv.id}: the Assistant's own replies (the identity measure's validity reference)")
        ref_rows, ref_history = _reference_rows(st, conv, ci, persona_ids)
        reference += ref_rows
        reference_histories[conv.id] = [m["content"] for m in ref_history if m["role"] == "assistant"]
        fulls = {}
        for history_kind in cfg.histories:
            fulls[history_kind] = full = _full_history(model, conv, cfg, ci, history_kind)
            if history_kind == "generated":
                shown_histories[f"{conv.id}/generated"] = [m["content"] for m in full if m["role"] == "assistant"]
            new_rows, shown = _history_rows(st, conv, ci, history_kind, _cached_messages(full, cfg), persona_ids,
                                            len(rows), progress)
            rows += new_rows
            samples_shown += shown
        has_script = any(m.role == "assistant" for m in conv.messages)
        capped.append((conv.id, conv.as_dicts() if has_script else fulls["generated"]))

    control = capping_control(model, capped, u_all, cfg)
    return Result(config=cfg, rows=rows, control=control, samples=samples_shown, seconds=time.time() - t0,
                  histories=shown_histories, reference=reference, reference_histories=reference_histories)


def _slots(positions: np.ndarray, rows: int, size: int) -> np.ndarray:
    """A [rows, size] cache-slot mask: `positions` [n_pad] over the history's slots, False over the room left for
    the probe and the answers."""
    out = np.zeros((rows, size), bool)
    out[:, :len(positions)] = positions[None]
    return out


def _history_caches(model, cfg: Config, runner: _Runner, hist, n_pad: int, size: int, conditions, u_all, u_random,
                    pad: int, rng: np.random.Generator):
    """The edited cache of every decoded condition for one history, left-padded to n_pad slots (the probe is
    appended later), and per kind the B=1 cache, block inputs and template edit of the random-direction band.
    `rng` draws the token-matched subset of assistant positions."""
    B = cfg.samples
    tokens, mask = left_pad(hist.tokens, n_pad, pad)
    roles = np.concatenate([np.full(n_pad - len(hist), -1), np.asarray(hist.roles)])
    is_asst, is_user = roles == Role.ASSISTANT, roles == Role.USER
    hist_tokens, hist_mask = _repeat(tokens, B), _repeat(mask, B)
    asst, user = _slots(is_asst, B, size), _slots(is_user, B, size)
    matched = _slots(matched_positions(is_asst, int(is_user.sum()), rng), B, size)
    base = runner.prefill(model.params, hist_tokens, hist_mask, ())
    resid = jnp.pad(base.captured["resid_pre"], ((0, 0), (0, 0), (0, size - n_pad), (0, 0)))
    h_asst = np.asarray(base.captured["resid_pre"][:, 0][:, is_asst], np.float64)  # [L, n_a, D]
    mean_norm = np.linalg.norm(h_asst, axis=-1).mean(axis=1)  # [L]
    mean_abs_proj = np.abs(np.einsum("lnd,ld->ln", h_asst, u_all)).mean(axis=1)  # [L]
    caches, band = {}, {}
    for cond in conditions:
        mode, kind, strength, lr = cond
        if mode == UNEDITED:
            caches[cond] = base.cache
            continue
        layers = list(range(*lr))
        if mode == "control_random":  # matched norm: the axis edit's mean displacement per layer, along r
            disp = mean_norm if kind == "norm" else mean_abs_proj
            edit1 = E.add(model.config, u_random[0], layers=layers, coef=jnp.asarray(strength * disp, jnp.float32),
                          site="resid_pre", positions=asst[:1], extend=False)
            b1 = runner.prefill(model.params, hist_tokens[:1], hist_mask[:1], ())
            band[kind] = (b1.cache, resid[:, :1], edit1)
            continue
        positions = {"control_user": user, MATCHED: matched}.get(mode, asst)
        edit = _edit(model, kind, strength, layers, positions, u_all, mean_norm)
        if mode == "recompute":
            caches[cond] = runner.prefill(model.params, hist_tokens, hist_mask, (edit,)).cache
        else:
            caches[cond] = runner.direct(model.params, base.cache, resid, edit)
    return caches, band


def capping_control(model, conversations: list[tuple[str, list[dict]]], u_all, cfg: Config):
    """Experiment 1 of the paper: floor the axis projection on assistant tokens only; compare the change
    in user-token and assistant-token projections at the readout layer. `conversations` are (id, messages) pairs,
    system prompt and assistant turns included."""
    from psm_jax.reductions import percentile

    c = model.config
    layer = cfg.readout_layer
    cap = Capture(sites=("resid_post",), layers=(layer,))
    pad = model.config.pad_token_id or 0
    out = []
    for conv_id, messages in conversations:
        enc = encode_chat(model.tokenizer, messages, chat_template=model.chat_template)
        n_pad = bucket(len(enc))  # left padding to a bucket: one compilation serves conversations of similar length
        tokens, mask = (jnp.asarray(x[None]) for x in left_pad(enc.tokens, n_pad, pad))
        real = slice(n_pad - len(enc), n_pad)

        def projections(edits=()):
            out_ = jit_forward(model.params, c, tokens, attention_mask=mask, edits=edits, capture=cap)
            return np.asarray(out_.captured["resid_post"][0, 0])[real] @ u_all[layer]

        base = projections()
        asst = enc.roles == Role.ASSISTANT
        user = enc.roles == Role.USER
        tau = float(percentile(base[asst], 75))  # a floor that binds on most assistant tokens
        lo, hi = cfg.layer_ranges[0]
        positions = np.zeros((1, n_pad), bool)
        positions[0, real] = asst
        capped = list(range(lo, min(hi, layer + 1)))
        edit = capping_edit(c, u_all, capped, [tau] * len(capped), positions=positions)
        d = projections((edit,)) - base
        out.append(dict(conversation=conv_id, tau=tau, assistant_shift=float(d[asst].mean()),
                        user_shift=float(d[user].mean()), user_abs_shift=float(np.abs(d[user]).mean()),
                        user_tokens=int(user.sum()), assistant_tokens=int(asst.sum())))
    return out


report, records = written_by("experiments.kv_editing_report")
