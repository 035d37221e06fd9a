import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psm_jax import logits as L


def test_logit_utilities_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, (2, 5))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.stack([[logp[b, t, tokens[b, t + 1]] for t in range(4)] for b in range(2)])
    np.testing.assert_allclose(L.token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)), want, atol=1e-5)
    target = np.zeros((2, 5), bool)
    target[:, 3:] = True
    np.testing.assert_allclose(L.continuation_logprob(logits, jnp.asarray(tokens), jnp.asarray(target)),
                               want[:, 2:].sum(-1), atol=1e-5)
    np.testing.assert_allclose(L.cross_entropy(logits, jnp.asarray(tokens)), -want.mean(), atol=1e-5)
    p_set = np.exp(logp[:, -1, [1, 3]]).sum(-1)
    np.testing.assert_allclose(L.token_set_log_odds(logits[:, -1], [1, 3]), np.log(p_set / (1 - p_set)), atol=1e-4)
    assert float(L.kl_divergence(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    q = logits[::-1]
    p_ = np.exp(logp)
    lq = q - np.log(np.exp(q).sum(-1, keepdims=True))
    np.testing.assert_allclose(L.kl_divergence(logits, q), (p_ * (logp - lq)).sum(-1).mean(), atol=1e-5)


def test_windowed_logprob_reads_only_the_target_positions():
    """target_positions + windowed_logprob equal the full-logits sum over scattered targets (numpy reference),
    and a window narrower than a row's targets drops them (why callers size it with target_window_size)."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 9, 11)).astype(np.float32)
    tokens = rng.integers(0, 11, (3, 9))
    target = np.zeros((3, 9), bool)
    target[0, 5:] = True
    target[1, [2, 3, 7]] = True  # scattered, as in a multi-turn conversation
    target[2, 0] = True  # the first token has no prediction: never counted
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = [sum(logp[b, t - 1, tokens[b, t]] for t in range(1, 9) if target[b, t]) for b in range(3)]
    window = L.target_window_size(target, multiple=2)
    assert window == 4
    pos, valid = L.target_positions(jnp.asarray(target), window)
    np.testing.assert_array_equal(np.asarray(pos)[1][np.asarray(valid)[1]], [1, 2, 6])
    got = L.windowed_logprob(jnp.take_along_axis(jnp.asarray(logits), pos[..., None], axis=1), jnp.asarray(tokens),
                             pos, valid)
    np.testing.assert_allclose(got, want, atol=1e-5)
    narrow, ok = L.target_positions(jnp.asarray(target), 1)
    short = L.windowed_logprob(jnp.take_along_axis(jnp.asarray(logits), narrow[..., None], axis=1),
                               jnp.asarray(tokens), narrow, ok)
    assert abs(float(short[0]) - want[0]) > 1e-3


def test_answer_scoring_matches_the_full_logits(tiny_chat_model):
    """score_answers (logits only at the answer's predicting positions) equals the summed log-softmax of the full
    forward's logits over the same answer tokens, with and without an edit."""
    from psm_jax import edits as E
    from psm_jax.chat import Role
    from psm_jax.model import forward
    from psm_jax.persona import rollouts

    m = tiny_chat_model
    prompts = [[{"role": "user", "content": "Who are you?"}],
               [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "Tell me about the sea."}]]
    answers = ["I am an assistant.", "Arr, the sea is wide and deep, matey."]
    vec = np.random.default_rng(2).normal(size=m.config.d_model).astype(np.float32)
    edit = E.add(m.config, vec, layers=[1])
    for edits_fn in (None, lambda batch: (edit,)):
        got = rollouts.score_answers(m, prompts, answers, batch_size=2, edits_fn=edits_fn)
        convs = [p + [{"role": "assistant", "content": a}] for p, a in zip(prompts, answers)]
        _, batch = rollouts.encode_batch(m, convs, add_generation_prompt=False)
        mask = (batch.roles == Role.ASSISTANT) & (batch.turns == np.asarray([[len(c) - 1] for c in convs]))
        full = np.asarray(forward(m.params, m.config, jnp.asarray(batch.tokens), attention_mask=batch.attention_mask,
                                  edits=() if edits_fn is None else (edit,)).logits, np.float64)
        logp = full - np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1, keepdims=True)) - full.max(-1, keepdims=True)
        want = [sum(logp[b, t - 1, batch.tokens[b, t]] for t in range(1, batch.tokens.shape[1]) if mask[b, t])
                for b in range(2)]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.slow  # 15-20 s of compiles; CI runs it in the bounded slow step
