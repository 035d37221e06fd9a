"""The main job: a loop over the registry; every stage's config builds at every preset, bad inputs are named, and
(slow) a CI-preset run writes parseable reports and reuses them."""
import json
from pathlib import Path

import pytest

from experiments import quickstart as Q
from experiments import registry, study


def test_every_stage_config_builds_for_every_preset(tmp_path):
    entries = [s for s in registry.STUDIES if s.main_job]
    assert tuple(s.stage for s in entries) == Q.STAGES
    for preset in study.PRESETS:
        for entry in entries:
            cfg = Q.stage_config(entry, preset, tmp_path, "smollm2-135m-instruct", 3)
            assert cfg.seed == 3 and cfg.model == "smollm2-135m-instruct"
            for field, rel in entry.inputs:  # inputs come from the earlier stages' folders
                assert getattr(cfg, field) == str(tmp_path / rel)


def test_bad_inputs(tmp_path, capsys):
    with pytest.raises(ValueError, match="preset='huge'"):
        Q.run(tmp_path, preset="huge")
    with pytest.raises(ValueError, match="unknown stage 'axes'"):
        Q.run(tmp_path, only=["axes"])
    assert Q.main(["--only", "axes", "--out", str(tmp_path)]) == 2
    assert "unknown stage 'axes'" in capsys.readouterr().err


@pytest.mark.slow
def test_main_job_ci_size_writes_reports(tmp_path):
    path = Q.run(tmp_path / "qs", preset="ci")
    out = path.parent
    assert "| stage | metric | value | 95% CI | null | target |" in path.read_text()
    for stage in Q.STAGES:  # every headline states the null it is compared with (or why there is none)
        for line in json.loads((out / stage / ".stage.json").read_text())["records"]:
            assert line.get("null"), (stage, line["metric"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["stage"] for s in metrics["stages"]] == list(Q.STAGES)
    for stage in Q.STAGES:
        assert (out / stage / "report.md").is_file(), stage
        json.loads((out / stage / "metrics.json").read_text())
    assert "<html" in (out / "features" / "features.html").read_text().lower()
    # a re-run reuses every finished stage
    again = Q.run(tmp_path / "qs", preset="ci")
    assert all(s["status"] == "cached" for s in json.loads((again.parent / "metrics.json").read_text())["stages"])


def test_record_appends_only_main_job_seconds(tmp_path, monkeypatch):
    """`psm quickstart --record` writes one line, main_job_seconds with every stage's seconds in its reference; the
    stages run without recording (their quick-preset lines stay in the main job's report)."""
    import psm_jax

    calls = []

    def fake_execute(module, cfg, *, folder, model, progress, record, command):
        calls.append(record)
        folder.mkdir(parents=True, exist_ok=True)
        return {"seconds": 2.0, "records": [{"metric": "stage_figure", "value": 1.0, "unit": "x", "reference": "r"}]}

    results = tmp_path / "results.jsonl"
    monkeypatch.setenv("PSM_RESULTS", str(results))
    monkeypatch.setattr(psm_jax, "load", lambda name: object())
    monkeypatch.setattr(study, "execute", fake_execute)
    assert Q.main(["--out", str(tmp_path / "qs"), "--only", "axis,kv_editing", "--record"]) == 0
    assert calls == [False, False]
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert [ln["metric"] for ln in lines] == ["main_job_seconds"]
    assert "axis 2 s" in lines[0]["reference"] and "kv_editing 2 s" in lines[0]["reference"]
    assert lines[0]["command"].endswith("quickstart --out " + str(tmp_path / "qs") + " --only axis,kv_editing --record")
    assert "stage_figure" in (tmp_path / "qs" / "report.md").read_text()


def test_each_stage_releases_its_compiled_code(tmp_path, monkeypatch):
    """A finished stage's compiled executables are dropped before the next stage runs, so one process running every
    stage does not accumulate them (each holds memory mappings, which the kernel limits per process)."""
    import jax
    import jax.numpy as jnp

    import psm_jax

    step = jax.jit(lambda x: x + 1)
    sizes = []

    def fake_execute(module, cfg, *, folder, model, progress, record, command):
        sizes.append(step._cache_size())
        step(jnp.ones(3))
        folder.mkdir(parents=True, exist_ok=True)
        return {"seconds": 1.0, "records": []}

    monkeypatch.setattr(psm_jax, "load", lambda name: object())
    monkeypatch.setattr(study, "execute", fake_execute)
    Q.run(tmp_path / "qs", only=["axis", "kv_editing"])
    assert sizes == [0, 0] and step._cache_size() == 0


def test_force_clears_a_stage_cache_and_a_plain_rerun_keeps_it(tmp_path, monkeypatch):
    """`--force` removes the features stage's SAE cache before the stage runs (a forced run does all its work, as
    on a fresh machine), and says so in the record; a rerun without it leaves the cache in place."""
    import psm_jax

    seen = []

    def fake_execute(module, cfg, *, folder, model, progress, record, command):
        if module.endswith("persona_features"):
            cache = Path(cfg.sae_cache)
            seen.append(sorted(p.name for p in cache.iterdir()) if cache.exists() else None)
            cache.mkdir(parents=True, exist_ok=True)
            (cache / "trained_sae").write_text("x")
        folder.mkdir(parents=True, exist_ok=True)
        return {"seconds": 1.0, "records": []}

    results = tmp_path / "results.jsonl"
    monkeypatch.setenv("PSM_RESULTS", str(results))
    monkeypatch.setattr(psm_jax, "load", lambda name: object())
    monkeypatch.setattr(study, "execute", fake_execute)
    out = tmp_path / "qs"
    args = ["--out", str(out), "--only", "features"]
    assert Q.main(args) == 0 and seen == [None]
    (out / "features" / ".stage.json").unlink()  # a stage left unfinished: redone, its cache kept
    assert Q.main(args) == 0 and seen[-1] == ["trained_sae"]
    assert Q.main(args + ["--force", "--record"]) == 0 and seen[-1] is None
    assert (out / "features_sae" / "trained_sae").is_file()
    line = json.loads(results.read_text().splitlines()[-1])
    assert "forced (stages and their caches redone)" in line["reference"]
