"""Chat encoding: role and turn masks from the chat template, padding, ShareGPT conversion."""
from __future__ import annotations

import numpy as np
import pytest

try:  # the lead's conftest imports these too; the loads are memoised, so this costs nothing
    from fixtures_assets import smollm2_tokenizer  # noqa: F401
except ImportError:
    from tests.fixtures_assets import smollm2_tokenizer  # noqa: F401

from psm_jax.chat import (
    TURN_AFTER,
    TURN_DEFAULT_SYSTEM,
    TURN_PAD,
    ChatEncoding,
    ChatTemplateError,
    Role,
    encode_chat,
    messages_from_sharegpt,
    pad_batch,
    post_instruction_positions,
    prompt_length,
)

SYS = {"role": "system", "content": "You are a pirate."}
U1 = {"role": "user", "content": "What is the capital of France?"}
A1 = {"role": "assistant", "content": "Arr, Paris it be.\nA fine port."}
U2 = {"role": "user", "content": "  And of Spain?  "}
A2 = {"role": "assistant", "content": "Madrid, matey!"}
ROLE = {"system": Role.SYSTEM, "user": Role.USER, "assistant": Role.ASSISTANT}


def _decode(tok, enc: ChatEncoding, mask) -> str:
    return tok.decode(enc.tokens[mask].tolist())


def _check(tok, enc: ChatEncoding, messages):
    """Content tokens of each message decode to its content; all else is template."""
    assert enc.tokens.dtype == np.int32 and enc.roles.dtype == np.int8 and enc.turns.dtype == np.int32
    assert enc.tokens.shape == enc.roles.shape == enc.turns.shape
    for k, m in enumerate(messages):
        mask = (enc.turns == k) & (enc.roles != Role.TEMPLATE)
        assert set(enc.roles[mask].tolist()) <= {int(ROLE[m["role"]])}
        assert _decode(tok, enc, mask).strip() == m["content"].strip(), k
        assert enc.text[slice(*enc.spans[k])].strip() == m["content"].strip()
    # every content token belongs to some message (or to the template's own system prompt)
    content = enc.roles != Role.TEMPLATE
    assert np.all((enc.turns[content] >= 0) | (enc.turns[content] == TURN_DEFAULT_SYSTEM))
    # special tokens are never content
    specials = set(tok.all_special_ids) | {tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")}
    assert not np.any(np.isin(enc.tokens[content], list(specials)))
    # turns only move forward (the template's default system prompt comes first)
    t = enc.turns[enc.turns != TURN_AFTER]
    t = np.where(t == TURN_DEFAULT_SYSTEM, -1, t)
    assert np.all(np.diff(t) >= 0)


def test_tokens_are_what_the_model_sees(smollm2_tokenizer):
    tok = smollm2_tokenizer
    for msgs, agp in (([U1], True), ([SYS, U1, A1, U2, A2], False), ([U1, A1, U2], True)):
        enc = encode_chat(tok, msgs, add_generation_prompt=agp)
        ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=agp)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert enc.tokens.tolist() == list(ids)
        assert enc.text == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp)


def test_one_turn_without_system_prompt(smollm2_tokenizer):
    tok = smollm2_tokenizer
    enc = encode_chat(tok, [U1, A1])
    _check(tok, enc, [U1, A1])
    # SmolLM2's template inserts its own system prompt: SYSTEM content on turn -2
    assert enc.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    sys_mask = (enc.turns == TURN_DEFAULT_SYSTEM) & (enc.roles == Role.SYSTEM)
    assert _decode(tok, enc, sys_mask) == enc.default_system
    assert np.all(enc.roles[enc.turns == TURN_DEFAULT_SYSTEM] != Role.USER)
    assert _decode(tok, enc, (enc.turns == TURN_DEFAULT_SYSTEM) & (enc.roles == Role.TEMPLATE)) == (
        "<|im_start|>system\n<|im_end|>\n")
    # the scaffolding of each turn is template, and belongs to that turn
    assert _decode(tok, enc, (enc.turns == 1) & (enc.roles == Role.TEMPLATE)) == "<|im_start|>assistant\n<|im_end|>\n"
    assert _decode(tok, enc, (enc.turns == 0) & (enc.roles == Role.TEMPLATE)) == "<|im_start|>user\n<|im_end|>\n"
    assert not np.any(enc.turns == TURN_AFTER)


def test_multi_turn_with_system_prompt(smollm2_tokenizer):
    tok = smollm2_tokenizer
    msgs = [SYS, U1, A1, U2, A2]
    enc = encode_chat(tok, msgs)
    _check(tok, enc, msgs)
    assert enc.default_system is None and not np.any(enc.turns == TURN_DEFAULT_SYSTEM)
    assert sorted(set(enc.turns.tolist())) == [0, 1, 2, 3, 4]
    assert _decode(tok, enc, enc.roles == Role.ASSISTANT).replace("\n", "") == (A1["content"] + A2["content"]).replace("\n", "")
    # leading/trailing spaces of U2 are kept (SmolLM2 does not trim) and tokenized as content
    assert _decode(tok, enc, (enc.roles == Role.USER) & (enc.turns == 3)).strip("\n") == U2["content"]


