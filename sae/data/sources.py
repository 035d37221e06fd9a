"""Training batch sources over harvested activations: from a store (`StoreSource`, exact cursors) or
streamed straight from the model (`StreamSource`, no disk)."""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from sae.data.contexts import ActivationError
from sae.data.harvest import stream_batches
from sae.data.store import ActivationStore, _site_width


class StoreSource:
    """Iterator of float32 [batch_size, d_in] arrays from a store, with a JSON `cursor` and `seek(cursor)`.

    The data-source protocol of `sae.train.train`: the cursor after each batch is exact, so a resumed run
    sees the very same batch sequence. Several sources (different seeds, SAEs, layers) can read one store.
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
        widths = {f"{s}.{l}": _site_width(model.config, s) for s, l in self.keys}
        if len(set(widths.values())) != 1:
            raise ActivationError(f"stacked hook points must share one width, got {widths}")
        super().__init__(model, documents, *self.keys[0], batch_size, **stream_kw)
        self._args = (model, documents, self.keys, batch_size)

    def _select(self, batch) -> np.ndarray:
        return np.stack([np.asarray(batch.acts[k], np.float32) for k in self.keys])
