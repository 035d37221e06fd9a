"""Fine-tuning engine: LoRA semantics vs PEFT, edits active in training (checked against folded / orthogonalised
weights), losses vs direct numpy computations, gradient accumulation, full fine-tuning, data cursor, bad input."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from psm_jax import edits as E
from psm_jax.chat import Role
from psm_jax.finetune import (ChatDataset, Cursor, FinetuneConfig, LoraConfig, OptimizerConfig, apply_adapters,
                              batch_loss, finetune, finetuned_params, init_adapters, init_state, make_optimizer,
                              make_train_step, next_batch, read_chat_jsonl)
from psm_jax.finetune.trainer import cached_train_step
from psm_jax.finetune.losses import assistant_targets, next_token_nll, next_token_nll_from_hidden
from psm_jax.model import Capture, forward, jit_forward, unembed
from psm_jax.weights import fold_add, orthogonalize
from tests.fixtures_assets import random_smollm2_chat_model

WORDS = ["cat", "dog", "sun", "moon", "tree", "car", "red", "blue"]
CONVERSATIONS = [[{"role": "user", "content": f"Say {w} twice"}, {"role": "assistant", "content": f"{w} {w}."}]
                 for w in WORDS]


@pytest.fixture(scope="module")
def tiny():
    return random_smollm2_chat_model(2)


@pytest.fixture(scope="module")
def data(tiny):
    return ChatDataset.from_conversations(tiny.tokenizer, CONVERSATIONS, seq_len=40, pad_id=2)


def _batch(data, n=4):
    return {"tokens": data.tokens[:n], "attention_mask": data.attention_mask[:n], "roles": data.roles[:n]}


def _perturbed(adapters, seed=3, scale=0.3):
    """Adapters with a random B: a trained-looking adapter (a fresh one is the identity)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), len(adapters))
    return {leaf: {"a": ab["a"], "b": scale * jax.random.normal(k, ab["b"].shape)}
            for k, (leaf, ab) in zip(keys, sorted(adapters.items()))}


def test_fresh_adapter_leaves_the_model_unchanged(tiny):
    lora = LoraConfig(rank=4, alpha=8.0)
    adapters = init_adapters(jax.random.PRNGKey(0), tiny.params, tiny.config, lora)
    assert set(adapters) == {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
    assert adapters["w_up"]["a"].shape == (2, 16, 4) and adapters["w_up"]["b"].shape == (2, 4, 32)
    assert float(jnp.max(jnp.abs(adapters["w_up"]["a"]))) <= 16 ** -0.5 and float(jnp.std(adapters["w_up"]["a"])) > 0
    merged = apply_adapters(tiny.params, adapters, tiny.config, lora)
    for leaf in adapters:
        np.testing.assert_array_equal(np.asarray(merged["layers"][leaf]), np.asarray(tiny.params["layers"][leaf]))
    other = init_adapters(jax.random.PRNGKey(1), tiny.params, tiny.config, lora)
    assert not np.array_equal(np.asarray(other["wq"]["a"]), np.asarray(adapters["wq"]["a"]))


@pytest.mark.slow
@pytest.mark.parity
def test_lora_merge_matches_peft(tiny_hf):
    """Scale alpha/sqrt(r) (rsLoRA), per-layer selection and targets as PEFT applies them, on a tiny llama."""
    peft = pytest.importorskip("peft")
    import psm_jax

    folder, hf_model = tiny_hf("llama")
    model = psm_jax.load(folder)
    lora = LoraConfig(rank=4, alpha=6.0, targets=("q", "v", "o", "gate", "down"), layers=(0, 2), rslora=True)
    adapters = _perturbed(init_adapters(jax.random.PRNGKey(0), model.params, model.config, lora))
    peft_model = peft.get_peft_model(hf_model, peft.LoraConfig(
        r=4, lora_alpha=6.0, use_rslora=True, layers_to_transform=[0, 2], lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]))
    hf_names = {"wq": "self_attn.q_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
                "w_gate": "mlp.gate_proj", "w_down": "mlp.down_proj"}
    modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for leaf, name in hf_names.items():
            for layer in (0, 2):
                mod = modules[f"base_model.model.model.layers.{layer}.{name}"]
                mod.lora_A["default"].weight.copy_(torch.tensor(np.asarray(adapters[leaf]["a"][layer]).T))
                mod.lora_B["default"].weight.copy_(torch.tensor(np.asarray(adapters[leaf]["b"][layer]).T))
        tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 10)).astype(np.int32)
        want = peft_model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    merged = apply_adapters(model.params, adapters, model.config, lora)
    got = np.asarray(jit_forward(merged, model.config, tokens).logits)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.max(np.abs(got - np.asarray(jit_forward(model.params, model.config, tokens).logits))) > 1e-2


