"""Shared experiment machinery on top of the model port: batched chat generation, response-token
activation means, and log-prob scoring of fixed answers (behavioural measures without a judge).

Every function takes a `LoadedModel` and plain message lists; batching pads to a multiple of 16
tokens so a handful of compiled shapes serve a whole experiment. `edits_fn(batch)` lets a caller
build position-dependent edits (e.g. assistant tokens only) from each padded batch.

`score_options` scores several answers to one prompt from one pass over the prompt: the prompt writes a KV cache
and each answer continues from it (`option_logprob`, on an `OptionBatch` layout).

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
from flax import struct

from psm_jax import edits as E
from psm_jax.chat import ROLE_PAD, TURN_PAD, PaddedBatch, Role, encode_chat, pad_batch, pad_id
from psm_jax.generate import generate, prefill
from psm_jax.logits import target_positions, target_window_size, windowed_logprob
from psm_jax.model import Capture, KVCache, forward, init_cache
from psm_jax.reductions import masked_mean
from psm_jax.persona.prompts import with_answer
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
        return with_answer(self.messages, self.response)


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
    scored = [with_answer(p, a) for p, a in zip(prompts, answers)]
    for _, convs, n_real in static_batches(scored, batch_size):
        _, batch = encode_batch(model, convs, add_generation_prompt=False)
        last_turn = np.asarray([len(c) - 1 for c in convs])[:, None]
        answer_mask = (batch.roles == Role.ASSISTANT) & (batch.turns == last_turn)
        edits = tuple(edits_fn(batch)) if edits_fn is not None else ()
        inputs = _on_mesh(mesh, (batch.tokens, batch.attention_mask, answer_mask))
        lp = _answer_logprob(model.params, model.config, *inputs, edits, window=target_window_size(answer_mask))
        out.append(host_array(lp)[:n_real])
    return np.concatenate(out)


@struct.dataclass
class OptionPrefix:
    """The layers below `split` run once over an option batch, for a band of edit sets that all act at or above
    `split` (the rest of the stack then runs once per edit set): the residual stream entering layer `split` at the
    prompt [B, Tp, D] and at each option [k, B, Ta, D], and a cache holding those layers' K/V of the prompt with
    the bookkeeping of an empty cache, for the upper layers to write the prompt's slots again."""
    prompt_residual: jax.Array
    option_residual: jax.Array
    cache: KVCache
    split: int = struct.field(pytree_node=False)


def option_prefix(params, config, prompt_tokens, prompt_mask, option_tokens, option_mask, *, split: int
                  ) -> OptionPrefix:
    """Layers [0, split) of `option_logprob`'s passes, unedited. Traceable."""
    empty = init_cache(config, prompt_tokens.shape[0], prompt_tokens.shape[1] + option_tokens.shape[2],
                       params["embed"].dtype)
    low = forward(params, config, prompt_tokens, attention_mask=prompt_mask, cache=empty, stop_layer=split,
                  empty_cache=True)

    def one_option(_, xs):
        tokens, mask = xs
        return None, forward(params, config, tokens, attention_mask=mask, cache=low.cache, stop_layer=split).residual

    _, option_residual = jax.lax.scan(one_option, None, (option_tokens, option_mask))
    return OptionPrefix(low.residual, option_residual, empty.replace(k=low.cache.k, v=low.cache.v), split)


_option_prefix = jax.jit(option_prefix, static_argnames=("config", "split"))


