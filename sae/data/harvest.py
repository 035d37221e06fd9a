"""Harvesting: one jitted forward per batch of contexts captures (site, layer) activations of the kept tokens;
a shuffle buffer mixes them across contexts for streamed training.

    ContextBatch (sae.data.contexts) --harvest--> ActivationBatch (kept tokens only: acts[(site, layer)] [n, D]
      float32 + metadata) --ShuffleBuffer--> shuffled training batches (`stream_batches`)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from sae.data.contexts import (ActivationError, ContextBatch, Encoded, TokenFilter, batch_contexts,
                               default_encoder, encode_documents)

META_FIELDS = ("roles", "turns", "tokens", "doc_ids", "pos", "context")
META_DTYPES = {"roles": np.int8, "turns": np.int32, "tokens": np.int32, "doc_ids": np.int32,
               "pos": np.int32, "context": np.int64}


class NonFiniteActivationError(ActivationError):
    """The model produced NaN/inf activations at harvest (message names the hook point and the document)."""


def site_key(site: str, layer: int) -> str:
    """File/manifest name of one (site, layer), e.g. "resid_post.15"."""
    return f"{site}.{int(layer)}"

# ----------------------------------------------------------------------------------------------
# Harvesting


@dataclasses.dataclass
class ActivationBatch:
    """Kept tokens of some contexts: activations per (site, layer) and aligned metadata."""

    acts: dict  # (site, layer) -> float32 [n, D]
    roles: np.ndarray
    turns: np.ndarray
    tokens: np.ndarray
    doc_ids: np.ndarray
    pos: np.ndarray
    context: np.ndarray
    context_end: int = 0  # contexts [0, context_end) are fully harvested after this batch

    def __len__(self) -> int:
        if self.acts:
            return len(next(iter(self.acts.values())))
        return len(self.roles)

    def meta(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in META_FIELDS}

    def take(self, idx) -> "ActivationBatch":
        return ActivationBatch({k: v[idx] for k, v in self.acts.items()},
                               *(getattr(self, k)[idx] for k in META_FIELDS), context_end=self.context_end)

    @staticmethod
    def concat(batches: Sequence["ActivationBatch"]) -> "ActivationBatch":
        if not batches:
            raise ActivationError("nothing to concatenate")
        keys = list(batches[0].acts)
        return ActivationBatch({k: np.concatenate([b.acts[k] for b in batches]) for k in keys},
                               *(np.concatenate([getattr(b, f) for b in batches]) for f in META_FIELDS),
                               context_end=max(b.context_end for b in batches))


def _normalize_sites_layers(sites_layers, n_layers: int | None = None) -> list[tuple[str, int]]:
    from psm_jax.edits import SITES

    if not sites_layers:
        raise ActivationError("sites_layers is empty; expected e.g. [('resid_post', 15)]")
    out = []
    for item in sites_layers:
        try:
            site, layer = item
        except (TypeError, ValueError):
            raise ActivationError(f"bad sites_layers entry {item!r}; expected (site, layer)") from None
        if site not in SITES:
            raise ActivationError(f"unknown site {site!r}; expected one of {SITES}")
        if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool):
            raise ActivationError(f"layer {layer!r} for site {site!r} is not an int")
        layer = int(layer)
        if n_layers is not None and not 0 <= layer < n_layers:
            raise ActivationError(f"layer {layer} for site {site!r} is out of range; the model has "
                                  f"{n_layers} layers (0..{n_layers - 1})")
        if (site, layer) not in out:
            out.append((site, layer))
    return out


def truncated_model(params: dict, config, n_layers: int):
    """Params/config keeping only the first `n_layers` layers (captures below them are unchanged)."""
    import jax

    if n_layers >= config.n_layers:
        return params, config
    cfg = dataclasses.replace(config, n_layers=n_layers,
                              sliding_layers=tuple(config.sliding_layers[:n_layers]) if config.sliding_layers else ())
    p = dict(params)
    p["layers"] = jax.tree_util.tree_map(lambda x: x[:n_layers], params["layers"])
    return p, cfg


_STEP_CACHE: dict = {}


def make_capture_step(config, pairs: Sequence[tuple[str, int]]):
    """One jitted function (params, tokens, mask) -> tuple of float32 [B*T, D] per (site, layer)."""
    import jax
    import jax.numpy as jnp

    from psm_jax.model import Capture, forward

    pairs = tuple(pairs)
    key = (config, pairs)
    if key in _STEP_CACHE:
        return _STEP_CACHE[key]
    sites = tuple(dict.fromkeys(s for s, _ in pairs))
    layers = tuple(sorted({l for _, l in pairs}))
    capture = Capture(sites=sites, layers=layers)

    def step(params, tokens, mask):
        out = forward(params, config, tokens, attention_mask=mask, capture=capture, return_logits=False)
        b, t = tokens.shape
        res = []
        for s, l in pairs:
            a = out.captured[s][layers.index(l)]
            res.append(a.reshape(b * t, -1).astype(jnp.float32))
        return tuple(res)

    fn = jax.jit(step)
    _STEP_CACHE[key] = fn
    return fn


def _background(it: Iterator, depth: int) -> Iterator:
    """Run a (deterministic) producer iterator in a daemon thread, `depth` items ahead."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in it:
                if not put((True, item)):
                    return
            put((True, done))
        except BaseException as e:  # re-raised in the consumer
            put((False, e))

    t = threading.Thread(target=work, name="harvest-tokenize", daemon=True)
    t.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()


