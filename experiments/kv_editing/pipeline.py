"""The study's computation: the run-wide pieces built once (`study`), then per conversation the validity reference
and every history's rows, then the capping control (`run`). No files, no printing."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax.numpy as jnp
import numpy as np

from experiments.kv_editing.axis import unit_axis
from experiments.kv_editing.caches import conditions
from experiments.kv_editing.config import ASSISTANT_ANSWER, Config, check_layers
from experiments.kv_editing.context import RunContext
from experiments.kv_editing.controls import capping_control, random_directions
from experiments.kv_editing.histories import assistant_turns, cached_messages, full_history, select_conversations
from experiments.kv_editing.probes import answer_ids, probes_and_scorer
from experiments.kv_editing.rows import ShownAnswers, history_rows, reference_rows
from experiments.kv_editing.runner import Runner


@dataclasses.dataclass
class Result:
    config: Config
    rows: list[dict]  # one per (conversation, history, probe, condition)
    control: list[dict]  # assistant-token capping: projection shifts per conversation
    samples: list[ShownAnswers]  # the first answers of each shown condition, for the report
    seconds: float
    histories: dict = dataclasses.field(default_factory=dict)  # "conversation/history" -> assistant turns shown
    # the identity measure's validity reference: per (conversation, probe), the unedited log-odds after the same user
    # turns answered by the model as its default Assistant (`rows.reference_rows`)
    reference: list = dataclasses.field(default_factory=list)
    reference_histories: dict = dataclasses.field(default_factory=dict)  # conversation -> the Assistant's turns


def run_context(cfg: Config, model, u_all: np.ndarray) -> RunContext:
    """The jitted runner, conditions, probes, scorer, control directions and assistant answer, built once per run."""
    from psm_jax.persona.rollouts import eos_ids

    probes, is_assistant = probes_and_scorer(cfg)
    return RunContext(cfg=cfg, model=model, runner=Runner(model, cfg, jnp.asarray(u_all)), probes=probes,
                 is_assistant=is_assistant, eos=eos_ids(model), pad=model.config.pad_token_id or 0,
                 conditions=conditions(cfg), u_all=u_all, u_random=random_directions(cfg, u_all.shape),
                 assistant_ids=answer_ids(model, ASSISTANT_ANSWER))


def run(cfg: Config, model, progress: Callable[[str], None] | None = None) -> Result:
    """Every condition on every (conversation, history, probe), and the capping control. No files."""
    t0 = time.time()
    check_layers(cfg, model.config)
    u_all = unit_axis(cfg, model)
    convs = select_conversations(cfg)
    st = run_context(cfg, model, u_all)
    result = Result(config=cfg, rows=[], control=[], samples=[], seconds=0.0)
    capped = [_add_conversation(result, st, conv, ci, progress) for ci, conv in enumerate(convs)]
    result.control = capping_control(model, capped, u_all, cfg)
    result.seconds = time.time() - t0
    return result


def _add_conversation(result: Result, st: RunContext, conv, ci: int, progress) -> tuple[str, list[dict]]:
    """One conversation's validity reference and every history kind's rows, added to `result`. Returns the
    conversation the capping control runs on: (id, messages), the scripted turns where there are any, else the
    generated ones."""
    cfg, model = st.cfg, st.model
    persona_ids = answer_ids(model, f"I am {conv.role.replace('_', ' ')}." if conv.role else "I am not an assistant.")
    if progress:
        progress(f"conversation {conv.id}: the Assistant's own replies (the identity measure's validity reference)")
    ref_rows, ref_history = reference_rows(st, conv, ci, persona_ids)
    result.reference += ref_rows
    result.reference_histories[conv.id] = assistant_turns(ref_history)
    fulls = {}
    for history_kind in cfg.histories:
        fulls[history_kind] = full = full_history(model, conv, cfg, ci, history_kind)
        if history_kind == "generated":
            result.histories[f"{conv.id}/generated"] = assistant_turns(full)
        rows, shown = history_rows(st, conv, ci, history_kind, cached_messages(full, cfg), persona_ids,
                                   len(result.rows), progress)
        result.rows += rows
        result.samples += shown
    has_script = any(m.role == "assistant" for m in conv.messages)
    return conv.id, conv.as_dicts() if has_script else fulls["generated"]
