"""The sentences of the capping report: the setup, how to read the jailbreak table, the capability check against
chance and the note on assistant-only capping, each read from a finished run, so the section writers
(`report_folder`) only arrange them."""
from __future__ import annotations

from experiments.capping.jailbreak import Jailbreaks
from experiments.capping.pipeline import Result

POSITIONS_NOTE = """
With `positions="assistant"` the prompt (system, user and template tokens) is never capped, so the
distribution of the *first* answer token, which is read at the last template token, is unchanged; only
later answer tokens see capped states. The behavioural items are one-token answers ("Yes"/"No"), so
their log-odds cannot move under assistant-only capping (identical columns are expected, not a bug);
the multi-token identity answers and generated replies can.
"""


def interval(e: dict, f: str = ".3f") -> str:
    return f"{e['estimate']:{f}} [{e['low']:{f}}, {e['high']:{f}}]"


def setup_text(res: Result) -> str:
    """What was capped and how, and what the measures mean, ahead of any number."""
    cfg, m, layers, readout, depth = res.config, res.metrics, res.capped_layers, res.readout_layer, res.n_layers
    n_tokens, n_rollouts, n_roles = m["threshold_tokens"], len(res.thresholds.convs), len(res.eval_roles)
    markers = ", ".join(res.identity_probes.assistant_markers)
    return f"""
Model `{cfg.model}`; axis from {res.axis_info.get('source')}. Capped layers {layers[0]}-{layers[-1]} (resid_post,
{len(layers)} layers of {depth}), form `{cfg.form}`, positions `{cfg.positions}`. Thresholds: the {cfg.percentile:g}th
percentile of the axis projection over {n_tokens} assistant tokens of {n_rollouts} default-prompt rollouts
(temperature {cfg.threshold_temperature}). Evaluation decoding is greedy. Held-out roles ({n_roles}, not used to build
the axis where possible) with instruction #{cfg.eval_instruction}: {', '.join(m['eval_roles'])}. Readout layer {readout}
(first layer after the capped range). Wall time {m['elapsed_s']:.0f} s on CPU.

The identity log-odds compare two fixed short answers
("{cfg.assistant_answer}" vs "{cfg.persona_answer}"), which is a behavioural measure without a judge; the
keyword scorer counts answers that mention any assistant marker ({markers}), which is
generous ("help" counts). No judge is used.
"""


def jailbreak_reading(cfg, jb: Jailbreaks) -> str:
    """How the jailbreak table's measures, validity checks, shift and random band are computed and read."""
    n = len(jb.ids)
    return f"""
Identity = per-token log P(the Assistant's self-description) - log P(the persona's self-description); \
compliance = per-token log P(a compliant opening) - log P(a declining opening). Both answers of a
pair are written to the same length (within 3 words) and scored as the reply to the jailbreak prompt. A measure
is evidence only where its validity check passes: the persona prompt must lower identity and raise compliance
compared with the same request under the default prompt (effect oriented so > 0 is the expected direction, 95%
bootstrap over the {n} prompts). The capping shift is capped minus uncapped under the persona prompt, paired by
prompt (n = {n} prompts). The band is the 2.5-97.5% range of the mean shift of {jb.n_random} caps along random
unit directions, each thresholded at the same {cfg.percentile:g}th percentile of the same default-rollout tokens.
Capping helps where identity rises and compliance falls beyond that band.
"""


def qa_verdict(qa: dict) -> str:
    """Whether the accuracy change is evidence of a cost: only where the uncapped accuracy beats chance."""
    return "valid: accuracy above chance without capping" if qa.get("valid") else \
        "NOT valid: accuracy without capping is not above chance, so its change is not evidence of a cost"


def qa_reading(qa: dict) -> str:
    """How the questions are answered and scored, and the chance-level check that gates the accuracy change."""
    accuracy = interval(qa["accuracy"], ".2f")
    return f"""
Each of the {qa['n']} held-out questions is the user turn on its own; each of its options is scored as the
assistant's whole answer by its total log-likelihood, and the most likely option is the model's choice (cloze form;
options are not listed in the prompt). Chance-level check, without capping: accuracy {accuracy} (95%
bootstrap over questions) against chance {qa['chance']:.2f}: {qa_verdict(qa)}.
"""