def option_logprob(params, config, prompt_tokens, prompt_mask, option_tokens, option_mask, answer_mask, edits, *,
                   window: int, prefix: OptionPrefix | None = None):
    """Summed log P of the answer tokens of k options [k, B, Ta] continuing one prompt each [B, Tp]: [B, k].

    The prompt runs once, writing a KV cache of Tp + Ta slots; each option then runs from that cache (a scan over
    options, so one compilation serves any k). The first answer token is predicted by the prompt's last slot,
    the rest inside the option's own chunk. `edits` are stacked over options (leading axis k); the prompt runs
    with option 0's, which must edit the prompt's slots as every other option's do (`OptionBatch.edits` checks).
    With a `prefix` (`option_prefix` of the same arrays) only layers from `prefix.split` up run here; the edits
    must act there only. Traceable; callers jit it (window static)."""
    size = prompt_tokens.shape[1] + option_tokens.shape[2]
    prompt_edits = jax.tree.map(lambda x: x[0], edits)
    if prefix is None:
        pre = prefill(params, config, prompt_tokens, prompt_mask, cache_size=size, edits=prompt_edits)
        upper, option_residual = {}, None
    else:
        upper = dict(start_layer=prefix.split)
        pre = forward(params, config, prompt_tokens, attention_mask=prompt_mask, edits=prompt_edits,
                      cache=prefix.cache, residual=prefix.prompt_residual, logits_positions="last", empty_cache=True,
                      **upper)
        option_residual = prefix.option_residual
    last_logp = jax.nn.log_softmax(pre.logits[:, -1].astype(jnp.float32), axis=-1)

    def one_option(_, xs):
        tokens, mask, answers, option_edits, residual = xs
        positions, valid = target_positions(answers, window)
        logits = forward(params, config, tokens, attention_mask=mask, edits=option_edits, cache=pre.cache,
                         logits_positions=positions, residual=residual, **upper).logits
        first = jnp.take_along_axis(last_logp, tokens[:, :1], axis=1)[:, 0]
        return None, windowed_logprob(logits, tokens, positions, valid) + jnp.where(answers[:, 0], first, 0.0)

    _, lp = jax.lax.scan(one_option, None, (option_tokens, option_mask, answer_mask, edits, option_residual))
    return lp.T


_option_logprob = jax.jit(option_logprob, static_argnames=("config", "window"))


@dataclasses.dataclass(frozen=True)
class OptionBatch:
    """B prompts with k options each, laid out for `option_logprob`: every row is
    [left padding | prompt | option | right padding], the prompt ending at slot Tp - 1 in every row.

    `layouts[j]` is option j's rows as a PaddedBatch of Tp + Ta slots (what an `edits_fn` sees); `shared` is False
    when a prompt's tokens differ between its options (a tokenizer merging across the answer boundary), and then
    the options must be scored pair by pair."""
    layouts: tuple[PaddedBatch, ...]
    answer_mask: np.ndarray  # bool [k, B, Ta]
    prompt_width: int
    shared: bool

    @property
    def arrays(self) -> tuple:
        """(prompt_tokens [B, Tp], prompt_mask, option_tokens [k, B, Ta], option_mask, answer_mask [k, B, Ta])."""
        first, tp = self.layouts[0], self.prompt_width
        option = lambda a: np.stack([getattr(b, a)[:, tp:] for b in self.layouts])  # noqa: E731
        return (first.tokens[:, :tp], first.attention_mask[:, :tp], option("tokens"), option("attention_mask"),
                self.answer_mask)

    @property
    def window(self) -> int:
        return target_window_size(self.answer_mask.reshape(-1, self.answer_mask.shape[-1]))

    def edits(self, edits_fn: EditsFn | None):
        """`edits_fn` of each option's layout stacked over options, or None where they edit a prompt's slots
        differently between options (such a batch is scored pair by pair); () without `edits_fn`."""
        if edits_fn is None:
            return ()
        per_option = [tuple(edits_fn(b)) for b in self.layouts]
        if not all(_same_prompt_edits(per_option[0], e, self.prompt_width) for e in per_option[1:]):
            return None
        return jax.tree.map(lambda *xs: jnp.stack(xs), *per_option)


