"""An experiment's batches split across two real JAX processes x 4 CPU devices (`mesh=` of
psm_jax.persona.rollouts.activation_means / score_answers) give the single-process numbers."""
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from psm_jax.sharding import launch_local

REPO = Path(__file__).resolve().parents[1]
# 10 conversations: two batches of 8 (the second padded), one per device of the 8-device mesh
CONVS = [[{"role": "user", "content": f"question {i} about {'cats' if i % 2 else 'the sea'}"},
          {"role": "assistant", "content": "an answer " + "word " * (i + 1)}] for i in range(10)]
PROMPTS = [c[:1] for c in CONVS]
ANSWERS = ["yes", "no", "maybe so", "I think not", "sure", "never", "of course", "why", "ok", "fine then"]


def tiny_model():
    from tests.fixtures_assets import random_smollm2_chat_model

    return random_smollm2_chat_model(n_layers=2, seed=3)


def measure(model, mesh=None) -> dict[str, np.ndarray]:
    from psm_jax.persona import rollouts

    out = rollouts.activation_means(model, CONVS, layers=(0, 1), batch_size=8, mesh=mesh)
    out["scores"] = rollouts.score_answers(model, PROMPTS, ANSWERS, batch_size=8, mesh=mesh)
    return out


WORKER = textwrap.dedent("""
    import dataclasses, sys
    from psm_jax.sharding import init_distributed
    init_distributed()
    import jax, numpy as np
    from psm_jax.sharding import make_mesh, shard_params
    from tests.test_multiprocess_rollouts import measure, tiny_model
    assert (jax.process_count(), jax.device_count()) == (2, 8)
    mesh = make_mesh(data=8)
    model = tiny_model()
    model = dataclasses.replace(model, params=shard_params(model.params, mesh))
    np.savez(f"{sys.argv[1]}/out{jax.process_index()}.npz", **measure(model, mesh))
""")


@pytest.mark.slow  # a 2-process launch (~30 s of CPU)
def test_batches_split_across_processes_give_the_single_process_numbers(tmp_path):
    ref = measure(tiny_model())
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    results = launch_local([sys.executable, "-c", WORKER, str(tmp_path)], 2, 4, timeout=300, env=env, cwd=REPO)
    for i, r in enumerate(results):
        assert r.returncode == 0, f"process {i}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert ref["response_mean"].shape[:2] == (10, 2) and ref["scores"].shape == (10,)
    for pid in range(2):
        got = dict(np.load(tmp_path / f"out{pid}.npz"))
        assert sorted(got) == sorted(ref)
        for name in ref:
            np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-5, err_msg=f"{name} (process {pid})")

