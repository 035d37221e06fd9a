"""Shared experiment machinery on top of the model port: batched chat generation, response-token
activation means, and log-prob scoring of fixed answers (behavioural measures without a judge).

Every function takes a `LoadedModel` and plain message lists; batching pads to a multiple of 16
tokens so a handful of compiled shapes serve a whole experiment. `edits_fn(batch)` lets a caller
build position-dependent edits (e.g. assistant tokens only) from each padded batch.

`activation_means` and `score_answers` take `mesh=` (a `psm_jax.sharding.make_mesh` mesh, the model's params
placed on it: `psm_jax.load(..., mesh=mesh)` or `shard_params`): each batch is split over the mesh's batch axes,
across processes too (every process runs the same call on the same conversations and gets every result).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psm_jax.chat import PaddedBatch, Role, encode_chat, pad_batch, pad_id
from psm_jax.generate import generate
from psm_jax.logits import target_positions, target_window_size, windowed_logprob
from psm_jax.model import Capture, forward
from psm_jax.reductions import masked_mean
from psm_jax.sharding import host_array, shard_batch

EditsFn = Callable[[PaddedBatch], tuple]
PAD_MULTIPLE = 16


def eos_ids(model) -> tuple[int, ...]:
    ids = set(model.config.eos_token_ids)
    tok = model.tokenizer
    if getattr(tok, "eos_token_id", None) is not None:
        ids.add(int(tok.eos_token_id))
    im_end = tok.convert_tokens_to_ids("<|im_end|>") if tok is not None else None
    if isinstance(im_end, int) and im_end != getattr(tok, "unk_token_id", None):
        ids.add(im_end)
    return tuple(sorted(ids))


def encode_batch(model, conversations: Sequence[Sequence[dict]], add_generation_prompt: bool,
                 multiple_of: int = PAD_MULTIPLE):
    encs = [encode_chat(model.tokenizer, conv, add_generation_prompt=add_generation_prompt,
                        chat_template=model.chat_template) for conv in conversations]
    return encs, pad_batch(encs, pad_id(model), side="left", multiple_of=multiple_of)


def _on_mesh(mesh, arrays: tuple) -> tuple:
    """The batch's host arrays split over the mesh's batch axes (unchanged without a mesh)."""
    return arrays if mesh is None else tuple(shard_batch(np.asarray(a), mesh) for a in arrays)


def static_batches(items: Sequence, batch_size: int, *, progress: bool = False, desc: str = "batch"):
    """Yield (start, batch, n_real) over `items` in order: `batch` is a list of exactly `batch_size` items, the last
    one padded by repeating its final item (a static batch shape for jitted code); the first `n_real` are real,
    items[start:start + n_real]. `progress`: a tqdm bar over the batches, labelled `desc`."""
    chunks = range(0, len(items), batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=desc, unit="batch")
    for start in chunks:
        batch = list(items[start:start + batch_size])
        n_real = len(batch)
        batch += [batch[-1]] * (batch_size - n_real)
        yield start, batch, n_real


@dataclasses.dataclass
class Rollout:
    messages: list[dict]  # the prompt conversation
    response: str
    response_tokens: np.ndarray
    finished: bool

    def conversation(self) -> list[dict]:
        """The prompt plus the response as a final assistant message."""
        return list(self.messages) + [{"role": "assistant", "content": self.response}]


def generate_responses(model, conversations: Sequence[Sequence[dict]], *, max_new_tokens: int = 64,
                       temperature: float = 0.0, top_p: float = 1.0, key=None, batch_size: int = 8,
                       edits_fn: EditsFn | None = None, progress: bool = False) -> list[Rollout]:
    """Generate one response per conversation (batched, left-padded, EOS-aware)."""
    out: list[Rollout] = []
    key = jax.random.key(0) if key is None else key
    eos = eos_ids(model)
    for start, convs, n_real in static_batches(conversations, batch_size, progress=progress, desc="generate"):
        _, batch = encode_batch(model, convs, add_generation_prompt=True)
        edits = tuple(edits_fn(batch)) if edits_fn is not None else ()
        key, sub = jax.random.split(key)
        gen = generate(model.params, model.config, batch.tokens, batch.attention_mask, max_new_tokens=max_new_tokens,
                       key=sub, temperature=temperature, top_p=top_p, edits=edits, eos_ids=eos)
        toks, lengths, done = jax.device_get((gen.tokens, gen.lengths, gen.finished))
        for i in range(n_real):
            n = int(lengths[i]) - (1 if done[i] else 0)  # drop the EOS itself
            resp = toks[i, :n]
            out.append(Rollout(messages=list(conversations[start + i]),
                               response=model.tokenizer.decode(resp, skip_special_tokens=True).strip(),
                               response_tokens=resp, finished=bool(done[i])))
    return out


@functools.partial(jax.jit, static_argnames=("config", "site", "layers"))
def _reduce(params, config, tokens, attention_mask, response_mask, prompt_mask, last_prompt, edits, *, site, layers):
    out = forward(params, config, tokens, attention_mask=attention_mask, edits=edits,
                  capture=Capture(sites=(site,), layers=layers), return_logits=False)
    h = out.captured[site]  # [L, B, T, D]
    resp = masked_mean(h, response_mask[None])
    prompt = masked_mean(h, prompt_mask[None])
    last = jnp.take_along_axis(h, last_prompt[None, :, None, None], axis=2)[:, :, 0]
    swap = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731  -> [B, L, D]
    return swap(resp), swap(prompt), swap(last)


def activation_means(model, conversations: Sequence[Sequence[dict]], *, layers: Sequence[int] | None = None,
                     site: str = "resid_post", batch_size: int = 8, edits_fn: EditsFn | None = None,
                     roles_for_response: tuple[int, ...] = (Role.ASSISTANT,), last_turn_only: bool = True,
                     progress: bool = False, mesh=None) -> dict[str, np.ndarray]:
    """Per-conversation activations at `site` for each layer, reduced three ways:

    response_mean  mean over assistant *content* tokens (of the last message if last_turn_only,
                   else of every assistant message)             [N, n_layers, D]
    prompt_mean    mean over every content token before the response      [N, n_layers, D]
    last_prompt    the token just before the response content begins      [N, n_layers, D]
    n_response     response token counts [N]

    mesh: split each batch over the mesh's batch axes (module docstring).
    """
    layers = tuple(range(model.config.n_layers)) if layers is None else tuple(int(x) for x in layers)
    for layer in layers:
        model.config.check_layer(layer)
    res = {"response_mean": [], "prompt_mean": [], "last_prompt": [], "n_response": []}
    for _, convs, n_real in static_batches(conversations, batch_size, progress=progress, desc=f"activations {site}"):
        encs, batch = encode_batch(model, convs, add_generation_prompt=False)
        T = batch.tokens.shape[1]
        resp_mask = np.isin(batch.roles, roles_for_response)
        if last_turn_only:
            last_turn = np.asarray([len(c) - 1 for c in convs])[:, None]
            resp_mask &= batch.turns == last_turn
        first_resp = np.where(resp_mask.any(1), resp_mask.argmax(1), T)
        positions = np.arange(T)[None]
        content = batch.roles > Role.TEMPLATE
        prompt_mask = content & (positions < first_resp[:, None])
        last_prompt = np.clip(first_resp - 1, 0, T - 1).astype(np.int32)
        edits = tuple(edits_fn(batch)) if edits_fn is not None else ()
        inputs = _on_mesh(mesh, (batch.tokens, batch.attention_mask, resp_mask, prompt_mask, last_prompt))
        r, p, l_ = (host_array(a) for a in _reduce(model.params, model.config, *inputs, edits, site=site,
                                                   layers=layers))
        res["response_mean"].append(r[:n_real])
        res["prompt_mean"].append(p[:n_real])
        res["last_prompt"].append(l_[:n_real])
        res["n_response"].append(resp_mask.sum(1)[:n_real])
    return {k: np.concatenate(v) for k, v in res.items()}


def answer_logprob(params, config, tokens, attention_mask, answer_mask, edits, *, window: int):
    """Summed log P of the tokens marked in answer_mask [B, T], teacher-forced: [B]. The vocab projection and
    log-softmax run only at the `window` positions that predict them (`psm_jax.logits.target_window_size`), not at
    every position of the prompt. Traceable; callers jit it (window static)."""
    positions, valid = target_positions(answer_mask, window)
    logits = forward(params, config, tokens, attention_mask=attention_mask, edits=edits,
                     logits_positions=positions).logits
    return windowed_logprob(logits, tokens, positions, valid)


_answer_logprob = jax.jit(answer_logprob, static_argnames=("config", "window"))


def score_answers(model, prompts: Sequence[Sequence[dict]], answers: Sequence[str], *, batch_size: int = 16,
                  edits_fn: EditsFn | None = None, mesh=None) -> np.ndarray:
    """log P(answer | prompt) summed over the answer's content tokens, answering as the assistant.

    prompts[i] is a conversation ending with a user message; answers[i] the assistant reply to score.
    mesh: split each batch over the mesh's batch axes (module docstring).
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers; expected equal counts")
    out = []
    scored = [list(p) + [{"role": "assistant", "content": a}] for p, a in zip(prompts, answers)]
    for _, convs, n_real in static_batches(scored, batch_size):
        _, batch = encode_batch(model, convs, add_generation_prompt=False)
        last_turn = np.asarray([len(c) - 1 for c in convs])[:, None]
        answer_mask = (batch.roles == Role.ASSISTANT) & (batch.turns == last_turn)
        edits = tuple(edits_fn(batch)) if edits_fn is not None else ()
        inputs = _on_mesh(mesh, (batch.tokens, batch.attention_mask, answer_mask))
        lp = _answer_logprob(model.params, model.config, *inputs, edits, window=target_window_size(answer_mask))
        out.append(host_array(lp)[:n_real])
    return np.concatenate(out)


