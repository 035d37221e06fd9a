"""Training batch sources: from an array or .npy file (`ArraySource`), from a store (`StoreSource`, and
`StoreStackSource` for one SAE per layer) or streamed straight from the model (`StreamSource`,
`StreamStackSource`, no disk).

The data-source protocol of `sae.train.train`: an iterator of float arrays [batch, d_in], or [n_saes, batch, d_in]
for one stream per SAE. For exact resume it exposes a JSON-able `cursor` (attribute, property or method) and
`seek(cursor)` (or `state_dict()` / `load_state_dict(d)`), read and restored through `get_cursor` / `set_cursor`;
otherwise resume replays the iterator and skips the consumed batches (only right for deterministic iterators).
Every source here keeps an exact cursor.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sae.data.contexts import ActivationError
from sae.data.harvest import stream_batches
from sae.data.store import ActivationStore, _site_width


def get_cursor(source: Any) -> Any:
    """The source's JSON-able cursor (its `cursor` or `state_dict()`), or None when it has neither."""
    c = getattr(source, "cursor", None)
    if c is not None:
        return c() if callable(c) else c
    if hasattr(source, "state_dict"):
        return source.state_dict()
    return None


def set_cursor(source: Any, cursor: Any) -> bool:
    """Moves the source to `cursor` (`seek` or `load_state_dict`); False when it can do neither."""
    if hasattr(source, "seek"):
        source.seek(cursor)
        return True
    if hasattr(source, "load_state_dict"):
        source.load_state_dict(cursor)
        return True
    return False


def _shape_error(message: str) -> ValueError:
    from sae.model import SaeShapeError    # sae.model imports jax, which sae.data does not at module import

    return SaeShapeError(message)


class ArraySource:
    """Batches of rows from an in-memory array or a .npy file (memory-mapped), shuffled per epoch with a seeded
    permutation. cursor = {"epoch", "pos"}; `seek(cursor)` restores it exactly. `loop=False` stops after one epoch
    (an incomplete last batch is dropped)."""

    def __init__(self, data: np.ndarray | str | os.PathLike, batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, loop: bool = True):
        if isinstance(data, (str, os.PathLike)):
            path = Path(data)
            if not path.exists():
                raise FileNotFoundError(f"activation file {path} does not exist")
            data = np.load(path, mmap_mode="r")
        if np.ndim(data) != 2:
            raise _shape_error(f"activation array must be [n_tokens, d_in], got shape {np.shape(data)}")
        if len(data) < batch_size:
            raise ValueError(f"activation array has {len(data)} rows, fewer than one batch of {batch_size}")
        self.data, self.batch_size, self.shuffle, self.seed, self.loop = data, batch_size, shuffle, seed, loop
        self.epoch, self.pos = 0, 0
        self._perm_epoch, self._perm = -1, None

    @property
    def d_in(self) -> int:
        return int(self.data.shape[1])

    @property
    def cursor(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def seek(self, cursor: Mapping[str, int]) -> None:
        self.epoch, self.pos = int(cursor["epoch"]), int(cursor["pos"])

    def _order(self):
        if not self.shuffle:
            return None
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.data))
            self._perm_epoch = self.epoch
        return self._perm

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self.pos + self.batch_size > len(self.data):
            if not self.loop:
                raise StopIteration
            self.epoch, self.pos = self.epoch + 1, 0
        order = self._order()
        sl = slice(self.pos, self.pos + self.batch_size)
        rows = self.data[sl] if order is None else self.data[np.sort(order[sl])]
        self.pos += self.batch_size
        return np.asarray(rows, np.float32)


class StoreSource:
    """Iterator of float32 [batch_size, d_in] arrays from a store, with a JSON `cursor` and `seek(cursor)`.

    The cursor after each batch is exact, so a resumed `sae.train.train` run sees the very same batch sequence.
    Several sources (different seeds, SAEs, layers) can read one store.
    """

    def __init__(self, store: "ActivationStore | str | os.PathLike", site: str, layer: int, batch_size: int, *,
                 seed: int = 0, epochs: int | None = None, roles: Sequence[int | str] | None = None,
                 window_chunks: int = 4, d_in: int | None = None, verify: str = "checksum", prefetch: bool = True):
        self.store = store if isinstance(store, ActivationStore) else ActivationStore(store)
        self.store._check_key(site, layer, d_in)
        self.site, self.layer, self.batch_size, self.seed = site, int(layer), int(batch_size), int(seed)
        self._kw = dict(epochs=epochs, roles=roles, window_chunks=window_chunks, verify=verify, prefetch=prefetch)
        self._cursor = self.store.start_cursor([(site, self.layer)], batch_size, seed, window_chunks=window_chunks,
                                               roles=roles)
        self._it = None

    @property
    def d_in(self) -> int:
        return self.store.d(self.site, self.layer)

    @property
    def cursor(self) -> dict:
        return dict(self._cursor)

    def seek(self, cursor: Mapping[str, Any]) -> None:
        self._close()
        self._cursor = dict(cursor)

    def _close(self):
        if self._it is not None:
            self._it.close()
            self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self._it is None:
            self._it = self.store.batches(self.site, self.layer, self.batch_size, self.seed,
                                          start_cursor=self._cursor, **self._kw)
        batch, self._cursor = next(self._it)
        return batch


