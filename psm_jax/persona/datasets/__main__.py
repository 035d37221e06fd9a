"""``python -m psm_jax.persona.datasets``: load every shipped file through its loader (so each passes its schema
checks) and print its counts."""
from __future__ import annotations

from psm_jax.persona.datasets import (CONVERSATION_KINDS, list_traits, load_conversations, load_default_prompts,
                                      load_identity_probes, load_persona_jailbreaks, load_qa, load_refusal,
                                      load_refusal_markers, load_role_questions, load_roles, load_trait)


def _summary() -> str:
    lines = []
    for t in list_traits():
        tr = load_trait(t)
        n1 = sum(i.trait_choice for i in tr.behavioural_items)
        lines.append(f"trait {t}: {len(tr.instruction_pairs)} pairs, {len(tr.extraction_questions)}+"
                     f"{len(tr.evaluation_questions)} questions, {len(tr.behavioural_items)} items "
                     f"({len(tr.behavioural_items) - n1} at 0 / {n1} at 1)")
    roles = load_roles()
    lines.append(f"roles: {len(roles)} in {len(roles.categories)} categories {roles.categories}")
    lines.append(f"default prompts: {load_default_prompts('MODEL')}")
    lines.append(f"role questions: {len(load_role_questions())}")
    lines.append(f"identity probes: {len(load_identity_probes().questions)}")
    for s in ("train", "val"):
        rs = load_refusal(s)
        lines.append(f"refusal {s}: {len(rs.harmful)} harmful, {len(rs.harmless)} harmless")
    lines.append(f"refusal markers: {len(load_refusal_markers().refusal_prefixes)} prefixes")
    for k in CONVERSATION_KINDS:
        lines.append(f"conversations {k}: {len(load_conversations(k))}")
    lines.append(f"persona jailbreaks: {len(load_persona_jailbreaks())}")
    lines.append(f"capability QA: {len(load_qa())}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(_summary())
