"""sae.train: stacked SAEs (lax.map / vmap / per-SAE streams), in-process resume, activation normalisation."""

import jax
import numpy as np
import pytest

from sae.config import sweep
from sae.synthetic import PlantedSource
from sae.train import load_run, train
from tests.test_sae_train import BASE, B, D, F, _log  # the same planted-feature setup


def test_stacked_sweep_matches_separate_runs(tmp_path):
    cfgs = sweep(BASE.replace(total_steps=15), lr=[3e-3, 1e-2], seed=[0, 1])
    src = lambda: PlantedSource(D, F, B, active=3, seed=3)  # noqa: E731
    stacked = train(cfgs, src(), tmp_path / "stack", checkpoint_every=0)
    for i, c in enumerate(cfgs):
        single = train(c, src(), tmp_path / f"single{i}", checkpoint_every=0)
        for name in single.params[0]:
            np.testing.assert_allclose(stacked.params[i][name], single.params[0][name], rtol=2e-5, atol=2e-6,
                                       err_msg=f"sae {i} {name}")
    logs = _log(tmp_path / "stack")
    assert {r["sae"] for r in logs} == {0, 1}
    vm = train(cfgs, src(), tmp_path / "vmap", checkpoint_every=0, stack="vmap")
    for i in range(2):
        for name in vm.params[i]:
            np.testing.assert_allclose(vm.params[i][name], stacked.params[i][name], rtol=2e-5, atol=2e-6)


def test_in_process_resume_equals_uninterrupted(tmp_path):
    cfg = BASE.replace(total_steps=12)
    full = train(cfg, PlantedSource(D, F, B, seed=4), tmp_path / "full", checkpoint_every=0)
    part = train(cfg, PlantedSource(D, F, B, seed=4), tmp_path / "part", checkpoint_every=4, max_steps=6)
    assert part.step == 6 and part.stopped == "max_steps"
    resumed = train(cfg, PlantedSource(D, F, B, seed=4), tmp_path / "part", checkpoint_every=4)
    assert resumed.step == 12
    for name in full.params[0]:
        np.testing.assert_array_equal(resumed.params[0][name], full.params[0][name], err_msg=name)
    steps = [r["step"] for r in _log(tmp_path / "part")]
    assert steps == list(range(1, 13))                 # the log has every step exactly once
    params, cfgs, meta = load_run(tmp_path / "part")
    assert cfgs == [cfg] and meta["step"] == 12
    np.testing.assert_array_equal(params[0]["W_dec"], full.params[0]["W_dec"])


def test_per_sae_streams(tmp_path):
    """[n, B, d_in] batches: each SAE of the stack trains on its own stream (e.g. one layer each)."""
    srcs = [PlantedSource(D, F, B, seed=s, bias=3.0) for s in (6, 7)]
    stream = (np.stack([next(s) for s in srcs]) for _ in range(3))
    res = train(sweep(BASE.replace(total_steps=3), seed=[0, 1]), stream, tmp_path / "run", checkpoint_every=0)
    assert res.step == 3 and len(res.params) == 2
    for i in range(2):                                  # each b_dec initialised from its own stream
        own = np.linalg.norm(res.params[i]["b_dec"] - srcs[i].offset)
        other = np.linalg.norm(res.params[i]["b_dec"] - srcs[1 - i].offset)
        assert own < 0.5 * other, (own, other)


def test_activation_normalisation_is_folded_into_the_result(tmp_path):
    src = PlantedSource(D, F, B, seed=8, bias=4.0)
    cfg = BASE.replace(total_steps=40, lr=1e-2, normalize_activations="expected_average_only_in")
    res = train(cfg, src, tmp_path / "run", checkpoint_every=0)
    scale = float(res.state["act_scale"])
    x = src.batch(0)
    assert scale == pytest.approx(np.sqrt(D) / np.linalg.norm(x, axis=1).mean(), rel=1e-4)
    from sae.model import forward
    raw = forward(res.params[0], cfg, x)                       # folded params run on raw activations
    ev = 1 - ((raw.recon - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert ev > 0.5
    unfolded = {k: v[0] for k, v in jax.device_get(res.state["params"]).items()}
    np.testing.assert_allclose(raw.recon, forward(unfolded, cfg, x * scale).recon / scale, rtol=1e-4, atol=1e-4)