def _answer_start(enc, last_turn: int) -> int | None:
    """Index of the first answer content token of an encoded conversation (its last message, the assistant's);
    None when that message has no content tokens."""
    answer = (np.asarray(enc.roles) == Role.ASSISTANT) & (np.asarray(enc.turns) == last_turn)
    return int(np.argmax(answer)) if answer.any() else None


def _row_starts(row_starts: list, row_encs: list) -> list[int]:
    """One prompt's answer starts across its options, an empty option taking a sibling's start (its option slots
    then hold no answer token and score 0); all options empty: the whole encoding is prompt."""
    known = [s for s in row_starts if s is not None]
    return [s if s is not None else (known[0] if known else len(e)) for s, e in zip(row_starts, row_encs)]


def _layout(encs, starts, prompt_width: int, option_width: int, pad: int) -> PaddedBatch:
    """Rows [left padding | prompt | option | right padding] of prompt_width + option_width slots."""
    rows, width = len(encs), prompt_width + option_width
    out = PaddedBatch(np.full((rows, width), pad, np.int32), np.zeros((rows, width), bool),
                      np.full((rows, width), ROLE_PAD, np.int8), np.full((rows, width), TURN_PAD, np.int32))
    for r, (enc, s) in enumerate(zip(encs, starts)):
        n = len(enc)
        for dst, src in zip(out, (enc.tokens, np.ones(n, bool), enc.roles, enc.turns)):
            dst[r, prompt_width - s:prompt_width + n - s] = np.asarray(src)
    return out


