"""sae.checkpoint: exact resume after SIGKILL (subprocess), corrupt / partial / mismatched checkpoints."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sae.checkpoint import (CheckpointCorruptError, Checkpointer, ensure_run_config, run_config_dict,
                            state_digest)
from sae.config import SaeConfig
from sae.synthetic import PlantedSource
from sae.train import load_run, train

ROOT = Path(__file__).resolve().parent.parent
CFG = SaeConfig(architecture="topk", d_in=16, d_sae=64, k=3, batch_size=128, lr=3e-3, warmup_steps=3,
                total_steps=24, dead_tokens_threshold=128 * 4, geometric_median_iters=5)

CHILD = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from sae.config import SaeConfig
    from sae.synthetic import PlantedSource
    from sae.train import train
    cfg = SaeConfig.from_dict(json.loads(sys.argv[2]))
    def on_step(step, metrics):
        print("step", step, flush=True)
        time.sleep(0.02)
    res = train(cfg, PlantedSource(16, 32, 128, seed=11), sys.argv[1], checkpoint_every=5, on_step=on_step)
    np.savez(sys.argv[1] + "/final.npz", **res.params[0])
    print("done", res.step, flush=True)
""")


def _child(tmp_path, run_dir):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, str(script), str(run_dir), json.dumps(CFG.to_dict())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


@pytest.mark.slow  # the default run covers SIGKILL mid-run and mid-save in tests/test_kill_train.py
def test_sigkill_mid_training_then_resume_is_bit_identical(tmp_path):
    ref = _child(tmp_path, tmp_path / "ref")
    killed = _child(tmp_path, tmp_path / "killed")
    seen = 0
    for line in killed.stdout:
        if line.startswith("step"):
            seen = int(line.split()[1])
            if seen >= 12:                             # checkpoints at 5 and 10 exist; step 12+ in flight
                killed.send_signal(signal.SIGKILL)
                break
    killed.wait(60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.read()
    assert not (tmp_path / "killed" / "final.npz").exists()
    out, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, err
    resumed = _child(tmp_path, tmp_path / "killed")
    out2, err2 = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err2
    steps = [int(l.split()[1]) for l in out2.splitlines() if l.startswith("step")]
    assert steps[0] in (11, 16) and steps[-1] == 24     # resumed after the last checkpoint, not from scratch
    a, b = np.load(tmp_path / "ref" / "final.npz"), np.load(tmp_path / "killed" / "final.npz")
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    log_steps = [json.loads(l)["step"] for l in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert log_steps == list(range(1, 25))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    train(CFG.replace(total_steps=10), PlantedSource(16, 32, 128, seed=1), d, checkpoint_every=5)
    return d


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_corrupt_checkpoint_raises_instead_of_restarting(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path / "run")
    blobs = sorted((run / "checkpoints" / "10" / "state").rglob("*"), key=lambda p: p.stat().st_size)
    target = [p for p in blobs if p.is_file()][-1]
    raw = bytearray(target.read_bytes())
    for i in range(0, len(raw), 7):
        raw[i] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorruptError, match=r"checkpoints/10"):
        train(CFG.replace(total_steps=10), PlantedSource(16, 32, 128, seed=1), run)
    # an explicit older step still restores
    params, cfgs, meta = load_run(run, step=5)
    assert meta["step"] == 5


def test_missing_meta_and_partial_save(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path / "run")
    import shutil
    shutil.rmtree(run / "checkpoints" / "10" / "meta")
    with pytest.raises(CheckpointCorruptError, match="cannot be restored"):
        load_run(run)
    run2 = _copy(finished_run, tmp_path / "run2")
    # a save killed before its commit leaves a temporary folder: it is not a checkpoint
    (run2 / "checkpoints" / "15.orbax-checkpoint-tmp-1234").mkdir()
    ck = Checkpointer(run2)
    assert ck.latest_step() == 10
    ck.close()
    assert load_run(run2)[2]["step"] == 10


def test_run_config_rules(tmp_path):
    conf = run_config_dict([CFG.to_dict()])
    assert ensure_run_config(tmp_path / "r", conf) is False
    assert ensure_run_config(tmp_path / "r", conf) is True
    other = run_config_dict([CFG.replace(d_sae=128, aux_coef=0.5).to_dict()])
    with pytest.raises(ValueError, match=r"saes\[0\]\.aux_coef: 0\.03125 in the run dir vs 0\.5.*saes\[0\]\.d_sae"):
        ensure_run_config(tmp_path / "r", other)
    (tmp_path / "s" / "checkpoints" / "3").mkdir(parents=True)
    with pytest.raises(CheckpointCorruptError, match="no config.json"):
        ensure_run_config(tmp_path / "s", conf)
    (tmp_path / "r" / "config.json").write_text('{"format": "psm-sae-run/1", "saes": [')
    with pytest.raises(CheckpointCorruptError, match=r"r/config.json is unreadable"):
        ensure_run_config(tmp_path / "r", conf)


def test_digest_detects_any_change():
    a = {"x": np.arange(6, dtype=np.float32), "y": np.ones((2, 2), np.int32)}
    b = {"x": a["x"].copy(), "y": a["y"].copy()}
    assert state_digest(a) == state_digest(b)
    b["x"][3] = np.nextafter(b["x"][3], np.float32(10))
    assert state_digest(a) != state_digest(b)


def test_one_checkpoint_folder_per_sae_resumes_exactly_and_loads_alone(tmp_path):
    """sae_names: each SAE of a stacked run checkpoints into its own run dir (loadable alone); a run stopped at
    step 6 and continued ends in the state of an uninterrupted stacked run with one checkpoint folder."""
    from sae.checkpoint import CheckpointError, flatten_state

    cfgs = [CFG.replace(total_steps=10), CFG.replace(total_steps=10, k=5, seed=1)]
    names = ["resid_post.3", "resid_post.6"]
    ref = train(cfgs, PlantedSource(16, 32, 128, seed=2), tmp_path / "ref", checkpoint_every=4)
    run = tmp_path / "run"
    train(cfgs, PlantedSource(16, 32, 128, seed=2), run, checkpoint_every=4, max_steps=6, sae_names=names)
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == names          # no run/checkpoints
    assert sorted(p.name for p in (run / names[0] / "checkpoints").iterdir()) == ["4", "6"]
    got = train(cfgs, PlantedSource(16, 32, 128, seed=2), run, checkpoint_every=4, sae_names=names)
    assert got.step == ref.step == 10
    a, b = flatten_state(got.state), flatten_state(ref.state)
    assert sorted(a) == sorted(b)
    for name in b:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)
    alone, alone_cfgs, meta = load_run(run / names[1])
    assert alone_cfgs == [cfgs[1]] and meta["step"] == 10 and meta["sae_name"] == names[1]
    both, _, _ = load_run(run)
    for k in got.params[1]:
        np.testing.assert_array_equal(alone[0][k], got.params[1][k], err_msg=k)
        np.testing.assert_array_equal(both[0][k], got.params[0][k], err_msg=k)
    # a run dir in the single-folder layout keeps loading, and refuses to continue with per-SAE folders
    assert load_run(tmp_path / "ref")[2]["step"] == 10
    with pytest.raises(CheckpointError, match=r"single-folder layout .*ref/checkpoints"):
        train(cfgs, PlantedSource(16, 32, 128, seed=2), tmp_path / "ref", sae_names=names)
    with pytest.raises(ValueError, match=r"sae_names=\['a'\]; expected 2 distinct"):
        train(cfgs, PlantedSource(16, 32, 128, seed=2), tmp_path / "bad", sae_names=["a"])
