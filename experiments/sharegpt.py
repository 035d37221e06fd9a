"""ShareGPT conversations for studies (drift curves, perplexity on held-out assistant tokens)."""
from __future__ import annotations


def sharegpt_conversations(n: int, seed: int, max_messages: int, max_chars: int, min_assistant_turns: int = 2):
    """`n` seeded ShareGPT conversations with >= `min_assistant_turns` assistant turns (after truncation)."""
    from sae.data.corpus import load_sharegpt

    corpus = load_sharegpt(shuffle=True, seed=seed, take=max(8 * n, 50), max_turns=max_messages, max_chars=max_chars)
    out = []
    for doc in corpus.documents:
        if isinstance(doc, list) and sum(m["role"] == "assistant" for m in doc) >= min_assistant_turns:
            out.append([{"role": m["role"], "content": m["content"]} for m in doc])
        if len(out) == n:
            break
    if len(out) < n:
        raise ValueError(f"only {len(out)} ShareGPT conversations with >= {min_assistant_turns} assistant turns "
                         f"among {len(corpus)} sampled; expected {n}")
    return out


def sharegpt_requests(n: int, seed: int, skip: int, min_chars: int = 20, max_chars: int = 300,
                      min_ascii: float = 0.95) -> list[str]:
    """`n` opening user messages of ShareGPT conversations from the seeded shuffle, past its first `skip` documents
    (where `sharegpt_conversations` draws the studies' held-out chats at the same seed), of `min_chars` to
    `max_chars` characters and mostly ASCII: ordinary requests, used as harmless training prompts."""
    from sae.data.corpus import load_sharegpt

    corpus = load_sharegpt(shuffle=True, seed=seed, take=f"{skip}:{skip + max(8 * n, 64)}", max_turns=1)
    out = []
    for doc in corpus.documents:
        text = doc[0]["content"] if isinstance(doc, list) and doc and doc[0]["role"] == "user" else ""
        if min_chars <= len(text) <= max_chars and sum(ch.isascii() for ch in text) >= min_ascii * len(text):
            out.append(text)
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} ShareGPT opening requests of {min_chars}-{max_chars} characters in documents "
                     f"{skip}:{skip + max(8 * n, 64)} of seed {seed}'s shuffle; expected {n}")
