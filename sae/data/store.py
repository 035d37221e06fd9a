"""The on-disk activation store: chunked, resumable harvests with a manifest, read back in shuffled windows.

Store layout (`ActivationStore`)::

    <dir>/manifest.json                   written last, atomically (temp + fsync + rename)
    <dir>/docs.json                       corpus document ids (index -> id) and the corpus report
    <dir>/chunks/chunk_000000/<site>.<layer>.npy, roles.npy, turns.npy, tokens.npy,
                               doc_ids.npy, pos.npy, context.npy
A chunk directory is built under a temporary name and renamed into place; only chunks listed in the
manifest exist for readers. A harvest killed at any point (even by SIGKILL: tests/test_kill_store.py)
resumes after the last listed chunk (a chunk directory without a manifest entry is deleted and
rewritten) and writes chunk files bit-identical to an uninterrupted harvest. The manifest records the
size, xxh3_64 and sha256 of every chunk file; readers check the xxh3_64 hash (a fast non-cryptographic
hash, from the xxhash package `datasets` depends on) the first time a store object loads a file
(`verify`), so flipped bytes raise ChunkError instead of feeding garbage to training.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from sae.data.contexts import ActivationError, Encoded, TokenFilter, role_id
from sae.data.harvest import (META_DTYPES, META_FIELDS, ActivationBatch, _documents, _model_parts,
                              _normalize_sites_layers, harvest, site_key)

STORE_FORMAT = "psm-jax-activation-store"
STORE_VERSION = 1
STORE_DTYPES = ("float32", "float16")
VERIFY_MODES = ("checksum", "sha256", "size", "none")


class ChunkError(ActivationError):
    """A store chunk is missing or corrupt (message names the file)."""


# ----------------------------------------------------------------------------------------------
# On-disk store


# psm_jax.atomic is imported lazily, like every psm_jax import here: `import sae.data` stays free of jax.

def _fsync_dir(path: Path):
    from psm_jax.atomic import fsync_dir

    fsync_dir(path)


def _atomic_write_json(path: Path, obj) -> None:
    from psm_jax.atomic import atomic_write_json

    atomic_write_json(path, obj, indent=1, sync_dir=True)


def _kill_point(event: str) -> None:
    from psm_jax.atomic import kill_point

    kill_point(event)


def _checksum(algo: str, data) -> str:
    """Hex digest of a bytes-like object: "xxh3_64" (the cheap default check; benchmarks/store_verify.py measures
    it) or "sha256" (the full audit of `verify()`)."""
    if algo == "xxh3_64":
        import xxhash

        return xxhash.xxh3_64_hexdigest(data)
    return hashlib.sha256(data).hexdigest()


def _read_bytes(path: Path) -> np.ndarray:
    """The whole file as a writable uint8 array (one read, no zero-filled buffer)."""
    buf = np.empty(path.stat().st_size, np.uint8)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        got = 0
        while got < len(buf):
            n = f.readinto(view[got:])
            if not n:
                raise ChunkError(f"{path}: file shrank while it was read ({got} of {len(buf)} bytes)")
            got += n
    return buf


def _parse_npy(buf: np.ndarray) -> np.ndarray:
    """The array of a .npy file held in `buf` (a view of its data when the header allows, else a copy)."""
    import io

    head = io.BytesIO(buf[:1 << 16].tobytes())
    version = np.lib.format.read_magic(head)
    if version not in ((1, 0), (2, 0)):
        return np.load(io.BytesIO(buf.tobytes()), allow_pickle=False)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = reader(head)
    if dtype.hasobject:
        raise ValueError(f"object dtype {dtype} in an activation store file")
    count = int(np.prod(shape, dtype=np.int64))
    data = buf[head.tell():head.tell() + count * dtype.itemsize]
    if len(data) != count * dtype.itemsize:
        raise ValueError(f"{len(data)} data bytes for shape {shape} {dtype}")
    return data.view(dtype).reshape(shape, order="F" if fortran else "C")


def _file_entry(path: Path) -> dict:
    """Manifest entry of a written chunk file: size, xxh3_64 and sha256 of its bytes."""
    buf = _read_bytes(path)
    return {"bytes": len(buf), "xxh3_64": _checksum("xxh3_64", buf), "sha256": _checksum("sha256", buf)}


def _corpus_fingerprint(ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode())
        h.update(b"\0")
    return h.hexdigest()


class ActivationStore:
    """A harvested activation store (read side). Open with `ActivationStore(path)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.is_file():
            raise ActivationError(f"{self.path} is not an activation store (no manifest.json)")
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise ChunkError(f"{mpath}: corrupt manifest ({e})") from e
        if self.manifest.get("format") != STORE_FORMAT:
            raise ActivationError(f"{mpath}: not a {STORE_FORMAT} manifest")
        if self.manifest.get("version") != STORE_VERSION:
            raise ActivationError(f"{mpath}: store version {self.manifest.get('version')}, expected {STORE_VERSION}")
        self._checked: set[str] = set()  # files whose checksum this object verified (verify="checksum")

    # -- description
    @property
    def sites_layers(self) -> list[tuple[str, int]]:
        return [(s, int(l)) for s, l in self.manifest["sites_layers"]]

    @property
    def chunks(self) -> list[dict]:
        return self.manifest["chunks"]

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def d(self, site: str, layer: int) -> int:
        self._check_key(site, layer)
        return int(self.manifest["d"][site_key(site, layer)])

    def _check_key(self, site: str, layer: int, d_in: int | None = None):
        if (site, int(layer)) not in self.sites_layers:
            raise ActivationError(f"({site!r}, {layer}) is not in the store {self.path}; it holds "
                                  f"{self.sites_layers}")
        if d_in is not None:
            d = int(self.manifest["d"][site_key(site, layer)])
            if int(d_in) != d:
                raise ActivationError(f"d_in={d_in} does not match the store's {site}.{layer} width d={d} "
                                      f"({self.path})")

    def doc_ids(self) -> list[str]:
        """Corpus document id for each doc index stored in `doc_ids` arrays."""
        return json.loads((self.path / "docs.json").read_text())["ids"]

    # -- chunk access
    def _file(self, chunk: dict, name: str) -> Path:
        return self.path / "chunks" / chunk["name"] / name

    def read_chunk(self, i: int, keys: Sequence[tuple[str, int]] | None = None, meta: Sequence[str] = META_FIELDS,
                   verify: str = "checksum") -> dict:
        """Arrays of chunk i: {(site, layer): float32 [n, D], "roles": ..., ...}. `verify` as in `iter_batches`."""
        chunk = self.chunks[i]
        keys = self.sites_layers if keys is None else keys
        names = [(k, site_key(*k) + ".npy") for k in keys] + [(m, m + ".npy") for m in meta]
        out = {}
        for k, fname in names:
            arr = self._load(chunk, fname, verify)
            if len(arr) != chunk["n_tokens"]:
                raise ChunkError(f"{self._file(chunk, fname)}: {len(arr)} rows, manifest says {chunk['n_tokens']}")
            if isinstance(k, tuple):
                arr = arr.astype(np.float32, copy=False)
            out[k] = arr
        return out

    def _load(self, chunk: dict, fname: str, verify: str) -> np.ndarray:
        if verify not in VERIFY_MODES:
            raise ActivationError(f"verify={verify!r}; expected one of {VERIFY_MODES}")
        p = self._file(chunk, fname)
        info = chunk["files"].get(fname)
        if info is None:
            raise ChunkError(f"{p}: not listed in the manifest of {self.path}")
        if not p.is_file():
            raise ChunkError(f"{p}: chunk file is missing")
        if verify != "none" and p.stat().st_size != info["bytes"]:
            raise ChunkError(f"{p}: size {p.stat().st_size} bytes, manifest says {info['bytes']} (corrupt chunk)")
        algo = None
        if verify == "sha256":
            algo = "sha256"
        elif verify == "checksum" and str(p) not in self._checked:
            algo = "xxh3_64" if "xxh3_64" in info else "sha256"  # stores written before xxh3_64 was recorded
        buf = _read_bytes(p)
        if algo is not None:
            actual = _checksum(algo, buf)
            if actual != info[algo]:
                raise ChunkError(f"{p}: {algo} {actual}, manifest says {info[algo]} (corrupt chunk: the file has "
                                 "the bytes of another write or flipped bytes; re-harvest it)")
            self._checked.add(str(p))
        try:
            return _parse_npy(buf)
        except Exception as e:
            raise ChunkError(f"{p}: unreadable chunk file ({type(e).__name__}: {e})") from e

    def verify(self) -> None:
        """Check every chunk file against the manifest's sizes and sha256 (raises ChunkError)."""
        for chunk in self.chunks:
            for fname in chunk["files"]:
                self._load(chunk, fname, "sha256")

    # -- shuffled batches
    def _stream_ident(self, keys, batch_size, seed, window_chunks, role_sel) -> dict:
        return dict(seed=int(seed), batch_size=int(batch_size), window_chunks=int(window_chunks),
                    keys=[[s, int(l)] for s, l in keys], roles=role_sel, n_chunks=len(self.chunks),
                    n_tokens=self.n_tokens, store=self.manifest["store_id"])

    def start_cursor(self, keys: Sequence[tuple[str, int]], batch_size: int, seed: int = 0, *,
                     window_chunks: int = 4, roles: Sequence[int | str] | None = None) -> dict:
        """The cursor of a stream's very first batch (what `iter_batches` starts from by default)."""
        role_sel = None if roles is None else sorted({role_id(r) for r in roles})
        return dict(self._stream_ident(keys, batch_size, seed, window_chunks, role_sel), epoch=0, window=0, offset=0)

    def batches(self, site: str, layer: int, batch_size: int, seed: int = 0, start_cursor: dict | None = None,
                **kw) -> Iterator[tuple[np.ndarray, dict]]:
        """Shuffled float32 [batch_size, D] batches of one (site, layer), each with the cursor after it.

        Passing a yielded cursor back as `start_cursor` continues with exactly the next batch.
        Keyword options as in `iter_batches` (epochs, window_chunks, roles, d_in, verify).
        """
        kw.setdefault("with_meta", False)
        for b, cur in self.iter_batches([(site, layer)], batch_size, seed, start_cursor, **kw):
            yield b.acts[(site, int(layer))], cur

    def iter_batches(self, keys: Sequence[tuple[str, int]], batch_size: int, seed: int = 0,
                     start_cursor: dict | None = None, *, epochs: int | None = None, window_chunks: int = 4,
                     roles: Sequence[int | str] | None = None, d_in: int | None = None, with_meta: bool = True,
                     verify: str = "checksum", prefetch: bool = True) -> Iterator[tuple[ActivationBatch, dict]]:
        """Shuffled ActivationBatches holding every key in `keys` (aligned rows), with cursors.

        Order: per epoch e, chunks are permuted with default_rng([seed, e]); consecutive groups of
        `window_chunks` chunks are loaded together and their rows permuted with
        default_rng([seed, e, w]); batches are consecutive slices of that stream (a batch may span
        two windows; the last partial batch of an epoch is dropped). The cursor
        {"epoch", "window", "offset", ...} names the next row; it is plain JSON.
        roles: keep only rows with these roles (applied before the permutation).
        epochs: None for an endless stream.
        prefetch: load the next window in a background thread while the current one is served.
        verify: "checksum" (default: sizes, plus the xxh3_64 hash of each file the first time this store
            object loads it; benchmarks/store_verify.py measures its cost), "sha256" (full hash on every
            load), "size" (sizes only) or "none".
        """
        keys = [(s, int(l)) for s, l in keys]
        for s, l in keys:
            self._check_key(s, l, d_in)
        if batch_size < 1:
            raise ActivationError(f"batch_size={batch_size}; expected >= 1")
        if not self.chunks:
            raise ActivationError(f"the store {self.path} holds no chunks")
        role_sel = None if roles is None else sorted({role_id(r) for r in roles})
        ident = self._stream_ident(keys, batch_size, seed, window_chunks, role_sel)
        epoch, window, offset = 0, 0, 0
        if start_cursor is not None:
            for k, v in ident.items():
                if start_cursor.get(k) != v:
                    raise ActivationError(f"cursor does not match this stream: {k}={start_cursor.get(k)!r}, "
                                          f"expected {v!r}")
            epoch, window, offset = (int(start_cursor[k]) for k in ("epoch", "window", "offset"))
        if window_chunks < 1:
            raise ActivationError(f"window_chunks={window_chunks}; expected >= 1")
        if verify not in VERIFY_MODES:
            raise ActivationError(f"verify={verify!r}; expected one of {VERIFY_MODES}")
        n_windows = -(-len(self.chunks) // window_chunks)
        meta = META_FIELDS if with_meta else (("roles",) if role_sel is not None else ())
        load = functools.partial(self._load_window, keys, meta, verify, role_sel, seed, window_chunks)
        windows = _WindowSource(load, _window_schedule(epoch, window, n_windows, epochs), prefetch)
        try:
            yield from self._serve(windows.get, keys, ident, batch_size, epochs, n_windows, epoch, window, offset,
                                   role_sel)
        finally:
            windows.close()

    def _load_window(self, keys, meta, verify: str, role_sel, seed: int, window_chunks: int, e: int, w: int) -> dict:
        """Window w of epoch e: its chunks (epoch e's chunk permutation), rows of the selected roles, permuted."""
        order = np.random.default_rng([seed, e]).permutation(len(self.chunks))
        ids = order[w * window_chunks:(w + 1) * window_chunks]
        parts = [self.read_chunk(int(i), keys, meta, verify) for i in ids]
        data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if role_sel is not None:
            sel = np.isin(data["roles"], role_sel)
            data = {k: v[sel] for k, v in data.items()}
        perm = np.random.default_rng([seed, e, w]).permutation(len(data[keys[0]]))
        return {k: v[perm] for k, v in data.items()}

    def _serve(self, get_window, keys, ident, batch_size, epochs, n_windows, epoch, window, offset, role_sel):
        while epochs is None or epoch < epochs:
            pieces: list[dict] = []
            have = 0
            epoch_rows = 0
            yielded = False
            fresh = window == 0 and offset == 0
            w, off = window, offset
            while w < n_windows:
                data = get_window(epoch, w)
                n = len(data[keys[0]])
                epoch_rows += n
                while off < n:
                    take = min(batch_size - have, n - off)
                    pieces.append({k: v[off:off + take] for k, v in data.items()})
                    have += take
                    off += take
                    if have == batch_size:
                        cat = {k: np.concatenate([p[k] for p in pieces]) if len(pieces) > 1 else pieces[0][k]
                               for k in pieces[0]}
                        nw, no = (w + 1, 0) if off >= n else (w, off)
                        cursor = dict(ident, epoch=epoch, window=nw, offset=no)
                        yielded = True
                        yield _store_batch(cat, keys), cursor
                        pieces, have = [], 0
                w, off = w + 1, 0
            if fresh and not yielded:
                what = "rows" if role_sel is None else f"rows with roles {role_sel}"
                raise ActivationError(f"the store {self.path} holds {epoch_rows} {what}, fewer than "
                                      f"batch_size={batch_size}")
            epoch, window, offset = epoch + 1, 0, 0


def _store_batch(cat: dict, keys) -> ActivationBatch:
    acts = {k: cat[k] for k in keys}
    meta = {f: cat.get(f, np.zeros(0, META_DTYPES[f])) for f in META_FIELDS}
    return ActivationBatch(acts, **meta)


def _manifest_config(model, pairs, d, context_len, mode, token_filter, dtype, doc_ids, corpus_report):
    config = model.config
    ident = {"source": str(getattr(model, "source", None)), "family": config.family,
             "n_layers": config.n_layers, "d_model": config.d_model}
    param_dtype = str(np.dtype(model.params["embed"].dtype))
    if param_dtype != "float32":       # a bf16 harvest never resumes into (or mixes with) a float32 one
        ident["param_dtype"] = param_dtype
    return {
        "model": ident,
        "sites_layers": [[s, l] for s, l in pairs],
        "sites": list(dict.fromkeys(s for s, _ in pairs)),
        "layers": sorted({l for _, l in pairs}),
        "d": d,
        "d_model": config.d_model,
        "dtype": dtype,
        "context_len": context_len,
        "mode": mode,
        "token_filter": token_filter.to_dict(),
        "corpus": {"n_documents": len(doc_ids), "fingerprint": _corpus_fingerprint(doc_ids),
                   "report": corpus_report},
    }


_MATCH_KEYS = ("model", "sites_layers", "dtype", "context_len", "mode", "token_filter")


def harvest_to_store(model, documents, path: str | os.PathLike, sites_layers, *, context_len: int = 256,
                     batch_size: int = 8, mode: str = "truncate", token_filter: TokenFilter = TokenFilter(),
                     chunk_tokens: int = 1 << 15, max_tokens: int | None = None, dtype: str = "float32",
                     encode: Callable[[Any], Encoded] | None = None, progress: bool = False,
                     truncate_layers: bool = True, overwrite: bool = False) -> ActivationStore:
    """Harvest into an on-disk store at `path`, resuming an unfinished store there.

    Chunks hold >= chunk_tokens kept tokens (whole forward batches; the last chunk may be smaller).
    Resuming checks that model, sites/layers, context_len, mode, filter, dtype and the corpus match
    the manifest (raises otherwise) and restarts after the last chunk listed in the manifest.
    max_tokens: stop once the store holds at least this many tokens (a later call with a larger
    budget continues the same store). `overwrite=True` deletes an existing store first.
    Crash points named for psm_jax.atomic.kill_point: "store_docs" (docs.json written, no manifest yet),
    "chunk_file" (a chunk file written but not flushed), "chunk_renamed" (a chunk in place, not yet in
    the manifest), "manifest_updated" (a chunk listed in the manifest).
    """
    path = Path(path)
    if dtype not in STORE_DTYPES:
        raise ActivationError(f"dtype={dtype!r}; expected one of {STORE_DTYPES}")
    if chunk_tokens < 1:
        raise ActivationError(f"chunk_tokens={chunk_tokens}; expected >= 1")
    _, config, _ = _model_parts(model)
    pairs = _normalize_sites_layers(sites_layers, config.n_layers)
    corpus_report = getattr(getattr(documents, "report", None), "to_dict", lambda: None)()
    docs = _documents(documents)
    if len(docs) == 0:
        raise ActivationError("the corpus is empty (nothing to harvest)")
    doc_ids = list(getattr(documents, "ids", None) or [str(i) for i in range(len(docs))])
    d = {site_key(s, l): _site_width(config, s) for s, l in pairs}
    cfg = _manifest_config(model, pairs, d, context_len, mode, token_filter, dtype, doc_ids, corpus_report)
    manifest = _open_store(path, cfg, doc_ids, corpus_report, overwrite)
    _remove_orphans(path, manifest)
    if manifest["complete"] or (max_tokens is not None and manifest["n_tokens"] >= max_tokens):
        return ActivationStore(path)
    batches = harvest(model, documents, pairs, context_len=context_len, batch_size=batch_size, mode=mode,
                      token_filter=token_filter, start_context=manifest["n_contexts"], encode=encode,
                      progress=progress, truncate_layers=truncate_layers)
    manifest = _write_chunks(path, manifest, batches, chunk_tokens=chunk_tokens, max_tokens=max_tokens, dtype=dtype)
    if manifest["n_tokens"] == 0:
        raise ActivationError("the harvest kept no token (empty corpus after filtering, or a token filter "
                              f"that excludes everything: {token_filter})")
    return ActivationStore(path)


def _open_store(path: Path, cfg: dict, doc_ids: list, corpus_report, overwrite: bool) -> dict:
    """The manifest of the store at `path`: an existing one, checked against this harvest's settings and corpus,
    or a new empty store (docs.json, then the manifest). `overwrite` first deletes an existing store, and only a
    store: any other non-empty folder is refused."""
    mpath = path / "manifest.json"
    if overwrite and path.exists():
        if path.is_dir() and (mpath.exists() or (path / "chunks").exists() or _only_new_store_files(path)):
            shutil.rmtree(path)
        elif any(path.iterdir()) if path.is_dir() else True:
            raise ActivationError(f"refusing to overwrite {path}: it is not an activation store")
    if mpath.exists():
        manifest = ActivationStore(path).manifest
        for k in _MATCH_KEYS:
            if manifest[k] != cfg[k]:
                raise ActivationError(f"the store at {path} was harvested with a different {k}: "
                                      f"{manifest[k]!r} vs {cfg[k]!r} (use another directory or overwrite=True)")
        if manifest["corpus"]["fingerprint"] != cfg["corpus"]["fingerprint"]:
            raise ActivationError(f"the store at {path} was harvested from a different corpus "
                                  "(document ids differ); use another directory or overwrite=True")
        return manifest
    if path.exists() and not _only_new_store_files(path):
        raise ActivationError(f"{path} exists, is not empty and has no manifest.json; refusing to write there")
    path.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(path / "docs.json", {"ids": doc_ids, "report": corpus_report})
    _kill_point("store_docs")
    manifest = dict(format=STORE_FORMAT, version=STORE_VERSION, store_id=uuid.uuid4().hex, **cfg,
                    n_tokens=0, n_contexts=0, complete=False, chunks=[], created=time.time())
    _atomic_write_json(mpath, manifest)
    return manifest


def _remove_orphans(path: Path, manifest: dict) -> None:
    """Delete what a killed harvest left behind: temporary files of an atomic write, temporary chunk folders and
    chunks the manifest does not list."""
    for p in path.glob(".*.tmp"):
        if p.is_file():
            p.unlink()
    chunks_dir = path / "chunks"
    chunks_dir.mkdir(exist_ok=True)
    listed = {c["name"] for c in manifest["chunks"]}
    for p in chunks_dir.iterdir():
        if p.name not in listed:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _write_chunks(path: Path, manifest: dict, batches, *, chunk_tokens: int, max_tokens: int | None,
                  dtype: str) -> dict:
    """Write the harvested batches as chunks of >= chunk_tokens tokens (whole batches; the last may be smaller) and
    return the final manifest. The store is marked complete when the corpus runs out, not when max_tokens stops
    the harvest (a later call with a larger budget continues it)."""
    pending: list[ActivationBatch] = []
    n_pending, exhausted = 0, True
    for ab in batches:
        pending.append(ab)
        n_pending += len(ab)
        if n_pending >= chunk_tokens:
            manifest, pending, n_pending = _write_chunk(path, manifest, pending, dtype), [], 0
        if max_tokens is not None and manifest["n_tokens"] + n_pending >= max_tokens:
            exhausted = False
            break
    if pending:
        manifest = _write_chunk(path, manifest, pending, dtype)
    if exhausted:
        manifest = dict(manifest, complete=True, updated=time.time())
        _atomic_write_json(path / "manifest.json", manifest)
    return manifest


def _write_chunk(path: Path, manifest: dict, pending: list, dtype: str) -> dict:
    """One chunk, crash-safe: its arrays written and fsynced in a temporary folder, renamed into place, then listed
    in a new manifest (written atomically), which is returned. A kill before the manifest update leaves an
    unlisted chunk that `_remove_orphans` deletes on resume."""
    chunks_dir = path / "chunks"
    ab = ActivationBatch.concat(pending)
    ctx_end = max(b.context_end for b in pending)
    name = f"chunk_{len(manifest['chunks']):06d}"
    tmp = chunks_dir / f".tmp_{name}_{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    arrays = {site_key(*k) + ".npy": v.astype(dtype) for k, v in ab.acts.items()}
    arrays.update({f + ".npy": getattr(ab, f).astype(META_DTYPES[f]) for f in META_FIELDS})
    files = {}
    for fname, arr in arrays.items():
        fp = tmp / fname
        with open(fp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
            _kill_point("chunk_file")
            f.flush()
            os.fsync(f.fileno())
        files[fname] = _file_entry(fp)
    _fsync_dir(tmp)
    final_dir = chunks_dir / name
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.rename(tmp, final_dir)
    _fsync_dir(chunks_dir)
    _kill_point("chunk_renamed")
    entry = {"name": name, "n_tokens": len(ab), "context_start": manifest["n_contexts"],
             "context_end": int(ctx_end), "files": files}
    manifest = dict(manifest, chunks=manifest["chunks"] + [entry], n_tokens=manifest["n_tokens"] + len(ab),
                    n_contexts=int(ctx_end), updated=time.time())
    _atomic_write_json(path / "manifest.json", manifest)
    _kill_point("manifest_updated")
    return manifest


def _window_schedule(e: int, w: int, n_windows: int, epochs: int | None):
    """(epoch, window) pairs in stream order from (e, w); endless when epochs is None."""
    if w >= n_windows:
        e, w = e + 1, 0
    while epochs is None or e < epochs:
        yield e, w
        w += 1
        if w >= n_windows:
            e, w = e + 1, 0


class _WindowSource:
    """Windows by (epoch, window). With prefetch, one background thread loads the next window of the schedule
    while the current one is served; `close` cancels what is queued and joins the thread."""

    def __init__(self, load: Callable[[int, int], dict], schedule, prefetch: bool):
        self.load, self.order, self.ahead = load, schedule, {}
        self.pool = None
        if prefetch:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-prefetch")

    def get(self, e: int, w: int) -> dict:
        if self.pool is None:
            return self.load(e, w)
        while (e, w) not in self.ahead:
            nxt = next(self.order, None)
            if nxt is None:
                return self.load(e, w)
            self.ahead[nxt] = self.pool.submit(self.load, *nxt)
        fut = self.ahead.pop((e, w))
        nxt = next(self.order, None)  # queue one window ahead
        if nxt is not None:
            self.ahead[nxt] = self.pool.submit(self.load, *nxt)
        return fut.result()

    def close(self) -> None:
        if self.pool is not None:
            for f in self.ahead.values():
                f.cancel()
            self.pool.shutdown(wait=True)


def _only_new_store_files(path: Path) -> bool:
    """True for a folder holding nothing, or only what a harvest killed before its first manifest leaves
    (docs.json, temporary files of atomic writes): a fresh store may be started there."""
    return path.is_dir() and all(p.name == "docs.json" or (p.name.startswith(".") and p.name.endswith(".tmp"))
                                 for p in path.iterdir())


def _site_width(config, site: str) -> int:
    """Flattened activation width of a site."""
    if site in ("q", "q_prerope"):
        return config.n_heads * config.head_dim
    if site in ("k", "v", "k_prerope"):
        return config.n_kv_heads * config.head_dim
    return config.d_model