def test_generation_prompt_and_positions(smollm2_tokenizer):
    tok = smollm2_tokenizer
    enc = encode_chat(tok, [U1, A1, U2], add_generation_prompt=True)
    _check(tok, enc, [U1, A1, U2])
    after = enc.turns == TURN_AFTER
    assert _decode(tok, enc, after) == "<|im_start|>assistant\n" and np.all(enc.roles[after] == Role.TEMPLATE)
    assert after[-1] and np.all(np.diff(after.astype(int)) >= 0)  # a suffix
    pos = post_instruction_positions(enc)
    assert pos[-1] == len(enc) - 1
    assert tok.decode(enc.tokens[pos].tolist()) == "<|im_end|>\n<|im_start|>assistant\n"
    assert prompt_length(enc) == len(enc)

    full = encode_chat(tok, [U1, A1, U2, A2])
    n = prompt_length(full)
    assert tok.decode(full.tokens[n:].tolist()) == A2["content"] + "<|im_end|>\n"
    assert full.tokens[:n].tolist() == enc.tokens.tolist()  # the prompt is the generation-prompt encoding
    assert tok.decode(full.tokens[post_instruction_positions(full)].tolist()) == "<|im_end|>\n<|im_start|>assistant\n"


def test_trimming_template_with_bos_and_no_system_role(smollm2_tokenizer):
    """A Gemma-style template: BOS text, trimmed content, 'model' role name, rejects system."""
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<|im_start|>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>model\n{% endif %}"
    )
    tok = smollm2_tokenizer
    msgs = [U1, A1, U2]
    enc = encode_chat(tok, msgs, add_generation_prompt=True, chat_template=template)
    _check(tok, enc, msgs)
    assert enc.default_system is None
    assert enc.text[slice(*enc.spans[2])] == U2["content"].strip()
    assert enc.turns[0] == 0 and enc.roles[0] == Role.TEMPLATE  # the BOS text opens the first block


def test_template_whose_prefixes_are_not_prefixes(smollm2_tokenizer):
    """Qwen3-style: the last assistant message renders with an empty think block, earlier ones without."""
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = smollm2_tokenizer
    msgs = [U1, A1, U2, A2]
    enc = encode_chat(tok, msgs, chat_template=template)
    _check(tok, enc, msgs)
    assert _decode(tok, enc, (enc.turns == 1) & (enc.roles == Role.TEMPLATE)) == "<|im_start|>assistant\n<|im_end|>\n"
    assert "<think>" in _decode(tok, enc, (enc.turns == 3) & (enc.roles == Role.TEMPLATE))


def test_errors(smollm2_tokenizer):
    tok = smollm2_tokenizer

    class NoTemplate:
        chat_template = None

    with pytest.raises(ChatTemplateError, match="no chat template"):
        encode_chat(NoTemplate(), [U1])
    upper = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}<|im_end|>\n{% endfor %}"
    with pytest.raises(ChatTemplateError, match="message 0"):
        encode_chat(tok, [U1], chat_template=upper)
    twice = "{% for m in messages %}{{ m['content'] }}|{{ m['content'] }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="2 times"):
        encode_chat(tok, [U1], chat_template=twice)
    with pytest.raises(ValueError, match="role 'tool'"):
        encode_chat(tok, [U1, {"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="no user content"):
        post_instruction_positions(encode_chat(tok, [SYS]))
    assert issubclass(ChatTemplateError, ValueError)


def test_empty_assistant_message(smollm2_tokenizer):
    tok = smollm2_tokenizer
    enc = encode_chat(tok, [U1, {"role": "assistant", "content": ""}])
    assert not np.any(enc.roles == Role.ASSISTANT)
    assert enc.spans[1][0] == enc.spans[1][1]
    assert prompt_length(enc) == len(enc)


def _enc(tokens, roles, turns):
    n = len(tokens)
    return ChatEncoding(np.asarray(tokens, np.int32), np.asarray(roles, np.int8), np.asarray(turns, np.int32),
                        "", np.zeros((n, 2), np.int32), ())


def test_pad_batch():
    a = _enc([5, 6, 7], [0, 2, 0], [0, 0, 0])
    b = _enc([8], [3], [1])
    left = pad_batch([a, b], pad_id=2)
    assert left.tokens.dtype == np.int32 and left.attention_mask.dtype == bool
    np.testing.assert_array_equal(left.tokens, [[5, 6, 7], [2, 2, 8]])
    np.testing.assert_array_equal(left.attention_mask, [[1, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(left.roles, [[0, 2, 0], [-1, -1, 3]])
    np.testing.assert_array_equal(left.turns, [[0, 0, 0], [TURN_PAD, TURN_PAD, 1]])
    right = pad_batch([a, b], pad_id=0, side="right", multiple_of=4)
    np.testing.assert_array_equal(right.tokens, [[5, 6, 7, 0], [8, 0, 0, 0]])
    np.testing.assert_array_equal(right.attention_mask, [[1, 1, 1, 0], [1, 0, 0, 0]])
    assert pad_batch([a], 0, length=5).tokens.shape == (1, 5)
    with pytest.raises(ValueError, match="shorter"):
        pad_batch([a], 0, length=2)
    with pytest.raises(ValueError, match="side"):
        pad_batch([a], 0, side="middle")


def test_pad_batch_of_real_encodings(smollm2_tokenizer):
    tok = smollm2_tokenizer
    encs = [encode_chat(tok, [U1], add_generation_prompt=True), encode_chat(tok, [SYS, U1, A1])]
    batch = pad_batch(encs, pad_id=tok.pad_token_id)
    T = max(len(e) for e in encs)
    assert batch.tokens.shape == (2, T)
    for row, e in zip(range(2), encs):
        np.testing.assert_array_equal(batch.tokens[row, T - len(e):], e.tokens)
        assert batch.attention_mask[row].sum() == len(e)
    assert batch.attention_mask[:, -1].all()  # left padding: last token is real


def test_messages_from_sharegpt():
    rec = {"id": "x", "conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "bing", "value": "?"},
        {"from": "gpt", "value": "A"}, {"from": "human", "value": None},
    ]}
    assert messages_from_sharegpt(rec) == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    assert messages_from_sharegpt(rec["conversations"][1:2]) == [{"role": "user", "content": "Q"}]
    assert messages_from_sharegpt({"id": "empty"}) == []
