"""`measures.chat_fluency_cost`: an edit's cost on held-out chats, checked against per-answer log-likelihoods scored
one conversation at a time (`score_answers`), with the interval's units being the conversations; and the validity
check of a measure read under many system prompts (`prompt_validity`, `is_valid`), against hand-made unit means."""
import numpy as np
import pytest

from psm_jax import edits as E
from psm_jax.persona import measures
from psm_jax.persona.rollouts import score_answers

CONVS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris is the capital of France."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
     {"role": "assistant", "content": "Green, and sometimes red."}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there, how are you today?"}],
]


def _by_hand(model, conversations, edits_fn=None):
    """Token-weighted CE over every assistant turn, each turn scored as an answer to the messages before it."""
    nll, count = 0.0, 0
    for conv in conversations:
        for i, msg in enumerate(conv):
            if msg["role"] != "assistant":
                continue
            lp = score_answers(model, [conv[:i]], [msg["content"]], batch_size=1, edits_fn=edits_fn)
            nll -= float(lp[0])
            count += int(measures.rollouts.answer_token_counts(model, [conv[:i]], [msg["content"]])[0])
    return nll / count


def test_chat_fluency_cost_matches_per_answer_scores_and_has_an_interval(tiny_chat_model):
    m = tiny_chat_model
    vector = np.random.default_rng(0).normal(size=m.config.d_model) * 3.0
    edit = (E.add(m.config, vector, layers=[1], site="resid_pre"),)

    def edits_fn(batch):
        return edit

    cost = measures.chat_fluency_cost(m, CONVS, edits_fn, batch_size=2, seed=3)
    base, edited = _by_hand(m, CONVS), _by_hand(m, CONVS, edits_fn)
    assert cost["n_conversations"] == 3 and cost["tokens"] > 10
    np.testing.assert_allclose([cost["ce"], cost["ce_edited"]], [base, edited], rtol=2e-4)
    assert cost["ce_pct_change"] == pytest.approx(100 * (edited / base - 1), abs=0.05)
    assert cost["ppl_pct_change"] == pytest.approx(100 * (np.exp(edited - base) - 1), abs=0.05)
    for name in ("ce_pct_change", "ppl_pct_change"):
        low, high = cost[f"{name}_ci"]
        assert low <= cost[name] <= high and low < high
    assert cost == measures.chat_fluency_cost(m, CONVS, edits_fn, batch_size=2, seed=3)  # seeded


def test_chat_fluency_cost_of_no_edit_is_zero_and_bad_input_is_named(tiny_chat_model):
    m = tiny_chat_model
    cost = measures.chat_fluency_cost(m, CONVS[:1], lambda batch: (), batch_size=1)
    assert cost["ce"] == cost["ce_edited"] and cost["ce_pct_change"] == 0.0
    assert "ce_pct_change_ci" not in cost  # one conversation: no interval
    with pytest.raises(ValueError, match="no conversations"):
        measures.chat_fluency_cost(m, [], lambda batch: ())


def test_prompt_validity_averages_each_unit_over_the_prompts_that_scored_it():
    """Per unit: the mean over the "pos" prompts that scored it minus the mean over the "neg" ones (NaN: not scored;
    other kinds left out), then the paired check over the units that have both; None when no unit has both."""
    kinds = np.array(["pos", "pos", "neg", "neg", "other"])
    per_unit = np.array([[1.0, 2.0, np.nan, 5.0], [1.2, np.nan, 3.0, np.nan], [0.0, 0.5, 1.0, np.nan],
                         [0.2, 0.7, np.nan, np.nan], [9.0, -9.0, 9.0, 9.0]])
    v = measures.prompt_validity(per_unit, kinds)
    pos, neg = [1.1, 2.0, 3.0], [0.1, 0.6, 1.0]  # by hand; unit 3 has no negative value and is left out
    assert v["n"] == 3 and v["effect"] == pytest.approx(np.mean(np.subtract(pos, neg)))
    want = measures.validity(pos, neg)
    assert v["valid"] == want["valid"] is True
    assert [v[k] for k in ("low", "high")] == pytest.approx([want["low"], want["high"]], rel=1e-12)
    assert measures.prompt_validity(per_unit[:, 3:], kinds) is None
    assert measures.is_valid(v) and not measures.is_valid(measures.validity(neg, pos))
    assert not measures.is_valid(None) and not measures.is_valid({}) and measures.is_valid({"valid": True})
