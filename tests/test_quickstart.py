"""The main job: stage configs build, bad inputs are named, and (slow) a CI-size run writes parseable reports."""
import json

import pytest

from experiments import quickstart as Q


def test_every_stage_config_builds_for_every_size(tmp_path):
    for size in Q.SIZES:
        for stage in Q.STAGES:
            cfg = Q._stage_config(stage, size, tmp_path, "smollm2-135m-instruct", 0)
            assert cfg.seed == 0


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="size"):
        Q.run(tmp_path, size="huge")
    with pytest.raises(ValueError, match="unknown stage"):
        Q.run(tmp_path, only=["axes"])


@pytest.mark.slow
def test_main_job_ci_size_writes_reports(tmp_path):
    path = Q.run(tmp_path / "qs", size="ci")
    out = path.parent
    assert "Headline numbers" in path.read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["stage"] for s in metrics["stages"]] == list(Q.STAGES)
    for stage in Q.STAGES:
        assert (out / stage / "report.md").is_file(), stage
        json.loads((out / stage / "metrics.json").read_text())
    assert "<html" in (out / "features" / "features.html").read_text().lower()
    # a re-run reuses every finished stage
    again = Q.run(tmp_path / "qs", size="ci")
    assert all(s["status"] == "cached" for s in json.loads((again.parent / "metrics.json").read_text())["stages"])
