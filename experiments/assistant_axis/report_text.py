"""The Assistant Axis report's prose, read from the numbers: what ran (setup, the adherence filter), which component
carries the Assistant against the target, the split-half diagnosis, the reading against the paper and the drift
notes. Each function returns text; `report_folder` places it."""
from __future__ import annotations

from experiments.assistant_axis.config import Config
from experiments.assistant_axis.filters import ASSISTANT_SYSTEM
from experiments.assistant_axis.result import AxisResult
from psm_jax.persona.directions import MIN_BOOTSTRAP_ROLES, SITE


def interval(intervals, k: int) -> str:
    """'[low, high]' of the k-th interval, 'n/a' where none was computed (fewer roles than components)."""
    return f"[{intervals[k][0]:.2f}, {intervals[k][1]:.2f}]" if intervals and k < len(intervals) else "n/a"


def _ci_text(ci, fmt: str) -> str:
    """' [low, high]' in `fmt`, or why there is no interval."""
    return f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else " (no interval: fewer than %d roles)" % MIN_BOOTSTRAP_ROLES


def carrier_text(label: str, c: dict) -> str:
    """The sentence naming the component that carries the Assistant for one role set, with its intervals, whether
    the target is met, and, when it is not, which number falls short."""
    head = (f"{label} ({c['n_roles']} roles): {c['pc']} carries the Assistant (the top-3 component most aligned with "
            f"the axis): |cos(axis, {c['pc']})| = {abs(c['cosine']):.2f}{_ci_text(c['abs_cosine_ci'], '.2f')}; the "
            f"default Assistant lies above {c['percentile']:.0%}{_ci_text(c['percentile_ci'], '.0%')} of the roles "
            "on it.")
    if c["target_met"]:
        return head + " Target (beyond 95% of roles, |cos| > 0.6): met."
    short = []
    if c["percentile"] <= 0.95:
        short.append(f"the default is above only {c['percentile']:.0%} of the roles on {c['pc']}, not > 95%")
    if abs(c["cosine"]) <= 0.6:
        short.append(f"|cos| = {abs(c['cosine']):.2f} <= 0.6: the axis is not aligned with any single top-3 component")
        short.append(f"along the axis itself the default lies above {c['roles_below_default_on_axis']:.0%} of the "
                     f"roles, yet the top 3 PCs hold only {c['top3_cosine']:.2f} of its length, so the Assistant "
                     "direction is not the main direction of role-to-role variance in this role set")
    other = " Another top-3 component meets both conditions." if c["any_top3_met"] else ""
    return head + " Target not met: " + "; ".join(short) + "." + other


def _adherence_text(cfg: Config, m: dict) -> str:
    """The adherence filter: off, or its score, its validity check and what it dropped (or would have)."""
    if cfg.adherence == "none":
        return "Adherence filter: off."
    v = m["adherence_validity"]
    check = (f"validity check (role responses vs default answers scored under the role's instruction, paired over "
             f"{v['n']} roles): effect {v['effect']:.3f} [{v['low']:.3f}, {v['high']:.3f}] nats/token, "
             f"{'passed' if v['valid'] else 'NOT passed'}")
    act = (f"applied: {m['adherence_dropped']} of {m['adherence_scored']} scored role responses dropped (score <= "
           f"{cfg.adherence_min:g})" if m["adherence_applied"] else
           f"not applied, since the check did not pass: no responses dropped (it would have dropped "
           f"{m['adherence_would_drop']} of {m['adherence_scored']})")
    return (f"Adherence filter (judge-free likelihood: per-token log P(response | role instruction) - log P(response | "
            f"'{ASSISTANT_SYSTEM}'); mean {m['adherence_mean_score']:.3f}): {check}; {act}.")


def _judge_text(cfg: Config, m: dict) -> str:
    """The judge filter's rule, its validity check and what it dropped (or would have)."""
    v = m["judge_validity"]
    check = (f"validity check (role responses vs default answers, each under the role's rubric, paired over {v['n']} "
             f"roles): effect {v['effect']:.2f} [{v['low']:.2f}, {v['high']:.2f}] rubric points, "
             f"{'passed' if v['valid'] else 'NOT passed'}")
    act = (f"applied: {m['judge_dropped']} role responses dropped" if m["judge_applied"] else
           f"not applied, since the check did not pass (it would have dropped {m['judge_would_drop']})")
    return (f"(keeps score >= {cfg.judge_min_score} of 3; {m['judge_scored']} role responses scored; {check}; "
            f"{act})")


def setup_text(res: AxisResult) -> str:
    """What ran: model, roles, questions, sampling, the vectors' definition, filtering, against the paper's sizes."""
    cfg, m, target, L = res.config, res.metrics, res.target_layer, res.metrics["n_layers"]
    samples = f"{cfg.default_samples} sample(s) ({m['n_default_responses']} responses)"
    judge = "(off: every non-empty response counts)" if cfg.judge == "none" else _judge_text(cfg, m)
    return f"""
Model `{cfg.model}` ({L} layers, d_model {res.d_model}); site `{SITE}` (block output), every layer.
{m["n_roles"]} roles (stratified over categories, seed {cfg.seed}) x {cfg.instructions_per_role} system
instruction(s) x {res.n_questions} extraction questions; default vector from {res.n_default_prompts} default prompts x
the same questions x {samples}. Sampling: temperature {cfg.temperature}, top_p
{cfg.top_p}, {cfg.max_new_tokens} new tokens (mean {m['mean_response_tokens']:.1f} assistant tokens per response;
{m['finished_fraction']:.0%} ended with EOS). Role vector = mean over the role's responses of the mean
activation over assistant content tokens; axis = default - mean(role vectors). Target layer {target}
(middle). Judge filtering: {cfg.judge} {judge}.
Dropped roles: {m['dropped_roles'] or 'none'}. Wall time {m['elapsed_s']:.0f} s on CPU.
{_adherence_text(cfg, m)}

Sample size against the paper's (275 roles x 5 instructions x 240 questions, 512 tokens, judge-filtered):
{m["n_roles"]} roles x {cfg.instructions_per_role} x {res.n_questions}, {cfg.max_new_tokens} tokens.
"""


