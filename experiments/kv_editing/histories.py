"""The conversations and the histories cached before a probe: the in-character assistant turns are the packaged
scripted replies or the model's own, and the role-play system prompt is cached only when the persona comes from it.
A history is tokenised so that the probe turn is a prefix split of the whole rendering, which is what lets the
probe be appended to an edited cache."""
from __future__ import annotations

import jax
import numpy as np

from experiments.kv_editing.config import Config
from psm_jax.chat import Role, encode_chat


def select_conversations(cfg: Config) -> list:
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


def generated_history(model, conv, cfg: Config, key) -> list[dict]:
    """The conversation's user turns with the model's own in-character replies: each assistant turn is sampled
    under the role-play system prompt and the history so far (so the persona persists in the model's own words).
    The system prompt is kept in the returned messages; `cached_messages` drops it when the persona comes from
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


def full_history(model, conv, cfg: Config, ci: int, history_kind: str) -> list[dict]:
    """The conversation with scripted or generated assistant turns, system prompt included."""
    return (conv.as_dicts() if history_kind == "scripted" else
            generated_history(model, conv, cfg, jax.random.fold_in(jax.random.key(cfg.seed), ci)))


def cached_messages(full: list[dict], cfg: Config) -> list[dict]:
    """The messages cached before the probe: the system prompt only when the persona comes from it."""
    return [m for m in full if m["role"] != "system" or cfg.persona_source == "system"]


def assistant_turns(messages: list[dict]) -> list[str]:
    """The assistant turns' texts, as the report shows a history."""
    return [m["content"] for m in messages if m["role"] == "assistant"]


def history_and_probe(model, history: list[dict], probe: str):
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


def token_counts(hist) -> dict:
    """Assistant and user tokens in a history: how many positions the axis edit and the user-token control edit."""
    roles = np.asarray(hist.roles)
    return dict(assistant_tokens=int(np.sum(roles == Role.ASSISTANT)), user_tokens=int(np.sum(roles == Role.USER)))