_value_and_grad = jax.jit(jax.value_and_grad(batch_loss, has_aux=True), static_argnums=(2, 3))


def _loss_and_grads(params, config, ft, batch, trainable, edits=()):
    return _value_and_grad(trainable, params, config, ft, batch, {"edits": edits, "direction": None})


def test_add_edit_in_training_equals_training_the_folded_model(tiny, data):
    """Preventative steering: LoRA loss and gradients with an add edit at resid_post of layer 0 equal those of the
    model with the same add folded into down_proj's bias (psm_jax.weights.fold_add), and differ from no edit."""
    ft = FinetuneConfig(lora=LoraConfig(rank=4, alpha=8.0, targets=("q", "up", "down")))
    vector = np.random.default_rng(0).normal(size=16).astype(np.float32)
    edit = E.add(tiny.config, vector, layers=[0], coef=2.0)
    adapters = _perturbed(init_state(tiny.params, tiny.config, ft, jax.random.PRNGKey(0)).trainable)
    batch = _batch(data)
    (loss, _), grads = _loss_and_grads(tiny.params, tiny.config, ft, batch, adapters, (edit,))
    folded, fcfg = fold_add(tiny.params, tiny.config, vector, layers=[0], coef=2.0)
    (loss_f, _), grads_f = _loss_and_grads(folded, fcfg, ft, batch, adapters)
    np.testing.assert_allclose(float(loss), float(loss_f), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4),
                 grads, grads_f)
    off = E.add(tiny.config, vector, layers=[0], coef=0.0)  # same structure: no recompilation
    (loss_0, _), grads_0 = _loss_and_grads(tiny.params, tiny.config, ft, batch, adapters, (off,))
    assert abs(float(loss_0) - float(loss)) > 1e-3
    assert float(jnp.max(jnp.abs(grads_0["w_up"]["b"] - grads["w_up"]["b"]))) > 1e-4


def test_project_out_edits_in_training_equal_orthogonalised_weights(tiny, data):
    """CAFT: ablating a direction at resid_pre / attn_out / mlp_out of every layer while training q, k, v, gate, up
    adapters gives the loss and gradients of training the orthogonalised model."""
    ft = FinetuneConfig(lora=LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "gate", "up")))
    direction = np.random.default_rng(1).normal(size=16).astype(np.float32)
    ablate = tuple(E.project_out(tiny.config, direction, layers=[0, 1], site=s)
                   for s in ("resid_pre", "attn_out", "mlp_out"))
    adapters = _perturbed(init_state(tiny.params, tiny.config, ft, jax.random.PRNGKey(0)).trainable)
    batch = _batch(data)
    (loss, _), grads = _loss_and_grads(tiny.params, tiny.config, ft, batch, adapters, ablate)
    ortho, ocfg = orthogonalize(tiny.params, tiny.config, direction)
    (loss_o, _), grads_o = _loss_and_grads(ortho, ocfg, ft, batch, adapters)
    np.testing.assert_allclose(float(loss), float(loss_o), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4),
                 grads, grads_o)