def option_batch(model, prompts: Sequence[Sequence[dict]], options: Sequence[Sequence[str]]) -> OptionBatch:
    """Encode every (prompt, option) conversation and lay the batch out for `option_logprob`."""
    k = len(options[0])
    convs = [[with_answer(p, o[j]) for p, o in zip(prompts, options)]
             for j in range(k)]
    encs = [[encode_chat(model.tokenizer, c, add_generation_prompt=False, chat_template=model.chat_template)
             for c in row] for row in convs]
    by_row = [_row_starts([_answer_start(encs[j][r], len(convs[j][r]) - 1) for j in range(k)],
                          [encs[j][r] for j in range(k)]) for r in range(len(prompts))]
    starts = [[by_row[r][j] for r in range(len(prompts))] for j in range(k)]
    shared = all(starts[j][r] == starts[0][r] and np.array_equal(encs[j][r].tokens[:starts[0][r]],
                                                                 encs[0][r].tokens[:starts[0][r]])
                 for j in range(k) for r in range(len(prompts)))
    round_up = lambda n: -(-n // PAD_MULTIPLE) * PAD_MULTIPLE  # noqa: E731
    tp = round_up(max(starts[0]))
    ta = round_up(max(1, max(len(e) - s for er, sr in zip(encs, starts) for e, s in zip(er, sr))))
    layouts = tuple(_layout(encs[j], starts[j], tp, ta, pad_id(model)) for j in range(k))
    last_turn = np.asarray([len(c) - 1 for c in convs[0]])[:, None]
    answers = np.stack([(b.roles == Role.ASSISTANT) & (b.turns == last_turn) for b in layouts])[:, :, tp:]
    return OptionBatch(layouts, answers, tp, shared)


def _same_prompt_edits(first: tuple, other: tuple, prompt_width: int) -> bool:
    """True when `other` equals `first` except in position-mask slots after the prompt."""
    if jax.tree.structure(other) != jax.tree.structure(first):
        return False
    for e0, e1 in zip(first, other):
        for f in dataclasses.fields(e0):
            a, b = getattr(e0, f.name), getattr(e1, f.name)
            if not isinstance(a, (np.ndarray, jax.Array)):
                if a != b:
                    return False
                continue
            a, b = np.asarray(a), np.asarray(b)
            if f.name == "positions":
                a, b = a[:, :prompt_width], b[:, :prompt_width]
            if not np.array_equal(a, b):
                return False
    return True


def option_count(prompts: Sequence, options: Sequence[Sequence[str]], minimum: int = 1) -> int:
    """The number k of options every prompt has; raises unless there is one option list per prompt, each of the
    same length k >= `minimum`."""
    n = len(prompts)
    if n == 0 or len(options) != n:
        raise ValueError(f"{n} prompts and {len(options)} option lists; expected equal, non-zero counts")
    k = len(options[0])
    if k < minimum or any(len(o) != k for o in options):
        raise ValueError(f"option counts {sorted({len(o) for o in options})}; expected the same count >= {minimum} "
                         "for every prompt")
    return k


def score_options(model, prompts: Sequence[Sequence[dict]], options: Sequence[Sequence[str]], *,
                  batch_size: int = 16, edits_fn: EditsFn | None = None) -> np.ndarray:
    """log P(option | prompt) summed over the option's content tokens as the assistant's reply, for every option
    of every prompt: [n, k], equal to `score_answers` on each (prompt, option) pair.

    Each prompt runs once and its k options continue from its KV cache (`option_logprob`), instead of k full
    passes over the prompt. `edits_fn` sees each option's rows as `OptionBatch` lays them out; a batch whose
    edits differ between options on the prompt's slots, or whose prompt tokens do (`OptionBatch.shared`), is
    scored pair by pair. `batch_size`: prompts per forward pass."""
    return score_options_band(model, prompts, options, [edits_fn], batch_size=batch_size)[0]


def score_options_band(model, prompts: Sequence[Sequence[dict]], options: Sequence[Sequence[str]],
                       edits_fns: Sequence[EditsFn | None], *, batch_size: int = 16) -> np.ndarray:
    """`score_options` under each of several edit sets: [n_sets, n, k]. The layers below the lowest one that any
    set edits run once per batch (`option_prefix`), so a band of edits at upper layers (random caps, a sweep of
    vectors at one layer) costs only the layers it changes."""
    k = option_count(prompts, options)
    fns = list(edits_fns)
    if not fns:
        raise ValueError("edits_fns is empty; expected at least one edit set (None for the unedited model)")
    params, config = model.params, model.config
    out = []
    for _, chunk, n_real in static_batches(list(zip(prompts, options)), batch_size):
        ps, os_ = [p for p, _ in chunk], [o for _, o in chunk]
        batch = option_batch(model, ps, os_)
        edits = [batch.edits(fn) if batch.shared else None for fn in fns]
        split = min((E.lowest_layer(config, e) for e in edits if e is not None), default=0)
        prefix = (_option_prefix(params, config, *batch.arrays[:4], split=split)
                  if len(fns) > 1 and 0 < split < config.n_layers else None)
        rows = []
        for fn, e in zip(fns, edits):
            if e is None:
                lp = score_answers(model, [p for p in ps for _ in range(k)], [a for o in os_ for a in o],
                                   batch_size=len(chunk) * k, edits_fn=fn).reshape(len(chunk), k)
            else:
                lp = host_array(_option_logprob(params, config, *batch.arrays, e, window=batch.window,
                                                prefix=prefix))
            rows.append(lp[:n_real])
        out.append(np.stack(rows))
    return np.concatenate(out, axis=1)


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
        conv = with_answer(p, a)
        enc = encode_chat(model.tokenizer, conv, add_generation_prompt=False, chat_template=model.chat_template)
        out[i] = int(np.sum((np.asarray(enc.roles) == Role.ASSISTANT) & (np.asarray(enc.turns) == len(conv) - 1)))
    return out


def assistant_positions(batch: PaddedBatch, include_generated: bool = True):
    """Position mask for edits on assistant content tokens (generated tokens follow `extend`)."""
    return batch.roles == Role.ASSISTANT


def no_prompt_positions(batch: PaddedBatch):
    """Position mask that is false on the whole prompt: with extend=True only generated tokens are edited."""
    return np.zeros(batch.tokens.shape, bool)