def _role_set_label(cfg: Config) -> str:
    """How the report names the run's whole role set."""
    return "All roles" if not cfg.role_categories else f"All roles of {', '.join(cfg.role_categories)}"


def component_text(res: AxisResult) -> str:
    """The carrying component of the whole role set and of the human archetypes (or why they have none of their
    own), against the target."""
    cfg, m, space = res.config, res.metrics, res.space
    n_human = len(m.get("human_roles", []))
    human_txt = (carrier_text("Human archetypes (" + ", ".join(cfg.human_categories) + "; own axis and PCA)",
                              m["carrier_human"]) if "carrier_human" in m else
                 "Human archetypes: every kept role is one, so the line above is theirs." if n_human == m["n_roles"]
                 else f"Human archetypes: fewer than 3 kept roles in {', '.join(cfg.human_categories)}; not analysed.")
    no_ci = ("" if m.get("default_percentile_ci_by_pc") else
             f"No bootstrap intervals for the whole set: fewer than {MIN_BOOTSTRAP_ROLES} roles.")
    return f"""
|axis| in the span of the top 3 PCs: {space['top3_cosine']:.3f} of its length.

- {carrier_text(_role_set_label(cfg), m["carrier_all"])}
- {human_txt}
{no_ci}"""


def split_half_text(sh: dict, target: int) -> str:
    """The split-half reliability of the role vectors and each half's carrier."""
    halves = "; ".join(f"half {i + 1}: {h['pc']}, above {h['percentile']:.0%} of roles, |cos| "
                       f"{abs(h['cosine']):.2f}" for i, h in enumerate(sh["halves"]))
    return f"""
Role vectors rebuilt from the even-indexed and from the odd-indexed questions ({sh['n_roles']} roles, layer
{target}): the two halves' mean-centred role vectors correlate at r = {sh['half_correlation']:.2f}, a split-half
reliability (Spearman-Brown) of {sh['reliability']:.2f} for the full question set; the rest of the role-to-role
spread is sampling noise, which spreads the roles along every component and pulls the default Assistant toward
the middle of them. With half the responses per role the carrier is: {halves}.
"""


def _assistant_check(m: dict) -> str:
    """The 'assistant' role's projection on the unit axis against the default and the mean role vector, when it
    was sampled (it is not in the role mean, so it checks the axis on a held-out point)."""
    if "assistant_role_axis_projection" not in m:
        return ""
    return (f" Held-out check: the 'assistant' role (not in the role mean) projects at "
            f"{m['assistant_role_axis_projection']:.2f} on the unit axis, against "
            f"{m['default_axis_projection']:.2f} for "
            f"the default vector and {m['mean_role_axis_projection']:.2f} for the mean role vector.")


def reading_text(res: AxisResult) -> str:
    """The result against the paper's: PCs for the variance fraction, the axis-PC1 cosine, where the default
    Assistant sits on PC1 and on the axis, and the held-out 'assistant' role's projection."""
    cfg, m, space, target = res.config, res.metrics, res.space, res.target_layer
    largest = f"{m['axis_pc1_cosine_max']:.3f} at layer {m['axis_pc1_cosine_argmax_layer']}"
    default = ("beyond every role" if space["default_beyond_all_roles"] else
               f"above {space['default_fraction_roles_below']:.0%} of the roles")
    return f"""
Paper (Gemma 2 27B / Qwen 3 32B / Llama 3.3 70B): 4 / 8 / 19 PCs for 70% of the variance, axis-PC1 cosine
> 0.71, the Assistant at one extreme of PC1. Here: {space['n_pcs']} PCs for {cfg.variance_fraction:.0%} with
{m["n_roles"]} roles (at most {m["n_roles"] - 1} non-trivial PCs), |cos(axis, PC1)| = {space['axis_pc1_cosine']:.3f}
at layer {target} (largest over layers: {largest}); the default Assistant's PC1 score is {default}.
On the axis itself, {m['roles_below_default_on_axis']:.0%} of the role vectors project below the default
vector (true by construction on average, informative per role).{_assistant_check(m)}
"""


def drift_notes(cfg: Config) -> str:
    """What the drift curves measure (teacher-forced text on the model's own axis) and the paper's finding to
    compare them with."""
    return f"""
All conversations are teacher-forced: the assistant text is ShareGPT's (ChatGPT) or the scripted role-play
and neutral replies, not `{cfg.model}`'s own generations, so the curves measure where the model places that text
on its own axis turn by turn. The paper's finding to compare with: therapy-like and philosophical conversations
drift away from the Assistant over turns while coding/writing conversations stay put; role-play text should
sit below neutral text.
"""
