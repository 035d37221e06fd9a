"""Harvest split across processes, one data-parallel SAE training: equal to the single-process run?

2 local JAX processes x 4 CPU devices (`psm_jax.sharding.launch_local`). Each process harvests its own share of
the documents (`sae.data.harvest.process_share`: corpus index modulo 2) from a tiny random Llama, streamed
(`StreamSource` / `StreamStackSource`), and feeds its rows of every global batch to `sae.train.train` on a
("data"=8, "latent"=1) mesh over both processes' devices. Two jobs: one TopK SAE on resid_post.1, and a stack of
two SAEs on resid_post.1 and resid_post.2 (one stream each). The reference trains in this one process (1 device,
1x1 mesh: the same XLA kernels) on the same global batches: batch i = process 0's batch i, then process 1's.

Records multiprocess_sae_equal = 1 when every final parameter of both jobs is within TOLERANCE = 1e-5 of the
reference (and both processes end with the same state), with max_abs_diff over every parameter of both jobs. Not
bit for bit: the data-parallel step sums the loss over the batch as 8 per-device partial sums joined by a gloo
all-reduce, where the reference sums the whole batch on one device, so the gradients differ in float32 rounding
(~1e-8; the Adam moments agree to that). Two steps then widen it for a few decoder entries: removing the decoder
gradient's component parallel to its unit row cancels most of a nearly parallel gradient (its small remainder
keeps the absolute error, so a larger relative one), and Adam divides by the gradient's own scale, so that entry
moves by up to lr x its relative error (observed <= 6.2e-6 with lr = 3e-3; 1e-8 to 6e-8 elsewhere).
Usage: .venv/bin/python benchmarks/multiprocess_sae.py [--no-record]
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

TOLERANCE = 1e-5
PROCESSES, DEVICES_PER_PROCESS = 2, 4
# (name, hook points): one SAE on one hook point, and a stack of SAEs on two hook points (one stream each)
JOBS = {"single": [("resid_post", 1)], "stack": [("resid_post", 1), ("resid_post", 2)]}


def sae_config(total_steps: int = 6):
    from sae.config import SaeConfig

    return SaeConfig(architecture="topk", d_in=64, d_sae=128, k=4, batch_size=32, lr=3e-3, warmup_steps=2,
                     total_steps=total_steps, dead_tokens_threshold=32 * 3, geometric_median_iters=3)


def job_configs(job: str, total_steps: int = 6) -> list:
    base = sae_config(total_steps)
    return [base.replace(seed=i) for i in range(len(JOBS[job]))]


def share_source(model_dir: str, job: str, index: int, count: int):
    """The activation stream of one process's share of the corpus: [rows, d] batches (a stack: [n, rows, d])."""
    from sae.data.contexts import TokenFilter
    from sae.data.harvest import process_share
    from sae.data.sources import StreamSource, StreamStackSource
    from tests.kill_worker import CORPUS, tiny_model
    from tests.test_activations import T, fake_encode

    keys = JOBS[job]
    rows = sae_config().batch_size // count
    docs = process_share(CORPUS, index, count)
    kw = dict(context_len=T, mode="split", encode=fake_encode, token_filter=TokenFilter(skip_first=0),
              forward_batch_size=2, buffer_size=4 * rows, seed=7 + index, prefetch=0)
    model = tiny_model(model_dir)
    if len(keys) == 1:
        return StreamSource(model, docs, *keys[0], rows, **kw)
    return StreamStackSource(model, docs, keys, rows, **kw)


def global_batches(model_dir: str, job: str, count: int = PROCESSES):
    """Batch i of every process's share, concatenated in process order along the rows axis."""
    sources = [share_source(model_dir, job, i, count) for i in range(count)]
    for parts in zip(*sources):
        yield np.concatenate(parts, axis=-2)


def host_state(state) -> dict[str, np.ndarray]:
    from psm_jax.sharding import host_array
    from sae.checkpoint import flatten_state

    return {k: host_array(v) for k, v in flatten_state(state).items()}


def reference(model_dir: str, job: str, run_dir, total_steps: int = 6) -> dict[str, np.ndarray]:
    """The single-process run (one device, a 1x1 mesh) on the global batches: its final flat state."""
    from sae.distributed import make_mesh
    from sae.train import train

    res = train(job_configs(job, total_steps), global_batches(model_dir, job), run_dir, mesh=make_mesh(1, 1),
                checkpoint_every=0)
    return host_state(res.state)


