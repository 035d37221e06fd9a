"""The rows of one history: every probe under every condition on the history's edited caches, which are built
once; and for one conversation the identity measure's validity reference (its user turns answered by the model
as its default Assistant)."""
from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from experiments.kv_editing.caches import history_caches
from experiments.kv_editing.config import REFERENCE_STREAM
from experiments.kv_editing.context import RunContext
from experiments.kv_editing.controls import band_row
from experiments.kv_editing.histories import generated_history, history_and_probe, token_counts
from experiments.kv_editing import padding  # padding.bucket: one attribute sets every padded length
from experiments.kv_editing.padding import cache_size, left_pad, repeat
from experiments.kv_editing.probes import ProbeInputs, padded_answers, probe_inputs, sampled_row
from psm_jax.persona.kv_identity import UNEDITED


class ShownAnswers(NamedTuple):
    """The first sampled answers of one condition on a conversation's first probe, shown in the report."""

    conversation: str
    history: str  # "scripted" or "generated"
    mode: str
    kind: str
    strength: float
    layers: str  # "first-last" edited layers, or "-"
    answers: list[str]


def history_rows(st: RunContext, conv, ci: int, history_kind: str, history: list[dict], persona_ids: np.ndarray,
                 first: int, progress) -> tuple[list[dict], list[ShownAnswers]]:
    """Every probe under every condition for one history, whose edited caches are built once; sampling keys fold in
    each row's index in the whole run (`first` rows came before). Also the first probe's sample answers to show."""
    cfg, model = st.cfg, st.model
    hist, _ = history_and_probe(model, history, st.probes[0])
    counts = token_counts(hist)
    n_pad = padding.bucket(len(hist))
    size = cache_size(cfg, n_pad)
    st.runner.set_sizes(size, st.eos, st.pad)
    caches, band = history_caches(model, cfg, st.runner, hist, n_pad, size, st.conditions, st.u_all, st.u_random,
                                  st.pad, np.random.default_rng((cfg.seed, ci)))
    answers = padded_answers(st, persona_ids)
    rows, shown = [], []
    for probe in st.probes:
        if progress:
            progress(f"conversation {conv.id} ({history_kind}), probe {probe!r}")
        inputs = probe_inputs(model, history, probe, answers, st.pad, cfg.samples)
        labels = dict(conversation=conv.id, history=history_kind, probe=probe)
        new_rows, new_shown = _probe_rows(st, caches, band, inputs, labels, counts, first + len(rows),
                                          show=probe == st.probes[0])
        rows += new_rows
        shown += new_shown
    return rows, shown


def _probe_rows(st: RunContext, caches: dict, band: dict, inputs: ProbeInputs, labels: dict, counts: dict, first: int,
                show: bool) -> tuple[list[dict], list[ShownAnswers]]:
    """Every condition on one probe, sampled with keys that fold in each row's index in the whole run (`first` rows
    came before); with `show`, also the first answers of the unedited cache and of the largest strength."""
    cfg = st.cfg
    rows, shown = [], []
    for cond in st.conditions:
        mode, kind, strength, lr = cond
        row = dict(**labels, mode=mode, kind=kind, strength=strength, layers=f"{lr[0]}-{lr[1] - 1}" if lr else "-",
                   n=cfg.samples, **counts)
        if mode == "control_random":
            rows.append(band_row(st, band[kind], inputs, row))
            continue
        key = jax.random.fold_in(jax.random.key(cfg.seed), first + len(rows))
        row, texts = sampled_row(st, caches[cond], inputs, key, row)
        rows.append(row)
        if show and (mode == UNEDITED or strength == max(cfg.strengths)):
            shown.append(ShownAnswers(labels["conversation"], labels["history"], mode, kind, strength, row["layers"],
                                      texts[:2]))
    return rows, shown


def reference_rows(st: RunContext, conv, ci: int, persona_ids: np.ndarray) -> tuple[list[dict], list[dict]]:
    """The validity reference of the identity measure for one conversation: its user turns answered by the model with
    no role prompt (its default Assistant, sampled like a generated history on a key of its own), and per probe the
    unedited identity log-odds after that history. A valid measure reads a higher (more Assistant) value here than
    after the persona history. Returns (one row per probe, the reference history)."""
    from psm_jax.persona.datasets import Conversation

    cfg, model = st.cfg, st.model
    users = Conversation(conv.id, conv.role, tuple(m for m in conv.messages if m.role == "user"))
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), ci), REFERENCE_STREAM)
    history = generated_history(model, users, cfg, key)
    hist, _ = history_and_probe(model, history, st.probes[0])
    n_pad = padding.bucket(len(hist))
    st.runner.set_sizes(cache_size(cfg, n_pad), st.eos, st.pad)
    tokens, mask = left_pad(hist.tokens, n_pad, st.pad)
    cache = st.runner.prefill(model.params, repeat(tokens, cfg.samples), repeat(mask, cfg.samples), ()).cache
    answers = padded_answers(st, persona_ids)
    rows = []
    for probe in st.probes:
        inputs = probe_inputs(model, history, probe, answers, st.pad, cfg.samples)
        logodds = st.runner.logodds(model.params, cache, inputs.tokens, *inputs.answers, inputs.masks)
        rows.append(dict(conversation=conv.id, probe=probe, identity_logodds=float(logodds[0])))
    return rows, history
