"""The installed `psm` console script (the README's command line), run as a subprocess of the environment's own
entry point: help, one small real job, and a bad command giving a one-line error with exit status 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# The console script lives beside the interpreter that runs the tests (`make install` puts both in .venv/bin).
PSM = Path(sys.executable).parent / "psm"


def run_psm(*args, cwd=None, timeout=300):
    assert PSM.exists(), f"the psm console script is not installed at {PSM} (run `make install`)"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([str(PSM), *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env)


def test_psm_help_lists_the_commands():
    res = run_psm("--help")
    assert res.returncode == 0, res.stderr
    for command in ("quickstart", "persona-vectors", "assistant-axis", "capping", "refusal", "refusal-organism",
                    "kv-editing", "sae"):
        assert command in res.stdout
    organism = run_psm("refusal-organism", "--help")
    assert organism.returncode == 0 and "sharegpt_per_harmful=1.0" in organism.stdout, organism.stderr


def test_unknown_command_is_a_one_line_error_with_status_2():
    res = run_psm("no-such-study")
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no-such-study" in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_sae_train_runs_through_the_installed_script(tmp_path):
    """A small real job: train TopK SAEs on planted activations from a .npy (a comma-list sweep: one SAE per k),
    then check the run folder."""
    from sae.synthetic import PlantedSource

    src = PlantedSource(16, 32, 1024, seed=0)
    np.save(tmp_path / "acts.npy", np.concatenate([next(src) for _ in range(2)]))
    res = run_psm("sae", "train", f"run_dir={tmp_path / 'run'}", f"data.npy={tmp_path / 'acts.npy'}",
                  "sae.architecture=topk", "sae.d_sae=32", "sweep.k=2,4", "sae.batch_size=128", "train.max_steps=5",
                  "train.progress=false", "train.plot=no", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run").is_dir() and any((tmp_path / "run").iterdir())
    assert [c["k"] for c in json.loads((tmp_path / "run" / "config.json").read_text())["saes"]] == [2, 4]


@pytest.mark.parametrize("args", [("sae", "frobnicate"), ("sae", "eval")])
def test_bad_arguments_give_one_line_errors(tmp_path, args):
    res = run_psm(*args, cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    assert res.stderr.strip() and len(res.stderr.strip().splitlines()) <= 2, res.stderr


def test_sae_values_follow_the_study_grammar_through_the_installed_script(tmp_path):
    """`psm sae` reads values per field type like the studies: a bad int names key and value in one line (status
    2), and `--help` lists the keys with their defaults."""
    res = run_psm("sae", "train", "sae.k=notanumber", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip() == "psm sae train: sae.k='notanumber'; expected an integer"
    res = run_psm("sae", "train", "--help", cwd=tmp_path)
    assert res.returncode == 0 and "sae.k=32" in res.stdout and "train.max_steps=None" in res.stdout