def worker(model_dir: str, out_dir: str, spec: str) -> None:
    """One process of the cluster: {"jobs": [names], "total_steps", "checkpoint_every"[, "kill_process"]}; job j
    trains in out_dir/<j>_cluster and leaves out_dir/<j>_state<process>.npz. PSM_TEST_KILL_AT=<event>:<n> with
    kill_process = i makes process i SIGKILL itself at the n-th `train_step`."""
    from psm_jax.sharding import init_distributed

    init_distributed()
    import jax

    from psm_jax.atomic import kill_point
    from sae.distributed import make_mesh
    from sae.train import train

    spec = json.loads(spec)
    pid = jax.process_index()
    kills = spec.get("kill_process") == pid

    def on_step(step, metrics):
        if kills:
            kill_point("train_step")

    for job in spec["jobs"]:
        res = train(job_configs(job, spec["total_steps"]), share_source(model_dir, job, pid, jax.process_count()),
                    Path(out_dir) / f"{job}_cluster", mesh=make_mesh(jax.device_count(), 1),
                    checkpoint_every=spec.get("checkpoint_every", 0), on_step=on_step)
        np.savez(Path(out_dir) / f"{job}_state{pid}.npz", **host_state(res.state))
        print("WORKER " + json.dumps({"pid": pid, "job": job, "step": res.step, "devices": jax.device_count()}),
              flush=True)


def run_cluster(model_dir, out_dir, spec: dict, *, env: dict | None = None, timeout: float = 400):
    """Launch the 2 x 4 cluster on the jobs of `spec`; returns the launcher's CompletedProcess per process."""
    from psm_jax.sharding import launch_local

    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    argv = [sys.executable, str(Path(__file__).resolve()), "worker", str(model_dir), str(out_dir), json.dumps(spec)]
    return launch_local(argv, PROCESSES, DEVICES_PER_PROCESS, timeout=timeout, env=env, cwd=REPO)


def check_ok(results) -> None:
    for i, r in enumerate(results):
        if r.returncode != 0:
            raise RuntimeError(f"process {i} exited with {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")


def max_abs_diff(got: dict, want: dict, prefix: str = "params.") -> float:
    names = [k for k in want if k.startswith(prefix)]
    if sorted(got) != sorted(want) or not names:
        raise ValueError(f"states differ in their arrays: {sorted(got)} vs {sorted(want)}")
    return max(float(np.max(np.abs(got[k].astype(np.float64) - want[k]))) if got[k].size else 0.0 for k in names)


def compare(model_dir, work: Path, *, env: dict | None = None) -> dict:
    """Both jobs on the cluster (one launch) and in this process; per job the max |difference| of the final
    parameters and whether both processes ended with the same state."""
    check_ok(run_cluster(model_dir, work, {"jobs": list(JOBS), "total_steps": 6}, env=env))
    out = {}
    for job in JOBS:
        states = [dict(np.load(work / f"{job}_state{i}.npz")) for i in range(PROCESSES)]
        want = reference(model_dir, job, work / f"{job}_reference")
        out[job] = {"max_abs_diff": max_abs_diff(states[0], want),
                    "processes_agree": all(max_abs_diff(s, states[0], "") == 0.0 for s in states[1:]),
                    "bit_identical": all(np.array_equal(states[0][k], want[k]) for k in want if k.startswith("params."))}
    return out


def main(argv: list[str]) -> None:
    if argv and argv[0] == "worker":
        worker(*argv[1:4])
        return
    from benchmarks.record import record
    from tests import tiny_models

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny_models.save("llama", tmp / "model")
        result = compare(tmp / "model", tmp)
    diff = max(r["max_abs_diff"] for r in result.values())
    equal = diff <= TOLERANCE and all(r["processes_agree"] for r in result.values())
    print(json.dumps(result))
    if "--no-record" not in argv:
        record("multiprocess_sae_equal", int(equal), "bool",
               f"final SAE parameters of 2 processes x 4 CPU devices (each harvesting its half of the documents "
               f"of a tiny random Llama, data-parallel over 8 devices) vs one process on the same global batches; "
               f"jobs: one TopK SAE (resid_post.1) and a stack on resid_post.1,2; {sae_config().total_steps} steps "
               f"of batch {sae_config().batch_size}; equal = every parameter within {TOLERANCE}",
               target=f"1 (max_abs_diff <= {TOLERANCE})", max_abs_diff=diff,
               bit_identical=all(r["bit_identical"] for r in result.values()))


if __name__ == "__main__":
    main(sys.argv[1:])