def test_option_scoring_from_a_shared_prompt_cache_matches_pair_scoring(tiny_chat_model, monkeypatch):
    """score_options (each prompt prefilled once, its options continued from the cache) equals score_answers on
    every (prompt, option) pair: unedited, with an edit everywhere, on assistant tokens only (an edit that covers
    the option but not the prompt), a clamp, per-row vectors, and an edit that differs between options on the
    prompt (scored pair by pair)."""
    from psm_jax import edits as E
    from psm_jax.persona import rollouts

    m = tiny_chat_model
    prompts = [[{"role": "user", "content": "Who are you?"}],
               [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "Tell me about the sea."}],
               [{"role": "user", "content": "Hi"}]]
    options = [("I am an assistant.", "A pirate, arr.", "No."),
               ("Arr, the sea is wide and deep, matey, and full of fish.", "I cannot help.", "Water."),
               ("Hello! How can I help you today?", "Ahoy.", "Go away, landlubber, I have a ship to sail.")]
    rng = np.random.default_rng(3)
    vec = rng.normal(size=m.config.d_model).astype(np.float32)
    rows = rng.normal(size=(3, m.config.d_model)).astype(np.float32)
    everywhere = E.add(m.config, vec, layers=[1])
    clamp = E.clamp(m.config, vec, layers=[0, 2], floor=-0.5, ceiling=0.5)
    fns = {"none": None,
           "everywhere": lambda batch: (everywhere,),
           "assistant": lambda batch: (E.add(m.config, vec, layers=[2], coef=2.0,
                                             positions=rollouts.assistant_positions(batch)),),
           "clamp": lambda batch: (clamp,),
           "rows": lambda batch: (E.add(m.config, rows[:batch.tokens.shape[0]], layers=[1]),),
           "per_option": lambda batch: (E.add(m.config, vec, layers=[1], coef=float(batch.attention_mask.sum())),)}
    shared_calls = []
    real = rollouts._option_logprob
    monkeypatch.setattr(rollouts, "_option_logprob", lambda *a, **k: shared_calls.append(1) or real(*a, **k))
    for name, fn in fns.items():
        before = len(shared_calls)
        got = rollouts.score_options(m, prompts, options, batch_size=3, edits_fn=fn)
        assert len(shared_calls) - before == (0 if name == "per_option" else 1), name
        want = np.stack([rollouts.score_answers(m, prompts, [o[j] for o in options], batch_size=3, edits_fn=fn)
                         for j in range(3)], axis=1)
        if name == "per_option":
            want = rollouts.score_answers(m, [p for p in prompts for _ in range(3)], [a for o in options for a in o],
                                          batch_size=9, edits_fn=fn).reshape(3, 3)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-4, err_msg=name)
    assert np.ptp(got) > 1.0