def _model_parts(model):
    params, config = model.params, model.config
    tokenizer = getattr(model, "tokenizer", None)
    return params, config, tokenizer


def _special_ids(tokenizer) -> tuple[list[int], int | None, int]:
    special = list(getattr(tokenizer, "all_special_ids", []) or [])
    bos = getattr(tokenizer, "bos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return special, bos, 0 if pad is None else int(pad)


def _documents(documents) -> list:
    docs = getattr(documents, "documents", documents)
    return docs


def process_share(documents, index: int | None = None, count: int | None = None) -> list:
    """The documents this process harvests in a multi-process run: those whose corpus index is `index` modulo
    `count` (default: this JAX process and the process count). Deterministic, disjoint, and together the whole
    corpus, so every process harvests its own share and feeds its rows of each global batch to `sae.train.train`."""
    if index is None or count is None:
        import jax

        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    for name, value in (("index", index), ("count", count)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"process_share {name}={value!r}; expected an int")
    if not 0 <= index < count:
        raise ValueError(f"process_share index={index} with count={count}; expected 0 <= index < count")
    docs = list(_documents(documents))
    if len(docs) < count:
        raise ActivationError(f"{len(docs)} document(s) cannot be shared among {count} processes")
    return docs[index::count]


def harvest(model, documents, sites_layers, *, context_len: int = 256, batch_size: int = 8,
            mode: str = "truncate", token_filter: TokenFilter = TokenFilter(), start_context: int = 0,
            truncate_layers: bool = True, encode: Callable[[Any], Encoded] | None = None,
            max_tokens: int | None = None, progress: bool = False, prefetch: int = 2) -> Iterator[ActivationBatch]:
    """Yield an ActivationBatch per forward batch, holding only the kept tokens.

    model: a LoadedModel (params, config, tokenizer) or anything with those attributes.
    documents: a sae.data.corpus.Corpus or a list of message lists / strings.
    sites_layers: [(site, layer), ...]; all captured by ONE jitted forward per batch (the model is cut
        after the deepest requested layer when `truncate_layers`); one device->host copy per batch.
    encode: document -> Encoded (default: psm_jax.chat.encode_chat with the model's tokenizer).
    max_tokens: stop after the batch that reaches this many kept tokens.
    truncate_layers: run only layers 0..max(layer) (a persistent sliced copy of those layers' params
        is held while harvesting; pass False to avoid the copy for very large models).
    prefetch: tokenise up to this many batches ahead in a background thread (0: inline).
    A batch may hold no kept token (e.g. assistant-only filter on user-only contexts); it is still
    yielded so that `context_end` advances.
    """
    params, config, tokenizer = _model_parts(model)
    pairs = _normalize_sites_layers(sites_layers, config.n_layers)
    if context_len > config.max_position:
        raise ActivationError(f"context_len={context_len} exceeds the model's max_position={config.max_position}")
    docs = _documents(documents)
    if len(docs) == 0:
        raise ActivationError("the corpus is empty (nothing to harvest)")
    special, bos, pad = _special_ids(tokenizer) if tokenizer is not None else ([], None, 0)
    if bos is None:
        bos = config.bos_token_id
    if encode is None:
        if tokenizer is None:
            raise ActivationError("the model has no tokenizer; pass `encode=`")
        encode = default_encoder(tokenizer, getattr(model, "chat_template", None))
    if truncate_layers:
        params, config = truncated_model(params, config, max(l for _, l in pairs) + 1)
    from psm_jax.native.amx import kernel_layout
    params = dict(params, layers=kernel_layout(params["layers"]))  # bf16 on AMX: weights as kernel bits, once
    step = make_capture_step(config, pairs)
    rows = encode_documents(docs, context_len, encode, mode=mode, start_context=start_context)
    batches = batch_contexts(rows, batch_size, context_len, pad, token_filter, bos_id=bos, special_ids=special)
    if prefetch:
        batches = _background(batches, prefetch)
    finish = functools.partial(_kept_batch, pairs=pairs, context_len=context_len,
                               doc_names=getattr(documents, "ids", None))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(unit="tok", desc="harvest")
    total, any_batch = 0, False
    for out, cb in _one_behind(batches, step, params):
        any_batch = True
        ab = finish(out, cb)
        total += len(ab)
        if bar is not None:
            bar.update(len(ab))
        yield ab
        if max_tokens is not None and total >= max_tokens:
            break
    if bar is not None:
        bar.close()
    if start_context == 0:
        if not any_batch:
            raise ActivationError("no context could be built from the corpus (every document encoded to 0 tokens)")
        if total == 0:
            raise ActivationError(f"the harvest kept no token: the token filter {token_filter} excludes every "
                                  "token of this corpus (empty corpus after filtering)")


def _one_behind(batches, step, params):
    """(forward output, batch) pairs, each yielded once the next batch's forward is dispatched, so that the host
    reads one batch back while the device runs the next."""
    pending = None
    for cb in batches:
        out = step(params, cb.tokens, cb.attention_mask)
        if pending is not None:
            yield pending
        pending = (out, cb)
    if pending is not None:
        yield pending


def _kept_batch(out, cb: ContextBatch, *, pairs, context_len: int, doc_names) -> ActivationBatch:
    """The kept tokens of one forward batch: every (site, layer) in one device-to-host transfer, with their
    metadata; non-finite activations are refused (`_check_finite`)."""
    import jax

    host = jax.device_get(out)
    flat = np.flatnonzero(cb.keep.reshape(-1))
    acts = {p: np.asarray(h)[flat] for p, h in zip(pairs, host)}
    meta = dict(roles=cb.roles.reshape(-1)[flat], turns=cb.turns.reshape(-1)[flat],
                tokens=cb.tokens.reshape(-1)[flat], doc_ids=cb.doc_ids.reshape(-1)[flat],
                pos=cb.pos.reshape(-1)[flat], context=cb.context[flat // context_len])
    _check_finite(acts, meta, doc_names)
    return ActivationBatch(acts, **meta, context_end=cb.context_end)


def _check_finite(acts: Mapping[tuple[str, int], np.ndarray], meta: Mapping[str, np.ndarray],
                  doc_names: Sequence[str] | None) -> None:
    """Raise NonFiniteActivationError when a kept activation is NaN/inf, naming every affected hook point (the
    shallowest first) and the first affected document (its corpus index and id), context and position: caught
    here, a broken model or edit never reaches the store or the trainer as a NaN loss."""
    bad = [k for k in sorted(acts, key=lambda k: (k[1], k[0])) if not np.isfinite(acts[k]).all()]
    if not bad:
        return
    rows = ~np.isfinite(acts[bad[0]]).all(axis=1)
    first = int(np.flatnonzero(rows)[0])
    d = int(meta["doc_ids"][first])
    name = doc_names[d] if doc_names is not None and 0 <= d < len(doc_names) else str(d)
    raise NonFiniteActivationError(
        f"non-finite activations (NaN/inf) at hook point(s) {[site_key(*k) for k in bad]}: first at "
        f"{site_key(*bad[0])} in document index {d} (id {name!r}), context {int(meta['context'][first])}, token "
        f"position {int(meta['pos'][first])}; {int(rows.sum())} of {len(rows)} kept tokens of this batch affected. "
        "The model's weights (or an edit) produce NaN/inf on this input.")


# ----------------------------------------------------------------------------------------------
# Shuffling across contexts


class ShuffleBuffer:
    """Fixed-size mixing buffer: fill to `capacity` rows, permute, emit half as batches, refill.

    Rows from many contexts mix before a batch is drawn (`capacity` >> context length). The order
    depends only on the incoming rows and `seed` (a numpy Generator or an int).
    """

    def __init__(self, capacity: int, batch_size: int, seed: int | np.random.Generator = 0):
        if batch_size < 1 or capacity < 2 * batch_size:
            raise ActivationError(f"ShuffleBuffer capacity={capacity} must be >= 2 * batch_size={batch_size}")
        self.capacity, self.batch_size = int(capacity), int(batch_size)
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self._data: dict[Any, np.ndarray] | None = None
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _alloc(self, row: Mapping[Any, np.ndarray]):
        self._data = {k: np.empty((self.capacity,) + v.shape[1:], v.dtype) for k, v in row.items()}

    def add(self, rows: Mapping[Any, np.ndarray]) -> Iterator[dict]:
        """Add aligned arrays (dict key -> [m, ...]); yields batches whenever the buffer fills."""
        m = len(next(iter(rows.values())))
        if self._data is None:
            self._alloc(rows)
        elif set(rows) != set(self._data):
            raise ActivationError(f"ShuffleBuffer got keys {sorted(map(str, rows))}, expected "
                                  f"{sorted(map(str, self._data))}")
        s = 0
        while s < m:
            take = min(m - s, self.capacity - self._n)
            for k, v in rows.items():
                self._data[k][self._n:self._n + take] = v[s:s + take]
            self._n += take
            s += take
            if self._n == self.capacity:
                yield from self._emit(self.capacity // 2)

    def _emit(self, n_rows: int) -> Iterator[dict]:
        perm = self.rng.permutation(self._n)
        nb = n_rows // self.batch_size
        for b in range(nb):
            idx = perm[b * self.batch_size:(b + 1) * self.batch_size]
            yield {k: v[idx] for k, v in self._data.items()}
        rest = np.sort(perm[nb * self.batch_size:])
        for k in self._data:
            self._data[k][:len(rest)] = self._data[k][rest]
        self._n = len(rest)

    def drain(self) -> Iterator[dict]:
        """Emit every full batch left (the final partial batch is dropped)."""
        if self._n:
            yield from self._emit(self._n)


def _batch_to_rows(ab: ActivationBatch) -> dict:
    d = {("act",) + k: v for k, v in ab.acts.items()}
    d.update({("meta", k): v for k, v in ab.meta().items()})
    return d


def _rows_to_batch(rows: dict) -> ActivationBatch:
    acts = {k[1:]: v for k, v in rows.items() if k[0] == "act"}
    return ActivationBatch(acts, *(rows[("meta", f)] for f in META_FIELDS))


def stream_batches(model, documents, sites_layers, batch_size: int, *, buffer_size: int = 1 << 16,
                   seed: int = 0, start_batch: int = 0, forward_batch_size: int = 8, **harvest_kw) -> Iterator[tuple[ActivationBatch, dict]]:
    """Train while harvesting: harvest -> ShuffleBuffer -> (batch, cursor), no disk.

    batch_size: rows per yielded training batch; forward_batch_size: contexts per harvest forward;
    other keywords go to `harvest` (context_len, mode, token_filter, ...).
    Yields ActivationBatch (acts for every requested (site, layer) + metadata) with a cursor
    {"mode": "stream", "batches": i}. Passing `start_batch` replays the harvest deterministically and
    skips that many batches (exact but costs the forward again; use an ActivationStore for cheap
    resume). Ends when the corpus is exhausted (the buffer is drained, last partial batch dropped).
    """
    buf = ShuffleBuffer(buffer_size, batch_size, seed)
    i = 0
    emitted = False

    def out(rows):
        nonlocal i, emitted
        i += 1
        if i > start_batch:
            emitted = True
            return _rows_to_batch(rows), {"mode": "stream", "batches": i, "seed": seed, "batch_size": batch_size}
        return None

    for ab in harvest(model, documents, sites_layers, batch_size=forward_batch_size, **harvest_kw):
        if len(ab) == 0:
            continue
        for rows in buf.add(_batch_to_rows(ab)):
            r = out(rows)
            if r is not None:
                yield r
    for rows in buf.drain():
        r = out(rows)
        if r is not None:
            yield r
    if not emitted and start_batch == 0:
        raise ActivationError(f"the harvest produced fewer than batch_size={batch_size} kept tokens "
                              "(empty corpus after filtering?)")
