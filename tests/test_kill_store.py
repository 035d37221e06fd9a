"""An activation-store harvest killed with SIGKILL (real subprocesses, tests/kill_worker.py) at several points, then
resumed, writes chunk files bit-identical (sha256 of every file) to an uninterrupted harvest; at every kill, the
chunks the manifest lists are already the final ones (nothing half-written is ever listed)."""
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from psm_jax.atomic import KILL_ENV
from sae.data.store import harvest_to_store
from tests.kill_worker import CORPUS, PAIRS, harvest_options, tiny_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory) -> Path:
    """A persistent XLA compilation cache shared by the workers of this session (each compiles the same programs)."""
    return tmp_path_factory.mktemp("jax_cache")


def run_worker(args, kill: str | None, jax_cache: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(jax_cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    if kill:
        env[KILL_ENV] = kill
    return subprocess.run([sys.executable, "-m", "tests.kill_worker", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -signal.SIGKILL, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"


def chunk_digests(store: Path, names=None) -> dict[str, str]:
    """sha256 of every file of the named chunks (default: all chunk folders)."""
    dirs = sorted(p for p in (store / "chunks").iterdir() if not p.name.startswith("."))
    if names is not None:
        dirs = [store / "chunks" / n for n in names]
    return {f"{d.name}/{f.name}": hashlib.sha256(f.read_bytes()).hexdigest() for d in dirs for f in sorted(d.iterdir())}


def listed(store: Path) -> list[str]:
    return [c["name"] for c in json.loads((store / "manifest.json").read_text())["chunks"]]


def on_disk(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "chunks").iterdir() if not p.name.startswith("."))


# what the store looks like right after a kill at each event (besides "the listed chunks are final")
KILL_STATE = {
    "store_docs": lambda s: (s / "docs.json").is_file() and not (s / "manifest.json").exists(),
    "chunk_file": lambda s: any(p.name.startswith(".tmp_chunk_") for p in (s / "chunks").iterdir()),
    "chunk_renamed": lambda s: len(on_disk(s)) == len(listed(s)) + 1,
    "manifest_updated": lambda s: on_disk(s) == listed(s) and not list(s.glob(".*.tmp")),
    "atomic_replace": lambda s: bool(list(s.glob(".manifest.json.*.tmp"))) and len(on_disk(s)) == len(listed(s)) + 1,
}

KILL_CHAINS = {   # store options, then the kill points of successive runs on the same store (n counts per process)
    "truncate-float32": (dict(mode="truncate", dtype="float32"), ["store_docs:1", "chunk_file:11", "manifest_updated:2"]),
    "pack-float16": (dict(mode="pack", dtype="float16"), ["chunk_renamed:2", "atomic_replace:2"]),
    "split-float16-every-point": (dict(mode="split", dtype="float16"),
                                  ["store_docs:1", "chunk_file:3", "chunk_renamed:1", "atomic_replace:1",
                                   "manifest_updated:1", "chunk_file:16", "atomic_replace:3"]),
}
SLOW_CHAINS = {"split-float16-every-point"}


@pytest.mark.parametrize("chain", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CHAINS else c
                                   for c in KILL_CHAINS])
def test_harvest_killed_repeatedly_resumes_bit_identical(chain, tiny_hf, jax_cache, tmp_path):
    options, kills = KILL_CHAINS[chain]
    model_dir, _ = tiny_hf("llama")
    model = tiny_model(model_dir)
    ref = tmp_path / "ref"
    harvest_to_store(model, CORPUS, ref, PAIRS, **harvest_options(**options))
    want = chunk_digests(ref)
    n_chunks = len(listed(ref))
    assert n_chunks >= 6

    store = tmp_path / "store"
    for kill in kills:
        assert_killed(run_worker(["harvest", model_dir, store, json.dumps(options)], kill, jax_cache))
        event = kill.split(":")[0]
        assert KILL_STATE[event](store), f"after the kill at {kill}: {sorted(os.listdir(store))}"
        if (store / "manifest.json").exists():
            names = listed(store)
            assert len(names) < n_chunks                       # killed before the end; what is listed is final
            assert chunk_digests(store, names) == {k: v for k, v in want.items() if k.split("/")[0] in names}

    st = harvest_to_store(model, CORPUS, store, PAIRS, **harvest_options(**options))   # the last resume
    assert st.complete and chunk_digests(store) == want
    got, ref_man = (json.loads((p / "manifest.json").read_text()) for p in (store, ref))
    assert got["chunks"] == ref_man["chunks"] and got["n_tokens"] == ref_man["n_tokens"]
    assert (store / "docs.json").read_bytes() == (ref / "docs.json").read_bytes()
    assert not list(store.glob(".*.tmp")) and not list((store / "chunks").glob(".*"))
