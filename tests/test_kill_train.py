"""SAE training killed with SIGKILL (real subprocesses, tests/kill_worker.py) mid-run and inside a checkpoint save
(after orbax wrote the step's temporary folder, before its rename) resumes to the very state of an uninterrupted run:
every leaf of params, Adam state, dead counters, PRNG key and step compared exactly."""
import json

import numpy as np
import pytest

from sae.data.sources import StoreSource
from sae.data.store import harvest_to_store
from sae.checkpoint import flatten_state
from sae.config import SaeConfig
from sae.train import train
from tests.kill_worker import CORPUS, harvest_options, make_source, tiny_model
from tests.test_kill_store import assert_killed, jax_cache, run_worker  # noqa: F401  (fixture)

PLANTED = {"kind": "planted", "d_in": 16, "n_features": 32, "batch_size": 128, "seed": 3}
SINGLE = {
    "jumprelu": SaeConfig(architecture="jumprelu", d_in=16, d_sae=64, batch_size=128, lr=3e-3, total_steps=12,
                          l0_coef=0.02, jumprelu_bandwidth=0.05, geometric_median_iters=3),
    "batchtopk": SaeConfig(architecture="batchtopk", d_in=16, d_sae=64, k=3, batch_size=128, lr=3e-3,
                           total_steps=12, dead_tokens_threshold=128 * 3, geometric_median_iters=3),
}


def assert_same_state(got, want) -> None:
    a, b = flatten_state(got), flatten_state(want)
    assert sorted(a) == sorted(b) and any(k.startswith("opt.") for k in a)
    for name in b:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)


def checkpoint_dirs(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def log_steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def kill_then_resume(tmp_path, jax_cache, cfgs, source: dict, kills: list[str], checkpoint_every: int, **train_kw):
    """Run the job in subprocesses killed at each point of `kills` in turn, then resume in this process; returns
    (resumed result, reference result of an uninterrupted run here, in one checkpoint folder). `train_kw` go to
    the killed and the resumed runs."""
    run = tmp_path / "killed"
    job = {"cfgs": [c.to_dict() for c in cfgs], "source": source,
           "train": {"checkpoint_every": checkpoint_every, **train_kw}}
    for kill in kills:
        assert_killed(run_worker(["train", run, json.dumps(job)], kill, jax_cache))
        yield run
    ref = train(cfgs, make_source(source), tmp_path / "ref", checkpoint_every=checkpoint_every)
    got = train(cfgs, make_source(source), run, checkpoint_every=checkpoint_every, **train_kw)
    yield got, ref


@pytest.mark.parametrize("arch", ["jumprelu", pytest.param("batchtopk", marks=pytest.mark.slow)])
def test_kill_inside_checkpoint_save_resumes_exactly(arch, jax_cache, tmp_path):
    runs = kill_then_resume(tmp_path, jax_cache, [SINGLE[arch]], PLANTED, ["orbax_finalize:2"], checkpoint_every=4)
    run = next(runs)
    names = checkpoint_dirs(run)                     # step 4 committed; step 8 only as orbax's temporary folder
    assert "4" in names and "8" not in names and any(n.startswith("8.orbax-checkpoint-tmp") for n in names), names
    got, ref = next(runs)
    assert got.step == ref.step == 12
    assert_same_state(got.state, ref.state)
    assert checkpoint_dirs(run) == ["12", "8"]       # the stale temporary folder is gone
    assert log_steps(run) == list(range(1, 13))


@pytest.mark.slow
def test_training_from_a_store_killed_mid_save_and_mid_run_resumes_exactly(tiny_hf, jax_cache, tmp_path):
    """A stacked two-SAE run (two k values) on a StoreSource: killed inside the second checkpoint save, resumed,
    killed again between checkpoints, resumed to the end."""
    model_dir, _ = tiny_hf("llama")
    store = tmp_path / "store"
    harvest_to_store(tiny_model(model_dir), CORPUS, store, [("resid_post", 1)], **harvest_options(mode="split"))
    source = {"kind": "store", "path": str(store), "site": "resid_post", "layer": 1, "batch_size": 32, "seed": 5}
    assert StoreSource(store, "resid_post", 1, 32).store.n_tokens > 4 * 32
    base = SaeConfig(architecture="topk", d_in=64, d_sae=128, k=3, batch_size=32, lr=3e-3, total_steps=12,
                     dead_tokens_threshold=32 * 4, geometric_median_iters=3)
    cfgs = [base, base.replace(k=5, seed=1)]
    runs = kill_then_resume(tmp_path, jax_cache, cfgs, source, ["orbax_finalize:2", "train_step:5"], checkpoint_every=3)
    run = next(runs)
    names = checkpoint_dirs(run)
    assert "3" in names and "6" not in names and any(n.startswith("6.orbax-checkpoint-tmp") for n in names), names
    run = next(runs)
    assert "6" in checkpoint_dirs(run) and "9" not in checkpoint_dirs(run)
    got, ref = next(runs)
    assert got.step == ref.step == 12 and len(got.params) == 2
    assert_same_state(got.state, ref.state)
    assert log_steps(run) == [s for s in range(1, 13) for _ in range(2)]


@pytest.mark.slow
def test_kill_between_the_hook_folders_of_one_checkpoint_resumes_from_the_common_step(jax_cache, tmp_path):
    """One checkpoint folder per SAE (per hook point): killed after the first folder committed step 8 and inside
    the second folder's save of it, the run resumes from step 4 (the last step both committed) exactly."""
    base = SaeConfig(architecture="topk", d_in=16, d_sae=64, k=3, batch_size=128, lr=3e-3, total_steps=12,
                     dead_tokens_threshold=128 * 3, geometric_median_iters=3)
    names = ["resid_post.1", "resid_post.2"]
    runs = kill_then_resume(tmp_path, jax_cache, [base, base.replace(k=5, seed=1)], PLANTED, ["orbax_finalize:4"],
                            checkpoint_every=4, sae_names=names)
    run = next(runs)
    first, second = (sorted(p.name for p in (run / n / "checkpoints").iterdir()) for n in names)
    assert first == ["4", "8"] and second[0] == "4" and second[1].startswith("8.orbax-checkpoint-tmp"), (first, second)
    got, ref = next(runs)
    assert got.step == ref.step == 12
    assert_same_state(got.state, ref.state)
    assert [sorted(p.name for p in (run / n / "checkpoints").iterdir()) for n in names] == [["12", "8"]] * 2
