"""Two real JAX processes x 4 CPU devices, each harvesting its own share of the documents from a tiny random Llama,
train one data-parallel SAE (and a stack on two hook points) to the parameters of one process trained on the same
global batches; a SIGKILL of one process mid-run, then a restart of both, ends in the uninterrupted run's state.
The jobs, the worker and the tolerance (with why it is not bit for bit) are those of benchmarks/multiprocess_sae.py."""
import json
import signal

import numpy as np
import pytest

from benchmarks import multiprocess_sae as mp
from psm_jax.atomic import KILL_ENV
from tests.test_kill_store import jax_cache  # noqa: F401  (fixture)


def cache_env(cache_dir) -> dict:
    """Environment of the workers: one persistent XLA compilation cache for every launch of the session."""
    return {"JAX_COMPILATION_CACHE_DIR": str(cache_dir), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module")
def cluster(tiny_hf, jax_cache, tmp_path_factory):
    """(model dir, work dir, comparison per job) of one cluster launch running both jobs."""
    model_dir, _ = tiny_hf("llama")
    work = tmp_path_factory.mktemp("mp_sae")
    return model_dir, work, mp.compare(model_dir, work, env=cache_env(jax_cache))


@pytest.mark.slow  # two process launches plus a single-process reference run
def test_split_harvest_trains_the_single_process_parameters(cluster):
    _, work, result = cluster
    assert set(result) == {"single", "stack"}
    for job, r in result.items():
        assert r["processes_agree"], job                 # both processes hold one global state
        assert r["max_abs_diff"] <= mp.TOLERANCE, (job, r)
    states = dict(np.load(work / "stack_state0.npz"))
    assert states["params.W_enc"].shape == (2, 64, 128)  # one SAE per hook point
    # each process harvested only its own documents: the two shares are disjoint and cover the corpus
    from sae.data.harvest import process_share
    from tests.kill_worker import CORPUS

    shares = [process_share(CORPUS, i, 2) for i in range(2)]
    assert sum(map(len, shares)) == len(CORPUS) and shares[0][0] is CORPUS[0] and shares[1][0] is CORPUS[1]


def test_process_share_rejects_bad_arguments():
    from sae.data.harvest import process_share

    with pytest.raises(ValueError, match="index=2 with count=2"):
        process_share(["a", "b"], 2, 2)
    with pytest.raises(TypeError, match="count='2'"):
        process_share(["a", "b"], 0, "2")


@pytest.mark.slow  # two more cluster launches (~60-90 s on 2 cores)
def test_one_process_killed_then_both_restarted_resume_exactly(cluster, jax_cache):
    """Process 1 SIGKILLs itself after step 4 (checkpoints every 2 steps): process 0 blocks on the next collective
    until the launcher or JAX's coordination service ends it; the restart of both resumes from step 2 and ends in the uninterrupted run's params,
    Adam moments, dead counters and step, bit for bit (the same program on the same batches)."""
    model_dir, work, _ = cluster
    killed = work / "killed"
    killed.mkdir()
    spec = {"jobs": ["stack"], "total_steps": 6, "checkpoint_every": 2, "kill_process": 1}
    env = {**cache_env(jax_cache), KILL_ENV: "train_step:4"}
    first = mp.run_cluster(model_dir, killed, spec, env=env)
    assert first[1].returncode == -signal.SIGKILL, first[1].stderr[-3000:]
    # the survivor never finishes: the launcher kills it, or JAX's coordination service ends it (peer heartbeat lost)
    assert first[0].returncode != 0 and "WORKER" not in first[0].stdout, first[0].stderr[-3000:]
    run = killed / "stack_cluster"
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2], steps
    meta = json.loads((run / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert meta["processes"] == 2 and len(meta["process_cursors"]) == 2
    mp.check_ok(mp.run_cluster(model_dir, killed, {**spec, "kill_process": None}, env=cache_env(jax_cache)))
    want = dict(np.load(work / "stack_state0.npz"))
    for pid in range(2):
        got = dict(np.load(killed / f"stack_state{pid}.npz"))
        assert sorted(got) == sorted(want) and any(k.startswith("opt.") for k in got)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    logged = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert logged == [s for s in range(1, 7) for _ in range(2)]