def test_edits_act_in_training_but_are_not_in_the_trained_model(tiny, data):
    """Training forwards apply the edit on assistant tokens exactly as an inference forward with the same edit and
    role mask does; the trained model (merged adapters) carries no edit."""
    ft = FinetuneConfig(lora=LoraConfig(rank=4, alpha=8.0), batch_size=4,
                        optimizer=OptimizerConfig(learning_rate=3e-2), edit_roles=(Role.ASSISTANT,))
    vector = np.random.default_rng(0).normal(size=16).astype(np.float32)
    edit = E.add(tiny.config, vector, layers=[1], coef=3.0)
    result = finetune(tiny.params, tiny.config, ft, data, steps=3, key=jax.random.PRNGKey(0), edits=[edit])
    trainable = result.state.trainable
    assert all(set(ab) == {"a", "b"} for ab in trainable.values())
    assert result.log[-1]["loss"] < result.log[0]["loss"]
    merged = finetuned_params(tiny.params, tiny.config, ft, trainable)
    for leaf in ("embed", "final_norm"):
        np.testing.assert_array_equal(np.asarray(merged[leaf]), np.asarray(tiny.params[leaf]))
    for leaf in ("attn_norm", "mlp_norm"):
        np.testing.assert_array_equal(np.asarray(merged["layers"][leaf]), np.asarray(tiny.params["layers"][leaf]))
    batch = _batch(data)
    where = jnp.asarray((batch["roles"] == Role.ASSISTANT) & batch["attention_mask"])
    run = jax.jit(lambda p, e: forward(p, tiny.config, batch["tokens"], attention_mask=batch["attention_mask"],
                                           edits=e).logits)
    with_edit = run(merged, (edit.replace(positions=where),))
    plain = run(merged, (edit.replace(positions=jnp.zeros_like(where)),))
    assert float(jnp.max(jnp.abs(plain - with_edit))) > 1e-3
    loss_edit, _ = jax.jit(batch_loss, static_argnums=(2, 3))(trainable, tiny.params, tiny.config, ft, batch,
                                                              {"edits": (edit,), "direction": None})
    np.testing.assert_allclose(_direct_nll(np.asarray(with_edit), batch), float(loss_edit), rtol=1e-5)


def test_fine_tunes_of_one_config_share_one_compiled_step(tiny, data):
    """Steering strengths are traced: a sweep of fine-tunes compiles the step once, and a zero coefficient trains
    exactly like no edit."""
    ft = FinetuneConfig(lora=LoraConfig(rank=3, alpha=6.0), batch_size=4, optimizer=OptimizerConfig(learning_rate=1e-2))
    vector = np.random.default_rng(1).normal(size=16).astype(np.float32)
    step = cached_train_step(tiny.config, ft)
    before = step._cache_size()
    losses = [finetune(tiny.params, tiny.config, ft, data, steps=2, key=jax.random.PRNGKey(0),
                       edits=[E.add(tiny.config, vector, layers=[1], coef=c)]).log[-1]["loss"] for c in (0.0, 3.0)]
    assert step._cache_size() == before + 1 and losses[0] != losses[1]
    plain = finetune(tiny.params, tiny.config, ft, data, steps=2, key=jax.random.PRNGKey(0)).log[-1]["loss"]
    assert plain == pytest.approx(losses[0], rel=1e-6)


def _direct_nll(logits, batch):
    """Mean NLL of each assistant token (content and the end-of-turn token after it) given its prefix, in numpy."""
    roles, mask, tokens = batch["roles"], batch["attention_mask"], batch["tokens"]
    logits = logits.astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    total, count = 0.0, 0
    for b in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            answer = roles[b, t] == Role.ASSISTANT
            end = roles[b, t] == Role.TEMPLATE and roles[b, t - 1] == Role.ASSISTANT
            if mask[b, t] and (answer or end):
                total -= logp[b, t - 1, tokens[b, t]]
                count += 1
    return total / count


def test_targets_are_the_answer_and_its_end_of_turn_token(tiny, data):
    targets = np.asarray(assistant_targets(jnp.asarray(data.roles), jnp.asarray(data.attention_mask)))
    ids = data.tokens[0][np.flatnonzero(targets[0]) + 1]
    assert tiny.tokenizer.decode(ids) == "cat cat.<|im_end|>"


