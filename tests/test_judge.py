"""Judges: score math on synthetic logits, the local judge against a brute-force forward, the remote
judge's configuration errors and reply parsing (no network)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from psm_jax.persona import judge as J


def _logsoftmax(x):
    x = np.asarray(x, np.float64)
    return x - (np.log(np.exp(x - x.max()).sum()) + x.max())


def test_weighted_score_and_mass_threshold():
    p = np.zeros(101)
    p[30], p[80] = 0.5, 0.3
    assert J.weighted_score(p) == pytest.approx((30 * 0.5 + 80 * 0.3) / 0.8)
    p2 = np.zeros(101)
    p2[90] = 0.2  # mass 0.2 < 0.25
    assert J.weighted_score(p2) is None
    p2[10] = 0.06  # mass 0.26
    assert J.weighted_score(p2) == pytest.approx((90 * 0.2 + 10 * 0.06) / 0.26)
    assert J.weighted_score(p2, min_mass=0.3) is None
    with pytest.raises(ValueError, match="non-negative"):
        J.weighted_score([0.5, -0.2])


def _full(trie, logp_vocab):
    """Restrict a full-vocabulary log-distribution to the trie's ids."""
    return np.asarray(logp_vocab)[trie.ids]


def test_single_token_numbers_from_synthetic_logits():
    """Numbers that are single tokens (ids n + 10): the score is the probability-weighted mean of the
    next-token distribution over number tokens; None below 0.25 mass."""
    trie = J.NumberTrie([[n + 10] for n in range(101)], continuation_ids=[n + 10 for n in range(101)])
    assert trie.K == 1 and len(trie.nodes_at(1)) == 101
    V = 120
    probs = np.full(V, 0.2 / (V - 2))
    probs[10 + 30], probs[10 + 80] = 0.5, 0.3
    first = np.log(probs / probs.sum())
    after = np.full(V, 0.0)
    after[10:111] = -1e9  # after a number, nothing continues it
    after = after - np.log(np.exp(after).sum())
    dist = lambda prefix: _full(trie, first if prefix == () else after)  # noqa: E731
    p = trie.number_probs(dist)
    expected_mass = 0.5 + 0.3 + 99 * 0.2 / (V - 2)
    assert p.sum() == pytest.approx(expected_mass)
    exp_score = (30 * 0.5 + 80 * 0.3 + 0.2 / (V - 2) * (sum(range(101)) - 30 - 80)) / expected_mass
    assert J.weighted_score(p) == pytest.approx(exp_score)
    # mostly non-number tokens -> None
    probs = np.full(400, 1.0)  # 299 non-number tokens of weight 1, numbers 0.1 each, "50" weight 20
    probs[10:111] = 0.1
    probs[10 + 50] = 20.0
    first2 = np.log(probs / probs.sum())
    after2 = np.zeros(400)
    after2[10:111] = -1e9
    after2 -= np.log(np.exp(after2).sum())
    p = trie.number_probs(lambda prefix: _full(trie, first2 if prefix == () else after2))
    assert p.sum() == pytest.approx(30 / 329) and J.weighted_score(p) is None
    assert J.weighted_score(p, min_mass=0.05) == pytest.approx((50 * 20 + 0.1 * (5050 - 50)) / 30)
    # a number that tends to continue (e.g. "3" -> "30...") loses that mass
    half = np.full(V, -1e9)
    half[10 + 7], half[0] = math.log(0.5), math.log(0.5)
    only30 = np.full(V, -1e9)
    only30[10 + 30] = 0.0
    p = trie.number_probs(lambda prefix: _full(trie, only30 if prefix == () else half))
    assert p[30] == pytest.approx(0.5, rel=1e-6)
    # a prefix not computed (None) gives probability 0
    p = trie.number_probs(lambda prefix: _full(trie, only30) if prefix == () else None)
    assert p.sum() == 0


