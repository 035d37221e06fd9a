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
