"""One probe scored on a cache: the identity probes and the keyword scorer, the probe turn and the two identity
answers as padded batch inputs, and a decoded condition's row (the sampled answers' assistant rate and mean axis
projection, and the identity log-odds on the cache)."""
from __future__ import annotations

import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments.kv_editing.config import ANSWER_ROOM, PROBE_ROOM, Config
from experiments.kv_editing.context import RunContext
from experiments.kv_editing.histories import history_and_probe
from experiments.kv_editing import padding  # padding.bucket: one attribute sets every padded length
from experiments.kv_editing.padding import left_pad, repeat, right_pad


def probes_and_scorer(cfg: Config) -> tuple[list[str], Callable[[str], bool]]:
    """The first `probes` identity questions, and the keyword scorer: does an answer name an assistant marker."""
    from psm_jax.persona import datasets

    probes_all = datasets.load_identity_probes()
    markers = [re.compile(rf"\b{re.escape(mk)}\b", re.I) for mk in probes_all.assistant_markers]
    return list(probes_all.questions[:cfg.probes]), lambda text: any(p.search(text) for p in markers)


def answer_ids(model, text: str) -> np.ndarray:
    """The tokens of an identity answer, checked to fit the cache's answer room."""
    ids = np.asarray(model.tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    if not 0 < len(ids) <= ANSWER_ROOM:
        raise ValueError(f"identity answer {text!r} takes {len(ids)} tokens; expected 1..{ANSWER_ROOM}")
    return ids


class ProbeInputs(NamedTuple):
    """One probe turn and the two identity answers as batched model inputs (identical rows, one per sample)."""
    tokens: jax.Array  # the probe turn [B, P], left-padded
    mask: jax.Array  # [B, P]
    answers: list  # the assistant and persona answers [B, A], right-padded
    masks: tuple  # (probe, assistant answer, persona answer) masks


def probe_inputs(model, history: list[dict], probe: str, answers: list[tuple], pad: int, n: int) -> ProbeInputs:
    """The probe turn after `history`, padded to its bucket, and the padded answers, each repeated n times."""
    _, probe_tokens = history_and_probe(model, history, probe)
    if len(probe_tokens) > PROBE_ROOM:
        raise ValueError(f"probe {probe!r} takes {len(probe_tokens)} tokens; at most {PROBE_ROOM} fit")
    probe_p, probe_m = left_pad(probe_tokens, padding.bucket(len(probe_tokens)), pad)
    tokens, mask = repeat(probe_p, n), repeat(probe_m, n)
    return ProbeInputs(tokens, mask, [repeat(t, n) for t, _ in answers],
                       (mask, *(repeat(m, n) for _, m in answers)))


def padded_answers(st: RunContext, persona_ids: np.ndarray) -> list[tuple]:
    """The assistant and persona identity answers, each right-padded to its bucket (tokens, mask)."""
    return [right_pad(a, padding.bucket(len(a)), st.pad) for a in (st.assistant_ids, persona_ids)]


def sampled_row(st: RunContext, cache, inputs: ProbeInputs, key, row: dict) -> tuple[dict, list[str]]:
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