def test_digit_trie_matches_brute_force_on_synthetic_model():
    """Digits are separate tokens (ids 0-9; 10 = end, 11 = other): P(n) = prod of step probabilities times
    the probability that no further digit follows; checked against a direct walk."""
    rng = np.random.default_rng(0)
    V = 12
    logits = {}

    def dist(prefix):
        if prefix not in logits:
            logits[prefix] = rng.normal(0, 2, V)
        return _logsoftmax(logits[prefix])

    seqs = [[int(c) for c in str(n)] for n in range(101)]
    trie = J.NumberTrie(seqs, continuation_ids=range(10))
    assert trie.K == 3 and [len(trie.nodes_at(d)) for d in (1, 2, 3)] == [10, 90, 1]
    assert trie.has_children((1,)) and trie.has_children((1, 0)) and not trie.has_children((0,))
    p = trie.number_probs(lambda prefix: _full(trie, dist(prefix)))
    for n in range(101):
        s = tuple(seqs[n])
        lp = sum(dist(s[:j])[s[j]] for j in range(len(s)))
        expected = math.exp(lp) * (1 - np.exp(dist(s)[:10]).sum())
        assert p[n] == pytest.approx(expected, rel=1e-9, abs=1e-300), n
    # a pruned prefix removes exactly the numbers below it
    p2 = trie.number_probs(lambda prefix: None if prefix[:1] == (4,) else _full(trie, dist(prefix)))
    assert p2[4] == 0 and np.all(p2[40:50] == 0)
    keep = [n for n in range(101) if not str(n).startswith("4")]
    np.testing.assert_allclose(p2[keep], p[keep])


def test_scores_from_top_logprobs_and_parsing():
    top = [("80", math.log(0.5)), (" 80", math.log(0.1)), ("20", math.log(0.2)), ("Hello", math.log(0.2)),
           ("007", math.log(0.01)), ("101", math.log(0.01))]
    assert J.scores_from_top_logprobs(top) == pytest.approx((80 * 0.6 + 20 * 0.2) / 0.8)
    assert J.scores_from_top_logprobs([("Hi", 0.0), ("5", math.log(0.1))]) is None
    assert J.parse_rubric_score("Score: 2.", 3) == 2
    assert J.parse_rubric_score("I'd say 7", 3) is None
    assert J.parse_rubric_score("no idea", 3) is None
    with pytest.raises(ValueError, match="question"):
        J.render_rubric("Rate {answer}", "q", "a")
    assert J.render_rubric("Q: {question} A: {answer}", "why?", "because {x}") == "Q: why? A: because {x}"