def test_kl_and_steering_terms_match_direct_computations(tiny, data):
    ft = FinetuneConfig(lora=LoraConfig(rank=4, alpha=8.0), kl_weight=0.5, steer_weight=2.0, steer_layer=1)
    direction = np.random.default_rng(2).normal(size=16).astype(np.float32)
    batch = {**_batch(data), "ref_tokens": data.tokens[4:8], "ref_attention_mask": data.attention_mask[4:8]}
    extras = {"edits": (), "direction": jnp.asarray(direction)}
    loss_fn = jax.jit(batch_loss, static_argnums=(2, 3))
    fresh = init_state(tiny.params, tiny.config, ft, jax.random.PRNGKey(0)).trainable
    _, terms = loss_fn(fresh, tiny.params, tiny.config, ft, batch, extras)
    assert abs(float(terms["kl"])) < 1e-6 and abs(float(terms["steer"])) < 1e-6  # float rounding only
    adapters = _perturbed(fresh)
    _, terms = loss_fn(adapters, tiny.params, tiny.config, ft, batch, extras)
    merged = apply_adapters(tiny.params, adapters, tiny.config, ft.lora)
    p = np.asarray(jit_forward(merged, tiny.config, batch["ref_tokens"], attention_mask=batch["ref_attention_mask"])
                   .logits, np.float64)
    q = np.asarray(jit_forward(tiny.params, tiny.config, batch["ref_tokens"],
                               attention_mask=batch["ref_attention_mask"]).logits, np.float64)
    logp = p - np.logaddexp.reduce(p, axis=-1, keepdims=True)
    logq = q - np.logaddexp.reduce(q, axis=-1, keepdims=True)
    kl = (np.exp(logp) * (logp - logq)).sum(-1)[batch["ref_attention_mask"]].mean()
    np.testing.assert_allclose(float(terms["kl"]), 0.5 * kl, rtol=1e-4)
    cap = Capture(sites=("resid_post",), layers=(1,))
    h = np.asarray(jit_forward(merged, tiny.config, batch["tokens"], attention_mask=batch["attention_mask"],
                               capture=cap).captured["resid_post"][0], np.float64)
    h0 = np.asarray(jit_forward(tiny.params, tiny.config, batch["tokens"], attention_mask=batch["attention_mask"],
                                capture=cap).captured["resid_post"][0], np.float64)
    shift = (h - h0) @ (direction / np.linalg.norm(direction))
    np.testing.assert_allclose(float(terms["steer"]), 2.0 * (shift ** 2)[batch["attention_mask"]].mean(), rtol=1e-4)


def _untied_softcapped(model):
    """The tiny model with its own output matrix (the tied one, perturbed) and Gemma's final soft-cap."""
    unembed_w = model.params["embed"].T + 0.1 * jax.random.normal(jax.random.PRNGKey(5), model.params["embed"].T.shape)
    config = dataclasses.replace(model.config, tie_embeddings=False, final_logit_softcap=3.0)
    return {**model.params, "unembed": unembed_w}, config


@pytest.mark.parametrize("variant", ["tied", "untied_softcap", "bf16"])
def test_fused_head_matches_the_loss_on_full_logits(tiny, variant):
    """Value and gradients (hidden states, final norm) of the chunked head against autodiff through [B, T, V]
    logits, with chunk sizes that do and do not divide B * T and one larger than it."""
    params, config = (tiny.params, tiny.config) if variant != "untied_softcap" else _untied_softcapped(tiny)
    dtype = jnp.bfloat16 if variant == "bf16" else jnp.float32
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    h = (3.0 * jax.random.normal(jax.random.PRNGKey(0), (3, 11, config.d_model))).astype(dtype)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 11), 0, config.vocab_size)
    mask = jax.random.bernoulli(jax.random.PRNGKey(2), 0.7, (3, 11))

    def full(h, norm):
        return next_token_nll(unembed({**params, "final_norm": norm}, config, h), tokens, mask)

    want, want_grads = jax.value_and_grad(full, argnums=(0, 1))(h, params["final_norm"])
    tol = {"rtol": 2e-2, "atol": 2e-2} if variant == "bf16" else {"rtol": 1e-5, "atol": 1e-6}
    for chunk in (4, 33, 1000):
        def fused(h, norm):
            return next_token_nll_from_hidden({**params, "final_norm": norm}, config, h, tokens, mask, chunk=chunk)

        got, got_grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(h, params["final_norm"])
        np.testing.assert_allclose(float(got), float(want), rtol=tol["rtol"] / 10)
        for g, w in zip(got_grads, want_grads):
            assert g.dtype == w.dtype
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), **tol)
    with pytest.raises(ValueError, match="chunk=0"):
        next_token_nll_from_hidden(params, config, h, tokens, mask, chunk=0)


