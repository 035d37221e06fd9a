"""The study contract: the command-line grammar generated from Config, recording, and atomic vector pairs."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from experiments import cli, registry, study
from experiments.report import load_vectors, write_vectors


@dataclasses.dataclass(frozen=True)
class Toy:
    model: str = "m"
    n: int = 2
    rate: float = 0.5
    filter: bool = True
    traits: tuple[str, ...] = ("evil",)
    layers: tuple[int, ...] = (1,)
    coefs: tuple[float, ...] = (0.0,)
    ranges: tuple[tuple[int, int], ...] = ((0, 1),)
    target: int | None = None


def test_grammar_parses_every_field_type():
    got = study.parse_overrides(Toy, ["n=7", "rate=-1.5e-1", "filter=false", "traits=evil,humorous",
                                      "layers=18:22,30", "coefs=-1,0,2.5", "ranges=10:20,4:26", "target=none",
                                      "model=a=b"])
    assert got == dict(n=7, rate=-0.15, filter=False, traits=("evil", "humorous"), layers=(18, 19, 20, 21, 30),
                       coefs=(-1.0, 0.0, 2.5), ranges=((10, 20), (4, 26)), target=None, model="a=b")
    assert study.parse_overrides(Toy, ["target=3", "filter=YES"]) == dict(target=3, filter=True)


@pytest.mark.parametrize("arg, message", [
    ("nn=3", "unknown key 'nn'"), ("n=two", "n='two'; expected an integer"), ("rate=x", "rate='x'; expected a number"),
    ("filter=maybe", "filter='maybe'; expected true or false"), ("layers=5:3", "layers='5:3'; expected a range"),
    ("n", "expected key=value"), ("ranges=1-2", "expected a range a:b"),
])
def test_grammar_errors_name_the_key_and_value(arg, message):
    with pytest.raises(study.UsageError, match=message):
        study.parse_overrides(Toy, [arg])


def test_cli_errors_are_one_line_with_exit_2(capsys):
    assert cli.main(["kv-editing", "strengths=a,b"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "strengths='a,b'" not in err and "'a'" in err
    assert cli.main(["kv-editing", "bogus=1"]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err
    assert cli.main(["kv-editing", "--preset", "huge"]) == 2
    assert "preset 'huge'" in capsys.readouterr().err
    assert cli.main(["kv-editing", "strength_kind=percent"]) == 2  # Config's own validation, same exit
    assert "strength_kind='percent'" in capsys.readouterr().err
    assert cli.main(["kv-editing", "--frobnicate"]) == 2
    assert cli.main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    assert "kv-editing" in capsys.readouterr().out
    assert cli.main(["kv-editing", "--help"]) == 0
    out = capsys.readouterr().out
    assert "strength_kind='norm'" in out and "--preset" in out


def test_registry_modules_expose_their_contract():
    for s in registry.STUDIES:
        mod = study.load_study(s.module)
        assert set(study.PRESETS) <= set(mod.PRESETS), s.name
        for preset in study.PRESETS:
            cfg = study.preset_config(mod, preset)
            assert dataclasses.is_dataclass(cfg) and cfg.model
        for field, _ in s.inputs:
            assert field in study.field_types(mod.Config), (s.name, field)
        assert not hasattr(mod, "run_into"), s.name  # compute in run, write in report
        assert callable(mod.report) and callable(mod.records), s.name
    with pytest.raises(ValueError, match="unknown study 'nope'"):
        registry.get("nope")


def _toy_study(calls: list, with_prepare: bool):
    import types

    mod = types.ModuleType("toy_study")
    mod.Config, mod.PRESETS = Toy, {"ci": {}, "quick": {}, "full": {}}

    def prepare(config, model, progress):
        calls.append(("prepare", config.n))
        return dataclasses.replace(config, n=config.n + 1)

    def run(config, model, progress):
        calls.append(("run", config.n))
        return {"n": config.n}

    def report(result, folder):
        calls.append(("report", result["n"]))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.md").write_text("ok")
        return folder / "report.md"

    mod.run, mod.report = run, report
    mod.records = lambda result: [{"metric": "toy", "value": result["n"]}]
    if with_prepare:
        mod.prepare = prepare
    return mod


def test_execute_prepares_runs_then_reports(tmp_path):
    calls: list = []
    res = study.execute(_toy_study(calls, True), Toy(n=2), folder=tmp_path / "r", model=object())
    assert calls == [("prepare", 2), ("run", 3), ("report", 3)]  # run sees the prepared config
    assert res["report"] == tmp_path / "r" / "report.md"
    assert res["records"] == [{"metric": "toy", "value": 3, "model": "m"}]
    calls.clear()
    study.execute(_toy_study(calls, False), Toy(n=2), folder=tmp_path / "s", model=object())
    assert calls == [("run", 2), ("report", 2)]
    broken = _toy_study([], False)
    del broken.report
    with pytest.raises(TypeError, match=r"lacks \['report'\]"):
        study.load_study(broken)


def test_execute_stamps_the_configs_seed_and_model_on_lines_that_lack_them(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class Seeded:
        model: str = "m"
        n: int = 2
        seed: int = 3

    mod = _toy_study([], False)
    mod.Config = Seeded
    mod.records = lambda result: [{"metric": "a", "value": 1}, {"metric": "b", "value": 2, "seed": 7}]
    res = study.execute(mod, Seeded(), folder=tmp_path / "r", model=object())
    assert res["records"] == [{"metric": "a", "value": 1, "seed": 3, "model": "m"},
                              {"metric": "b", "value": 2, "seed": 7, "model": "m"}]
    unseeded = study.execute(_toy_study([], False), Toy(n=2), folder=tmp_path / "s", model=object())
    assert unseeded["records"] == [{"metric": "toy", "value": 2, "model": "m"}]


def test_record_lines_append_with_command(tmp_path, monkeypatch):
    from psm_jax import records

    path = tmp_path / "results.jsonl"
    monkeypatch.setenv("PSM_RESULTS", str(path))
    lines = [dict(metric="m", value=1.5, unit="x", reference="r", target="> 1", key="a")]
    records.record_lines(lines, "psm toy n=3")
    row = json.loads(path.read_text())
    assert row["command"] == "psm toy n=3" and row["key"] == "a" and row["machine"] and row["date"]
    with pytest.raises(ValueError, match="has no 'unit'"):  # checked before anything is written
        records.record_lines(lines + [dict(metric="m", value=1, reference="r")], "c")
    with pytest.raises(ValueError, match="value nan"):
        records.record(metric="m", value=float("nan"), unit="x", reference="r")
    assert len(path.read_text().splitlines()) == 1


def test_evidence_fields_are_checked_and_tabled():
    """A line's `ci` must be a finite [low, high] and its `null` a sentence; the headline cells read them, with
    "n/a" where a line states neither."""
    from psm_jax.records import check_line, evidence

    base = dict(metric="m", value=0.4, unit="r", reference="ref")
    for bad, match in (([0.5, 0.1], "low <= high"), ([0.1], "low <= high"), ([0.1, float("nan")], "finite"),
                       ("[0.1, 0.5]", "expected \\[low, high\\]")):
        with pytest.raises(ValueError, match=match):
            check_line({**base, "ci": bad})
    with pytest.raises(ValueError, match="null=''"):
        check_line({**base, "null": ""})
    with pytest.raises(ValueError, match="ci_of=3"):
        check_line({**base, "ci_of": 3})
    line = check_line({**base, "ci": [-0.05, 0.71], "ci_of": "the shift", "null": "shuffled: [-0.5, 0.5]"})
    assert evidence(line) == {"interval": "[-0.05, +0.71] (the shift)", "null": "shuffled: [-0.5, 0.5]"}
    assert evidence({**base, "ci": [0.1234, 0.5678]})["interval"] == "[0.123, 0.568]"
    assert evidence(base) == {"interval": "n/a", "null": "n/a"}


def test_main_job_table_shows_each_headline_with_interval_and_null():
    from experiments import quickstart as Q
    from experiments import registry

    entry = next(s for s in registry.STUDIES if s.main_job)
    row = Q._headline(entry, dict(metric="m", value=0.51234, unit="r", reference="ref", target="> 0.5", key="evil",
                                  trait="evil", ci=[0.2, 0.8], null="shuffled within polarity: [-0.4, 0.4]"))
    assert row == {"stage": entry.stage, "metric": "m (trait=evil)", "value": "0.5123", "95% CI": "[0.2, 0.8]",
                   "null": "shuffled within polarity: [-0.4, 0.4]", "target": "> 0.5"}


@pytest.mark.parametrize("flags, isa", [
    ("fpu sse4_2 avx avx2 fma", "avx2"),
    ("avx2 avx512f avx512bw", "avx512"),
    ("avx2 avx512f avx512_bf16 amx_tile amx_bf16", "avx512+bf16+amx"),
    ("fp asimd sve", ""),
])
def test_machine_names_the_vector_instructions(flags, isa):
    from psm_jax.records import vector_isa

    assert vector_isa(flags.split()) == isa


def test_vector_pair_survives_a_failure_mid_write(tmp_path, monkeypatch):
    import experiments.report as R

    old = np.ones((2, 4), np.float32)
    write_vectors(tmp_path, "vec", {"v": old}, {"model": "m", "layer": 1})
    calls = []
    real = R.atomic_write_bytes

    def failing(path, data, **kw):  # the sidecar (second file) fails after the tensors were written
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path, data, **kw)

    monkeypatch.setattr(R, "atomic_write_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        write_vectors(tmp_path, "vec", {"v": 2 * old}, {"model": "m", "layer": 2})
    monkeypatch.undo()
    tensors, meta = load_vectors(tmp_path / "vec.safetensors")
    assert np.array_equal(tensors["v"], old) and json.loads((tmp_path / "vec.json").read_text())["layer"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vec.json", "vec.safetensors"]  # no staging left
    # a pair whose sidecar does not belong to the tensors is refused
    write_vectors(tmp_path / "other", "vec", {"v": 3 * old}, {"model": "m"})
    (tmp_path / "vec.json").write_bytes((tmp_path / "other" / "vec.json").read_bytes())
    with pytest.raises(ValueError, match="does not match its sidecar"):
        load_vectors(tmp_path / "vec.safetensors")


def test_report_table_escapes_pipes_inside_cells(tmp_path):
    import re

    from experiments.report import Report

    rep = Report(tmp_path, "t")
    rep.table("T", [dict(metric="axis_assistant_pc_cosine", target="|cos| > 0.6", value=0.5)])
    row = rep.sections[-1].splitlines()[-1]
    assert row == "| axis_assistant_pc_cosine | \\|cos\\| > 0.6 | 0.5 |"
    assert len(re.findall(r"(?<!\\)\|", row)) == 4  # three cells: four unescaped separators


def test_vectors_written_twice_are_the_same_bytes(tmp_path):
    """The safetensors writer orders metadata by a per-process hash; written in two processes, the same vectors
    must still give the same file (and sidecar sha256), and the rewritten header must load in safetensors and
    torch."""
    import subprocess
    import sys

    import torch
    from safetensors.numpy import load_file
    from safetensors.torch import load_file as torch_load_file

    script = ("import sys, numpy as np; from experiments.report import write_vectors; "
              "write_vectors(sys.argv[1], 'vec', {'b': np.arange(6.0).reshape(2, 3), 'a': np.ones(5)}, "
              "{f'key{i}': i for i in range(10)})")
    for name in ("one", "two"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / name)], check=True, cwd=Path(__file__).parents[1])
    one, two = (tmp_path / "one" / "vec.safetensors"), (tmp_path / "two" / "vec.safetensors")
    assert one.read_bytes() == two.read_bytes()
    assert (tmp_path / "one" / "vec.json").read_bytes() == (tmp_path / "two" / "vec.json").read_bytes()
    assert np.array_equal(load_file(str(one))["b"], np.arange(6.0, dtype=np.float32).reshape(2, 3))
    assert torch.equal(torch_load_file(str(one))["a"], torch.ones(5))
    tensors, meta = load_vectors(one)
    assert meta["key7"] == 7 and np.array_equal(tensors["a"], np.ones(5, np.float32))
