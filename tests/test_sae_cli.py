"""`psm sae train | eval | export` (sae.cli.main) on a small .npy of planted-feature activations."""
import json

import numpy as np
import pytest

from sae.cli import load_config, main
from sae.interop import load_sae
from sae.synthetic import PlantedSource

TOML = """
run_dir = "{run}"
[sae]
architecture = "topk"
d_sae = 64
k = 3
batch_size = 128
lr = 0.003
warmup_steps = 5
geometric_median_iters = 5
[data]
npy = "{npy}"
seed = 1
[train]
checkpoint_every = 10
progress = false
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    src = PlantedSource(16, 32, 1024, seed=0)
    np.save(d / "acts.npy", np.concatenate([next(src) for _ in range(4)]))
    (d / "run.toml").write_text(TOML.format(run=d / "run", npy=d / "acts.npy"))
    return d


def test_overrides_parse():
    conf = load_config(None, ["sae.k=7", "sweep.seed=[0,1]", "run_dir=x", "data.npy=a b.npy", "train.mesh=[1,1]"])
    assert conf["sae"]["k"] == 7 and conf["sweep"]["seed"] == [0, 1] and conf["data"]["npy"] == "a b.npy"


def test_train_resume_eval_export(setup, capsys):
    d = setup
    assert main(["train", str(d / "run.toml"), "train.max_steps=12"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 12 and out["stopped"] == "max_steps" and (d / "run" / "curves.png").exists()
    assert main(["train", str(d / "run.toml"), "train.max_steps=25"]) == 0          # resumes
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 25
    steps = [json.loads(l)["step"] for l in (d / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 26))

    assert main(["eval", str(d / "run"), f"data.npy={d / 'acts.npy'}", "eval.batch_size=512"]) == 0
    ev = json.loads(capsys.readouterr().out)
    m = ev["saes"][0]["metrics"]
    assert m["n_tokens"] == 4096 and m["l0_mean_per_token"] == pytest.approx(3.0)
    assert 0 < m["explained_variance_saelens_new"] <= 1 and "nmse_openai" in m
    assert json.loads((d / "run" / "eval.json").read_text())["saes"][0]["metrics"] == m

    assert main(["export", str(d / "run"), str(d / "exported"), "export.hook_name=model.layers.1",
                 "export.model_name=tiny"]) == 0
    capsys.readouterr()
    imp = load_sae(d / "exported")
    assert imp.cfg.k == 3 and imp.metadata["hook_name"] == "model.layers.1"
    assert imp.metadata["log10_density"].shape == (64,)       # from the eval's firing densities


def test_errors_are_one_line(setup, capsys):
    d = setup
    assert main(["train", str(d / "run.toml"), "sae.d_in=17"]) == 2
    assert "sae.d_in=17 but the activations have width 16" in capsys.readouterr().err
    assert main(["train", str(d / "run.toml"), "sae.k=4", "train.max_steps=1"]) == 2
    assert "differing field(s): saes[0].k: 3 in the run dir vs 4 requested" in capsys.readouterr().err
    assert main(["train", str(d / "run.toml"), "sae.k=100"]) == 2
    assert "k=100" in capsys.readouterr().err
    assert main(["train", f"run_dir={d / 'x'}", "sae.d_in=16"]) == 2
    assert "[data] section needs" in capsys.readouterr().err
    assert main(["export", str(d / "nowhere"), str(d / "o")]) == 2
