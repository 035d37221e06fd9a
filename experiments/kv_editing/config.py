"""The KV-editing study's knobs: `Config` (checked when built, so a bad value fails before any model loads) and
`PRESETS`, the tables the report takes its wording from, and the fixed room a cache keeps for a probe turn and a
scored answer."""
from __future__ import annotations

import dataclasses

from psm_jax.persona import DEFAULT_MODEL
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


def check_layers(cfg: Config, config) -> None:
    """Fail before any model work when a layer range or the readout layer does not fit the model."""
    for lo, hi in cfg.layer_ranges:
        if not 0 <= lo < hi <= config.n_layers:
            raise ValueError(f"layer range ({lo}, {hi}) is invalid; expected 0 <= start < end <= {config.n_layers}")
    config.check_layer(cfg.readout_layer, "readout_layer")