def conversation_nll(model, conversations: Sequence[Sequence[dict]], *, batch_size: int = 4,
                     edits_fn: EditsFn | None = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(summed NLL, token count) of every assistant content token of each whole conversation, teacher-forced:
    the fluency of an edited model on held-out multi-turn chats (perplexity = exp(sum NLL / sum count))."""
    nll, counts = [], []
    for _, convs, n_real in static_batches(conversations, batch_size, progress=progress, desc="perplexity"):
        _, batch = encode_batch(model, convs, add_generation_prompt=False, multiple_of=64)
        answer_mask = batch.roles == Role.ASSISTANT
        edits = tuple(edits_fn(batch)) if edits_fn is not None else ()
        lp = _answer_logprob(model.params, model.config, batch.tokens, batch.attention_mask, answer_mask, edits,
                             window=target_window_size(answer_mask))
        nll.append(-host_array(lp)[:n_real])
        counts.append(answer_mask[:, 1:].sum(1)[:n_real])
    return np.concatenate(nll), np.concatenate(counts)


def answer_token_counts(model, prompts: Sequence[Sequence[dict]], answers: Sequence[str]) -> np.ndarray:
    """Number of answer content tokens that `score_answers` sums over, per (prompt, answer): [N] int.

    Divide `score_answers` by it for a per-token log-likelihood. Tokenization only (no forward pass)."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers; expected equal counts")
    out = np.zeros(len(prompts), np.int64)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        conv = list(p) + [{"role": "assistant", "content": a}]
        enc = encode_chat(model.tokenizer, conv, add_generation_prompt=False, chat_template=model.chat_template)
        out[i] = int(np.sum((np.asarray(enc.roles) == Role.ASSISTANT) & (np.asarray(enc.turns) == len(conv) - 1)))
    return out


def assistant_positions(batch: PaddedBatch, include_generated: bool = True):
    """Position mask for edits on assistant content tokens (generated tokens follow `extend`)."""
    return batch.roles == Role.ASSISTANT


def no_prompt_positions(batch: PaddedBatch):
    """Position mask that is false on the whole prompt: with extend=True only generated tokens are edited."""
    return np.zeros(batch.tokens.shape, bool)