@pytest.mark.slow
def test_a_band_of_upper_layer_edits_shares_the_layers_below(tiny_chat_model, monkeypatch):
    """score_options_band runs the layers below the lowest edited one once per batch (`option_prefix`) and
    equals pair-by-pair score_answers under every edit set of the band, the unedited model included."""
    from psm_jax import edits as E
    from psm_jax.persona import rollouts

    m = tiny_chat_model
    prompts = [[{"role": "user", "content": "Who are you?"}],
               [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "Tell me about the sea."}],
               [{"role": "user", "content": "Hi"}]]
    options = [("I am an assistant.", "A pirate, arr."), ("Arr, the sea is wide.", "I cannot help."),
               ("Hello! How can I help?", "Ahoy.")]
    rng = np.random.default_rng(5)
    vec = 3.0 * rng.normal(size=m.config.d_model).astype(np.float32)
    fns = [None,
           lambda batch: (E.add(m.config, vec, layers=[1]),),
           lambda batch: (E.clamp(m.config, vec, layers=[1, 2], floor=-0.5, ceiling=0.5),),
           lambda batch: (E.add(m.config, -vec, layers=[2], positions=rollouts.assistant_positions(batch)),)]
    splits = []
    real = rollouts._option_prefix
    monkeypatch.setattr(rollouts, "_option_prefix", lambda *a, **k: splits.append(k["split"]) or real(*a, **k))
    got = rollouts.score_options_band(m, prompts, options, fns, batch_size=2)
    assert splits == [1, 1]  # two batches, each running layer 0 once for the four edit sets
    for fn, lp in zip(fns, got):
        want = np.stack([rollouts.score_answers(m, prompts, [o[j] for o in options], batch_size=3, edits_fn=fn)
                         for j in range(2)], axis=1)
        np.testing.assert_allclose(lp, want, rtol=1e-5, atol=2e-4)
    assert np.abs(got[1:] - got[0]).max() > 0.1  # the edits change the scores


def test_an_empty_option_scores_zero_beside_its_siblings(tiny_chat_model, monkeypatch):
    """An empty answer has no tokens to score: 0 in the shared layout as pair by pair, its siblings unchanged; a
    prompt whose options are all empty scores 0 throughout."""
    from psm_jax.persona import rollouts

    m = tiny_chat_model
    prompts = [[{"role": "user", "content": "Who are you?"}], [{"role": "user", "content": "Hi"}]]
    options = [("", "A pirate, arr."), ("", "")]
    shared_calls = []
    real = rollouts._option_logprob
    monkeypatch.setattr(rollouts, "_option_logprob", lambda *a, **k: shared_calls.append(1) or real(*a, **k))
    got = rollouts.score_options(m, prompts, options, batch_size=2)
    assert shared_calls, "the shared-prompt path did not run"
    want = np.stack([rollouts.score_answers(m, prompts, [o[j] for o in options], batch_size=2) for j in range(2)], 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-4)
    assert got[0, 0] == 0 and got[1].tolist() == [0, 0] and got[0, 1] < -1.0
    from psm_jax.persona import measures

    np.testing.assert_allclose(measures.choice_scores(m, prompts, options, batch_size=2, per_token=False), got,
                               rtol=1e-6)
    with pytest.raises(ValueError, match="has no content tokens"):
        measures.choice_scores(m, prompts, options, batch_size=2)


def test_option_scoring_rejects_ragged_options(tiny_chat_model):
    from psm_jax.persona import rollouts

    p = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="option counts"):
        rollouts.score_options(tiny_chat_model, [p, p], [("a", "b"), ("a",)])


def test_argmax_last_is_jnp_argmax_with_ties_nans_and_infinities():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 1000)).astype(np.float32)
    x[1, [10, 500]] = 9.0  # a tie: the first index wins
    x[2, [700, 30]] = np.nan  # a NaN counts as the maximum: the first NaN wins
    x[3] = -np.inf
    x[4, 999] = np.inf
    x[5, :] = 0.0
    for a in (x, x.astype(jnp.bfloat16)):
        got = jax.jit(L.argmax_last)(jnp.asarray(a))
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(got), np.argmax(np.asarray(a, np.float32), axis=-1))
    assert list(np.asarray(L.argmax_last(jnp.asarray(x)))[1:]) == [10, 30, 0, 999, 0]


def test_categorical_last_draws_what_jax_random_categorical_draws():
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((8, 300)).astype(np.float32)) * 3
    for seed in range(5):
        key = jax.random.key(seed)
        np.testing.assert_array_equal(np.asarray(L.categorical_last(key, logits)),
                                      np.asarray(jax.random.categorical(key, logits, axis=-1)))
