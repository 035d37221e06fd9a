"""Subprocess worker of the SIGKILL tests (tests/test_kill_*.py): one harvest or training job that the environment
variable PSM_TEST_KILL_AT=<event>:<n> (psm_jax.atomic.kill_point) cuts short with SIGKILL at a chosen point.

    python -m tests.kill_worker harvest <model_dir> <store_dir> <json: harvest_to_store keywords>
    python -m tests.kill_worker train <run_dir> <json: {"cfgs": [...], "source": {...}, "train": {...}}>
    python -m tests.kill_worker replace-dir <folder> <text>

Training jobs add two kill events: "train_step" (after each completed step, from `on_step`) and "orbax_finalize"
(inside Checkpointer.save, after orbax has written the step's temporary folder and before it renames it into
place). A finished job prints "done".
"""
from __future__ import annotations

import json
import sys
import types

import numpy as np

from psm_jax.atomic import kill_point

# A deterministic corpus for the store tests: chat conversations and plain texts of varied lengths.
_rng = np.random.default_rng(0)
CORPUS = [
    ("".join(chr(97 + c) for c in _rng.integers(0, 26, _rng.integers(5, 40))) if i % 3 == 0 else
     [{"role": "user", "content": "".join(chr(97 + c) for c in _rng.integers(0, 26, _rng.integers(1, 12)))},
      {"role": "assistant", "content": "".join(chr(97 + c) for c in _rng.integers(0, 26, _rng.integers(1, 30)))}])
    for i in range(30)
]
PAIRS = [("resid_post", 1), ("mlp_out", 0)]


def tiny_model(model_dir: str):
    """The tiny random Llama saved in `model_dir`, with the fake tokenizer of tests/test_activations.py."""
    from psm_jax.loading.hf import load_hf_dir
    from tests.test_activations import FakeTokenizer

    params, config = load_hf_dir(model_dir)
    return types.SimpleNamespace(params=params, config=config, tokenizer=FakeTokenizer(), source=str(model_dir))


def harvest_options(**kw) -> dict:
    """harvest_to_store keywords shared by the worker and the test's reference harvest."""
    from sae.data.contexts import TokenFilter
    from tests.test_activations import T, fake_encode

    return dict(context_len=T, batch_size=2, chunk_tokens=40, encode=fake_encode,
                token_filter=TokenFilter(skip_first=0), **kw)


def run_harvest(model_dir: str, store: str, options: dict) -> None:
    from sae.data.store import harvest_to_store

    harvest_to_store(tiny_model(model_dir), CORPUS, store, PAIRS, **harvest_options(**options))


def make_source(spec: dict):
    """{"kind": "store", "path", "site", "layer", "batch_size", "seed"} or {"kind": "planted", "d_in", ...}."""
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind == "store":
        from sae.data.sources import StoreSource

        return StoreSource(spec.pop("path"), spec.pop("site"), spec.pop("layer"), spec.pop("batch_size"), **spec)
    from sae.synthetic import PlantedSource

    return PlantedSource(spec.pop("d_in"), spec.pop("n_features"), spec.pop("batch_size"), **spec)


def run_train(run_dir: str, job: dict) -> None:
    from orbax.checkpoint._src.path import atomicity

    from sae.config import SaeConfig
    from sae.train import train

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize_with_kill_point(self, *args, **kwargs):
        if self.get().name.split(".")[0].isdigit():  # the step folder (its items are finalised before it)
            kill_point("orbax_finalize")
        return await finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize_with_kill_point
    cfgs = [SaeConfig.from_dict(d) for d in job["cfgs"]]
    train(cfgs, make_source(job["source"]), run_dir, on_step=lambda step, metrics: kill_point("train_step"),
          **job.get("train", {}))


def run_replace_dir(path: str, text: str) -> None:
    """Replace the folder `path` by one holding file.txt = `text` (psm_jax.atomic.replace_dir)."""
    from psm_jax.atomic import replace_dir

    with replace_dir(path, overwrite=True) as tmp:
        (tmp / "file.txt").write_text(text)


if __name__ == "__main__":
    if sys.argv[1] == "harvest":
        run_harvest(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
    elif sys.argv[1] == "train":
        run_train(sys.argv[2], json.loads(sys.argv[3]))
    elif sys.argv[1] == "replace-dir":
        run_replace_dir(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown job {sys.argv[1]!r}; expected 'harvest', 'train' or 'replace-dir'")
    print("done", flush=True)