def test_openai_judge_configuration_and_reply(monkeypatch):
    for var in ("PSM_JUDGE_BASE_URL", "OPENAI_BASE_URL", "PSM_JUDGE_MODEL", "PSM_JUDGE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(J.JudgeConfigError, match="base_url.*model"):
        J.OpenAICompatibleJudge()
    with pytest.raises(ValueError, match="PSM_JUDGE_MODEL"):
        J.OpenAICompatibleJudge(base_url="http://localhost:1")
    with pytest.raises(ValueError, match="not configured"):
        J.make_judge("openai")

    sent = []

    def transport(url, headers, payload):
        sent.append((url, headers, payload))
        if payload.get("logprobs"):
            top = [{"token": "90", "logprob": math.log(0.6)}, {"token": "10", "logprob": math.log(0.2)},
                   {"token": "The", "logprob": math.log(0.2)}]
            return {"choices": [{"logprobs": {"content": [{"token": "90", "top_logprobs": top}]}}]}
        return {"choices": [{"message": {"content": "2"}}]}

    monkeypatch.setenv("PSM_JUDGE_BASE_URL", "http://judge.invalid/v1/")
    monkeypatch.setenv("PSM_JUDGE_MODEL", "judge-model")
    judge = J.OpenAICompatibleJudge(api_key="k", rubric="Q {question} A {answer}", transport=transport)
    assert isinstance(judge, J.Judge)
    assert judge.score("q", "a") == pytest.approx((90 * 0.6 + 10 * 0.2) / 0.8)
    url, headers, payload = sent[-1]
    assert url == "http://judge.invalid/v1/chat/completions" and headers["Authorization"] == "Bearer k"
    assert payload["model"] == "judge-model" and payload["messages"][0]["content"] == "Q q A a"
    assert payload["top_logprobs"] == 20 and payload["max_tokens"] == 1
    assert judge.rubric_score("q", "a", max_score=3) == 2
    assert judge.rubric_score_many([("q", "a"), ("q2", "a2")], max_score=1) == [None, None]
    bad = J.OpenAICompatibleJudge(transport=lambda *a: {"choices": []}, rubric="{question}{answer}")
    with pytest.raises(ValueError, match="top logprobs"):
        bad.score("q", "a")


def test_local_judge_matches_full_forward(tmp_path):
    """LocalJudge's cached trie computation equals a plain forward over prompt + digits."""
    import jax

    from psm_jax.persona.rollouts import encode_batch
    from psm_jax.model import jit_forward
    from tests.test_persona_vectors import tiny_chat_model

    model = tiny_chat_model()
    judge = J.LocalJudge(model, rubric="Rate {question} / {answer}. Number:", batch_size=2, prune_below=0.0)
    assert isinstance(judge, J.Judge)
    pairs = [("Is it good?", "Yes it is."), ("Why?", "Because the sky is blue and the grass is green.")]
    prompts = [J.render_rubric(judge.rubric, q, a) for q, a in pairs]
    probs = judge.number_probs(prompts)
    assert probs.shape == (2, 101) and np.all(probs >= 0)
    digits = np.asarray(J.number_token_ids(model.tokenizer))
    assert len(digits) == 10
    for i, prompt in enumerate(prompts):
        _, batch = encode_batch(model, [[{"role": "user", "content": prompt}]], add_generation_prompt=True, multiple_of=1)
        base = np.asarray(batch.tokens[0])
        for n in (0, 7, 42, 100):
            seq = model.tokenizer.encode(str(n), add_special_tokens=False)
            toks = np.concatenate([base, seq])[None]
            logp = np.asarray(jax.nn.log_softmax(jit_forward(model.params, model.config, toks).logits[0], -1), np.float64)
            T = len(base)
            lp = sum(logp[T - 1 + j, seq[j]] for j in range(len(seq)))
            expected = math.exp(lp) * (1 - np.exp(logp[T - 1 + len(seq), digits]).sum())
            assert probs[i, n] == pytest.approx(expected, rel=2e-3), (i, n)
    # an answer prefix is appended after the generation prompt
    pj = J.LocalJudge(model, rubric=judge.rubric, batch_size=2, prune_below=0.0, answer_prefix="Score: ")
    pre = model.tokenizer.encode("Score: ", add_special_tokens=False)
    p7 = pj.number_probs(prompts[:1])[0, 7]
    _, batch = encode_batch(model, [[{"role": "user", "content": prompts[0]}]], add_generation_prompt=True, multiple_of=1)
    toks = np.concatenate([np.asarray(batch.tokens[0]), pre, model.tokenizer.encode("7", add_special_tokens=False)])
    logp = np.asarray(jax.nn.log_softmax(jit_forward(model.params, model.config, toks[None]).logits[0], -1), np.float64)
    assert p7 == pytest.approx(math.exp(logp[-2, toks[-1]]) * (1 - np.exp(logp[-1, digits]).sum()), rel=2e-3)

    scores = judge.score_many(pairs)
    assert scores == [J.weighted_score(p) for p in probs]  # a random tiny model puts ~no mass on numbers
    assert judge.score(*pairs[0]) == scores[0]
    # pruning drops only first digits below the threshold
    pruned = J.LocalJudge(model, rubric=judge.rubric, batch_size=2, prune_below=0.05).number_probs(prompts)
    assert np.all(pruned <= probs + 1e-12)
    with pytest.raises(ValueError, match="no rubric"):
        J.LocalJudge(model).score("q", "a")
    r = judge.rubric_score_many(pairs, max_score=3)
    assert all(x is None or 0 <= x <= 3 for x in r)