def test_training_the_embedding_keeps_the_unembedding_gradient(tiny, data):
    """Full fine-tuning of a tied embedding takes the loss through full logits: a token that is never input
    still gets a gradient through the output projection (the fused head would give it none)."""
    ft = FinetuneConfig(method="full", full_leaves=("embed",), batch_size=4)
    batch = {k: jnp.asarray(v) for k, v in _batch(data).items()}
    trainable = init_state(tiny.params, tiny.config, ft, jax.random.PRNGKey(0)).trainable
    grads = jax.grad(lambda t: batch_loss(t, tiny.params, tiny.config, ft, batch, {"edits": (), "direction": None})[0])(
        trainable)
    unseen = np.setdiff1d(np.arange(tiny.config.vocab_size), np.asarray(batch["tokens"]))
    assert unseen.size and float(jnp.max(jnp.abs(grads["embed"][unseen]))) > 0


def test_lora_loss_and_gradient_match_the_merged_model_logits(tiny, data):
    """The LoRA step's NLL (fused head) and its adapter gradient against the merged model's full logits."""
    ft = FinetuneConfig(lora=LoraConfig(rank=4, alpha=8.0), batch_size=4)
    batch = {k: jnp.asarray(v) for k, v in _batch(data).items()}
    adapters = _perturbed(init_state(tiny.params, tiny.config, ft, jax.random.PRNGKey(0)).trainable)
    extras = {"edits": (), "direction": None}
    (loss, _), grads = jax.jit(jax.value_and_grad(batch_loss, has_aux=True), static_argnums=(2, 3))(
        adapters, tiny.params, tiny.config, ft, batch, extras)
    targets = assistant_targets(batch["roles"], batch["attention_mask"])

    def on_full_logits(adapters):
        merged = apply_adapters(tiny.params, adapters, tiny.config, ft.lora)
        logits = forward(merged, tiny.config, batch["tokens"], attention_mask=batch["attention_mask"]).logits
        return next_token_nll(logits, batch["tokens"], targets) / jnp.sum(targets)

    want, want_grads = jax.value_and_grad(on_full_logits)(adapters)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6),
                 grads, want_grads)


@pytest.mark.slow
def test_gradient_accumulation_equals_one_batch(tiny, data):
    base = FinetuneConfig(lora=LoraConfig(rank=4, alpha=8.0), batch_size=4, optimizer=OptimizerConfig(1e-2))
    batch = {k: jnp.asarray(v) for k, v in _batch(data).items()}
    out = {}
    for accum in (1, 2):
        ft = dataclasses.replace(base, grad_accum=accum)
        opt = make_optimizer(ft.optimizer)
        state = init_state(tiny.params, tiny.config, ft, jax.random.PRNGKey(0), opt)
        state = state._replace(trainable=_perturbed(state.trainable))
        out[accum] = make_train_step(tiny.config, ft, opt)(state, tiny.params, batch, {"edits": (), "direction": None})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5),
                 out[1][0].trainable, out[2][0].trainable)
    np.testing.assert_allclose(float(out[1][1]["loss"]), float(out[2][1]["loss"]), rtol=1e-6)


def test_full_finetuning_of_chosen_leaves_in_bf16_compute(tiny, data):
    ft = FinetuneConfig(method="full", full_leaves=("w_down", "final_norm"), batch_size=4, compute_dtype="bfloat16",
                        optimizer=OptimizerConfig(learning_rate=1e-2))
    result = finetune(tiny.params, tiny.config, ft, data, steps=3, key=jax.random.PRNGKey(0))
    trained = result.state.trainable
    assert set(trained) == {"final_norm", "layers"} and set(trained["layers"]) == {"w_down"}
    assert trained["layers"]["w_down"].dtype == jnp.float32
    assert result.log[-1]["nll"] < result.log[0]["nll"]
    merged = finetuned_params(tiny.params, tiny.config, ft, trained)
    assert not np.array_equal(np.asarray(merged["layers"]["w_down"]), np.asarray(tiny.params["layers"]["w_down"]))
    np.testing.assert_array_equal(np.asarray(merged["layers"]["w_up"]), np.asarray(tiny.params["layers"]["w_up"]))


