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
`psm_jax.persona.kv_identity`; this package builds the histories, caches, edits and rows.

Shapes: histories are left-padded (and probes left-padded, identity answers right-padded) with masked slots to a
few bucket lengths (`bucket`), so one compiled function serves every conversation and probe of a bucket; masked
slots get no position and are never attended to, so the numbers equal the unpadded computation's.

The independent unit is a (conversation, probe) pair: samples within it share the edited cache, and the histories
of one conversation share its persona and user turns, so intervals are bootstrapped over pairs and `n` counts them.

    psm kv-editing --preset quick --out runs/kv_editing        psm kv-editing strength_kind=scale samples=8
"""
from __future__ import annotations

from experiments.kv_editing.config import (ANSWER_ROOM, ASSISTANT_ANSWER, CONVERSATION_SETS, HISTORIES, KINDS,
                                           PERSONA_SOURCE, PRESETS, PROBE_ROOM, REFERENCE_STREAM, Config, check_layers)
from experiments.kv_editing.padding import BUCKET_BASE, bucket, cache_size, left_pad, right_pad
from experiments.kv_editing.axis import estimate_axis, unit_axis
from experiments.kv_editing.histories import (cached_messages, full_history, generated_history, history_and_probe,
                                              select_conversations, token_counts)
from experiments.kv_editing.probes import answer_ids, probes_and_scorer
from experiments.kv_editing.caches import conditions, history_caches
from experiments.kv_editing.controls import capping_control, random_directions
from experiments.kv_editing.rows import history_rows, reference_rows
from experiments.kv_editing.pipeline import Result, run, run_context
from experiments.kv_editing.report_folder import write_report as report
from experiments.kv_editing.report_records import result_records as records

__all__ = ["Config", "PRESETS", "run", "Result", "report", "records", "PERSONA_SOURCE", "CONVERSATION_SETS",
           "HISTORIES", "KINDS", "PROBE_ROOM", "ANSWER_ROOM", "ASSISTANT_ANSWER", "REFERENCE_STREAM", "check_layers",
           "BUCKET_BASE", "bucket", "left_pad", "right_pad", "cache_size", "estimate_axis", "unit_axis",
           "select_conversations", "generated_history", "full_history", "cached_messages", "history_and_probe",
           "token_counts", "answer_ids", "probes_and_scorer", "conditions", "history_caches", "random_directions",
           "capping_control", "history_rows", "reference_rows", "run_context"]