class StoreStackSource:
    """[n_keys, batch_size, d] batches of several (site, layer) keys of one `ActivationStore`, rows aligned (the
    same tokens for every key): one SAE per layer (or site) trained in one run, each on its own stream. JSON
    `cursor` and exact `seek`, like `StoreSource`."""

    def __init__(self, store, keys: Sequence[tuple[str, int]], batch_size: int, *, seed: int = 0,
                 epochs: int | None = None, roles: Sequence[int | str] | None = None, window_chunks: int = 4):
        self.store = store if isinstance(store, ActivationStore) else ActivationStore(store)
        self.keys = [(str(site), int(layer)) for site, layer in keys]
        widths = {k: self.store.d(*k) for k in self.keys}
        if len(set(widths.values())) != 1:
            raise _shape_error(f"stacked keys must share one width, got {widths}")
        self.d_in = next(iter(widths.values()))
        self.batch_size, self.seed = int(batch_size), int(seed)
        self._kw = dict(epochs=epochs, roles=roles, window_chunks=window_chunks, with_meta=False)
        self._cursor = self.store.start_cursor(self.keys, batch_size, seed, window_chunks=window_chunks, roles=roles)
        self._it = None

    @property
    def cursor(self) -> dict:
        return dict(self._cursor)

    def seek(self, cursor: Mapping[str, Any]) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None
        self._cursor = dict(cursor)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self._it is None:
            self._it = self.store.iter_batches(self.keys, self.batch_size, self.seed, start_cursor=self._cursor,
                                               **self._kw)
        batch, self._cursor = next(self._it)
        return np.stack([np.asarray(batch.acts[k], np.float32) for k in self.keys])


class StreamSource:
    """Train while harvesting: float32 [batch_size, d_in] arrays of one (site, layer) from `stream_batches`.

    cursor = {"mode": "stream", "batches": n}; `seek` replays the harvest and skips n batches (exact,
    deterministic, but it recomputes the forward: prefer a StoreSource when resuming matters).
    """

    def __init__(self, model, documents, site: str, layer: int, batch_size: int, **stream_kw):
        self._args = (model, documents, [(site, int(layer))], batch_size)
        self._key = (site, int(layer))
        self._kw = stream_kw
        self._n = 0
        self._it = None
        self.d_in = _site_width(model.config, site)

    @property
    def cursor(self) -> dict:
        return {"mode": "stream", "batches": self._n}

    def seek(self, cursor: Mapping[str, Any]) -> None:
        if cursor.get("mode") != "stream":
            raise ActivationError(f"cursor {dict(cursor)!r} is not a streaming cursor")
        if self._it is not None:
            self._it.close()
        self._it, self._n = None, int(cursor["batches"])

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self._it is None:
            self._it = stream_batches(*self._args, start_batch=self._n, **self._kw)
        batch, cur = next(self._it)
        self._n = cur["batches"]
        return self._select(batch)

    def _select(self, batch) -> np.ndarray:
        return batch.acts[self._key]


class StreamStackSource(StreamSource):
    """Train several SAEs from one harvest pass: float32 [n_keys, batch_size, d] arrays, row i of every key from
    the same token (one SAE per hook point, stacked in one `sae.train.train` run). The forward runs once, up to the
    deepest layer asked for. Cursor and `seek` as in StreamSource."""

    def __init__(self, model, documents, keys: Sequence[tuple[str, int]], batch_size: int, **stream_kw):
        self.keys = [(str(site), int(layer)) for site, layer in keys]
        if not self.keys:
            raise ActivationError("StreamStackSource needs at least one (site, layer) key, got none")
        if len(set(self.keys)) != len(self.keys):
            raise ActivationError(f"repeated (site, layer) keys in {self.keys}")
        widths = {f"{site}.{layer}": _site_width(model.config, site) for site, layer in self.keys}
        if len(set(widths.values())) != 1:
            raise ActivationError(f"stacked hook points must share one width, got {widths}")
        super().__init__(model, documents, *self.keys[0], batch_size, **stream_kw)
        self._args = (model, documents, self.keys, batch_size)

    def _select(self, batch) -> np.ndarray:
        return np.stack([np.asarray(batch.acts[k], np.float32) for k in self.keys])