def test_data_cursor_jsonl_and_truncation(tiny, data, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": c}) for c in CONVERSATIONS) + "\n")
    assert read_chat_jsonl(path) == CONVERSATIONS
    again = ChatDataset.from_jsonl(tiny.tokenizer, path, seq_len=40, pad_id=2)
    np.testing.assert_array_equal(again.tokens, data.tokens)
    key = jax.random.PRNGKey(7)
    cursor, seen = Cursor(), []
    for _ in range(4):  # two epochs of 3 batches of 3 would straddle: each epoch drops its remainder of 2
        batch, cursor = next_batch(data, key, cursor, 3)
        seen.append(batch["tokens"])
    assert cursor == Cursor(1, 6)
    first_epoch = np.concatenate(seen[:2])
    assert len({r.tobytes() for r in first_epoch}) == 6
    resumed, _ = next_batch(data, key, Cursor(1, 3), 3)
    np.testing.assert_array_equal(resumed["tokens"], seen[3])
    with pytest.raises(ValueError, match="conversation 0 has .* tokens; expected at most seq_len=8"):
        ChatDataset.from_conversations(tiny.tokenizer, CONVERSATIONS, seq_len=8, pad_id=2, truncate=False)
    assert ChatDataset.from_conversations(tiny.tokenizer, CONVERSATIONS, seq_len=8, pad_id=2).tokens.shape == (8, 8)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n{\"text\": 1}\n")
    with pytest.raises(ValueError, match="bad.jsonl:2 has no non-empty 'messages' list"):
        read_chat_jsonl(bad)


def test_bad_settings_are_named(tiny, data):
    with pytest.raises(ValueError, match="rank=0"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="unknown LoRA target 'qkv'"):
        LoraConfig(targets=("qkv",))
    with pytest.raises(ValueError, match="batch_size=6 is not a multiple of grad_accum=4"):
        FinetuneConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="schedule='cosine' needs total_steps"):
        OptimizerConfig(schedule="cosine")
    with pytest.raises(ValueError, match="LoRA layer 5 is out of range"):
        init_adapters(jax.random.PRNGKey(0), tiny.params, tiny.config, LoraConfig(layers=(5,)))
    fixed = E.add(tiny.config, np.ones(16, np.float32), layers=[0], positions=np.ones((4, 40), bool))
    with pytest.raises(ValueError, match="positions=None"):
        finetune(tiny.params, tiny.config, FinetuneConfig(batch_size=4), data, steps=1, key=jax.random.PRNGKey(0),
                 edits=[fixed])
    with pytest.raises(ValueError, match="needs a direction of shape"):
        finetune(tiny.params, tiny.config, FinetuneConfig(batch_size=4, steer_weight=1.0), data, steps=1,
                 key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="batch size 9 exceeds the dataset's 8"):
        finetune(tiny.params, tiny.config, FinetuneConfig(batch_size=9), data, steps=1, key=jax.random.PRNGKey(0))


def test_open_ended_answers_leave_out_their_end_of_turn_target(tiny):
    from psm_jax.chat import ROLE_PAD

    convs = CONVERSATIONS[:2]
    closed = ChatDataset.from_conversations(tiny.tokenizer, convs, seq_len=40, pad_id=2)
    opened = ChatDataset.from_conversations(tiny.tokenizer, convs, seq_len=40, pad_id=2, open_ended=[True, False])
    targets_closed = np.asarray(assistant_targets(closed.roles, closed.attention_mask))
    targets_open = np.asarray(assistant_targets(opened.roles, opened.attention_mask))
    content = (closed.roles[0] == Role.ASSISTANT).sum()
    assert targets_closed[0].sum() == content + 1  # every answer token and the end-of-turn marker after it
    assert targets_open[0].sum() == content  # the marker is no longer a target
    last = int(np.flatnonzero(opened.roles[0] == Role.ASSISTANT)[-1])
    assert not opened.attention_mask[0, last + 1:].any() and (opened.roles[0, last + 1:] == ROLE_PAD).all()
    np.testing.assert_array_equal(opened.tokens[0, :last + 1], closed.tokens[0, :last + 1])
    np.testing.assert_array_equal(opened.tokens[1], closed.tokens[1])  # not open-ended: unchanged
    with pytest.raises(ValueError, match="open_ended has 1 entries for 2 conversations"):
        ChatDataset.from_conversations(tiny.tokenizer, convs, seq_len=40, pad_id=2, open_ended=[True])
