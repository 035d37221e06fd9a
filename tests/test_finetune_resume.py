"""Exact resume: a LoRA run SIGKILLed after step 3 (checkpoint at step 2) and resumed ends bit-identical to an
uninterrupted run (adapters, AdamW moments, step, data key), across an epoch boundary and a warmup+cosine schedule.

The training job is this module run as a script (`python -m tests.test_finetune_resume RUN_DIR OUT.npz`);
PSM_TEST_KILL_AT=finetune_step:3 (psm_jax.atomic.kill_point) kills it with SIGKILL after its third step."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS = 6


def _train(run_dir: str, out: str) -> None:
    import jax

    from psm_jax import edits as E
    from psm_jax.finetune import ChatDataset, FinetuneConfig, LoraConfig, OptimizerConfig, finetune
    from psm_jax.finetune.checkpoint import flatten
    from tests.fixtures_assets import random_smollm2_chat_model
    from tests.test_finetune import CONVERSATIONS

    m = random_smollm2_chat_model(2)
    data = ChatDataset.from_conversations(m.tokenizer, CONVERSATIONS, seq_len=40, pad_id=2)
    ft = FinetuneConfig(lora=LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down")), batch_size=3,
                        optimizer=OptimizerConfig(1e-2, schedule="cosine", warmup_steps=2, total_steps=STEPS))
    edit = E.add(m.config, np.linspace(-1, 1, m.config.d_model, dtype=np.float32), layers=[1], coef=2.0)
    result = finetune(m.params, m.config, ft, data, steps=STEPS, key=jax.random.PRNGKey(0), edits=[edit],
                      run_dir=run_dir, checkpoint_every=2, on_step=lambda row: print(json.dumps(row), flush=True))
    np.savez(out, **{k: np.asarray(v) for k, v in flatten(result.state).items()})
    print("done", flush=True)


def _job(run_dir, out, kill_at=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("PSM_TEST_KILL_AT", None)
    if kill_at:
        env["PSM_TEST_KILL_AT"] = kill_at
    return subprocess.Popen([sys.executable, "-m", "tests.test_finetune_resume", str(run_dir), str(out)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _steps(stdout: str) -> list[int]:
    return [json.loads(line)["step"] for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    ref = _job(tmp_path / "ref", tmp_path / "ref.npz")
    killed = _job(tmp_path / "run", tmp_path / "run.npz", kill_at="finetune_step:3")
    out, err = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, err[-3000:]
    assert _steps(out) == [1, 2, 3] and not (tmp_path / "run.npz").exists()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2"]

    resumed = _job(tmp_path / "run", tmp_path / "run.npz")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert _steps(out) == [3, 4, 5, 6]
    ref_out, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err[-3000:]
    assert _steps(ref_out) == [1, 2, 3, 4, 5, 6]

    a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "run.npz")
    assert sorted(a.files) == sorted(b.files) and any(".mu." in k for k in a.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert int(a["step"]) == STEPS
    assert float(np.abs(a["trainable.wq.b"]).max()) > 0  # the adapters trained


if __name__ == "__main__":
    _train(sys.argv[1], sys.argv[2])
