"""Two real JAX processes x 4 CPU devices load one tiny HF checkpoint sharded across both and get the
single-process logits and greedy tokens; neither process holds the whole model."""
import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from psm_jax.sharding import launch_local

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import json, sys
    from psm_jax.sharding import init_distributed
    init_distributed()  # before anything touches a backend
    import jax, numpy as np
    from jax.experimental import multihost_utils
    import psm_jax
    from psm_jax.sharding import make_mesh, shard_batch
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
    d, out = sys.argv[1], sys.argv[2]
    mesh = make_mesh(data=1, fsdp=4, tensor=2)  # process 0 owns fsdp rows 0-1, process 1 rows 2-3
    m = psm_jax.load(d, mesh=mesh)
    leaves = jax.tree.leaves(m.params)
    owned = {k: sum(s.data.nbytes for s in leaf.addressable_shards)
             for k, leaf in zip(("embed", "wq"), (m.params["embed"], m.params["layers"]["wq"]))}
    tokens = np.load(d + "/tokens.npy")  # the same host array in every process: replicated input
    logits = psm_jax.jit_forward(m.params, m.config, tokens).logits
    gen = psm_jax.generate(m.params, m.config, tokens[:, :6], max_new_tokens=5)
    # a batch split over the fsdp axis across both processes (jit of `forward`: host-side id checks skipped)
    batch = shard_batch(tokens, mesh)
    assert not batch.is_fully_addressable
    for s in batch.addressable_shards:
        np.testing.assert_array_equal(np.asarray(s.data), tokens[s.index])
    sharded_logits = jax.jit(psm_jax.forward, static_argnames="config")(m.params, m.config, batch).logits
    np.save(f"{out}/sharded_batch_logits{jax.process_index()}.npy",
            multihost_utils.process_allgather(sharded_logits, tiled=True))
    logits = multihost_utils.process_allgather(logits, tiled=True)
    gen_tokens = multihost_utils.process_allgather(gen.tokens, tiled=True)
    pid = jax.process_index()
    np.save(f"{out}/logits{pid}.npy", logits)
    np.save(f"{out}/tokens{pid}.npy", gen_tokens)
    print("WORKER " + json.dumps({"pid": pid, "owned": owned, "addressable": [l.is_fully_addressable for l in leaves],
                                  "global": {"embed": m.params["embed"].nbytes, "wq": m.params["layers"]["wq"].nbytes}}))
""")


@pytest.mark.slow
def test_two_processes_load_sharded_and_match_single_process(tiny_hf, tmp_path):
    import psm_jax
    from psm_jax.loading.hf import load_hf_dir

    src, _ = tiny_hf("llama")
    params, config = load_hf_dir(src)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (8, 12)).astype(np.int32)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in ("config.json", "model.safetensors"):
        (ckpt / f).write_bytes((src / f).read_bytes())
    np.save(ckpt / "tokens.npy", tokens)
    ref_logits = np.asarray(psm_jax.jit_forward(params, config, tokens).logits)
    ref_tokens = np.asarray(psm_jax.generate(params, config, tokens[:, :6], max_new_tokens=5).tokens)

    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    results = launch_local([sys.executable, "-c", WORKER, str(ckpt), str(tmp_path)], 2, 4, timeout=120, env=env,
                           cwd=REPO)
    for r in results:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    reports = [json.loads(r.stdout.split("WORKER ", 1)[1]) for r in results]
    for rep in reports:
        assert not any(rep["addressable"])  # every leaf spans both processes
        # each process holds half of the fsdp x tensor split weights (4 of 8 shards)
        for k in ("embed", "wq"):
            assert rep["owned"][k] * 2 == rep["global"][k], rep
        logits = np.load(tmp_path / f"logits{rep['pid']}.npy")
        np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
        np.testing.assert_allclose(np.load(tmp_path / f"sharded_batch_logits{rep['pid']}.npy"), ref_logits, atol=1e-4)
        np.testing.assert_array_equal(np.load(tmp_path / f"tokens{rep['pid']}.npy"), ref_tokens)
