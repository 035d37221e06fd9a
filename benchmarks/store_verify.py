"""Cost of checking activation-store chunks while reading them (sae.data.store.ActivationStore, `verify`).

    python benchmarks/store_verify.py                 # one real-size chunk file: 32768 tokens x 576 (SmolLM2) float32
    python benchmarks/store_verify.py --record        # also append the figures to benchmarks/results.jsonl

Writes one chunk (default chunk_tokens x d_model of the default model) the way harvest_to_store does, then times
`read_chunk` of its activation file from the page cache with verify="size" (no checksum), "checksum" (xxh3_64, the
default: paid the first time a store object loads a file) and "sha256"; median of --repeats fresh store objects.
Prints one JSON line; the figure is the default check's cost relative to the unchecked read.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def write_store(folder: Path, n_tokens: int, d: int) -> None:
    """A one-chunk store holding resid_post.0 [n_tokens, d] float32 (no metadata files)."""
    import numpy as np

    from psm_jax.atomic import atomic_write_json
    from sae.data import store as A

    chunk = folder / "chunks" / "chunk_000000"
    chunk.mkdir(parents=True)
    arr = np.random.default_rng(0).standard_normal((n_tokens, d)).astype(np.float32)
    np.save(chunk / "resid_post.0.npy", arr, allow_pickle=False)
    files = {"resid_post.0.npy": A._file_entry(chunk / "resid_post.0.npy")}
    atomic_write_json(folder / "manifest.json", {
        "format": A.STORE_FORMAT, "version": A.STORE_VERSION, "store_id": uuid.uuid4().hex,
        "sites_layers": [["resid_post", 0]], "d": {"resid_post.0": d}, "n_tokens": n_tokens, "complete": True,
        "chunks": [{"name": chunk.name, "n_tokens": n_tokens, "files": files}]})


def time_reads(folder: Path, verify: str, repeats: int) -> float:
    from sae.data.store import ActivationStore

    times = []
    for _ in range(repeats):
        store = ActivationStore(folder)          # a fresh object: "checksum" verifies on this first load
        t = time.perf_counter()
        store.read_chunk(0, keys=[("resid_post", 0)], meta=(), verify=verify)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1 << 15, help="rows of the chunk (harvest_to_store's chunk_tokens)")
    ap.add_argument("--d", type=int, default=576, help="activation width (SmolLM2-135M d_model)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "store"
        write_store(folder, args.tokens, args.d)
        time_reads(folder, "size", 2)            # warm the page cache
        ms = {v: 1e3 * time_reads(folder, v, args.repeats) for v in ("size", "checksum", "sha256")}
    mb = args.tokens * args.d * 4 / 1e6
    ratio = ms["checksum"] / ms["size"]
    row = {"chunk_mb": round(mb, 1), **{f"read_ms_{k}": round(v, 1) for k, v in ms.items()},
           "checksum_over_read": round(ratio, 2)}
    print(json.dumps(row))
    if args.record:
        from benchmarks.record import record

        record("store_chunk_checksum_verify_cost", round(ratio, 2), "x (read time, xxh3_64 checked / unchecked)",
               f"read_chunk of a {mb:.1f} MB chunk file ({args.tokens}x{args.d} float32) from the page cache: "
               f"{ms['size']:.1f} ms unchecked, {ms['checksum']:.1f} ms with the default xxh3_64 check (first load), "
               f"{ms['sha256']:.1f} ms with sha256; median of {args.repeats}", **row)


if __name__ == "__main__":
    main()
