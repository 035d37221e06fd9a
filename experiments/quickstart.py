"""The main job: every study of the registry (`experiments.registry`, those with main_job=True), in order, at one
preset, on one model, each into a subfolder of one report folder.

A study that reads an earlier one's output gets its path from the registry's `inputs` (the Assistant Axis for
capping and KV editing, the persona features for feature steering). Re-runs reuse finished stages: a stage is
skipped when its folder holds `.stage.json` with the same config; `--force` redoes every stage and clears the
caches a study keeps for itself (`registry.Study.caches`: the features stage's trained SAE). The top-level
report.md links every stage report and collects each study's record lines: the headline numbers, each with its
95% interval and the null it is compared with (`psm_jax.records.evidence`). `--record` appends only
`main_job_seconds` to the results file: the studies' lines at the main job's small preset stay in its report, so
they never stand in for a study's own larger run.

    psm quickstart [--preset quick|ci|full] [--out runs/quickstart] [--only axis,kv_editing] [--force] [--record]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from experiments import registry, study
from experiments.report import Report, atomic_write_json
from psm_jax.persona import DEFAULT_MODEL
from psm_jax.records import evidence

STAGES = tuple(s.stage for s in registry.STUDIES if s.main_job)


def stage_config(entry: registry.Study, preset: str, out: Path, model_name: str, seed: int):
    """The study's config at `preset`, on `model_name` with `seed`, reading its inputs from earlier stages."""
    inputs = {field: str(out / rel) for field, rel in entry.inputs}
    return study.preset_config(entry.module, preset, model=model_name, seed=seed, **inputs)


def _check(preset: str, only) -> tuple[str, ...]:
    if preset not in study.PRESETS:
        raise ValueError(f"preset={preset!r}; expected one of {study.PRESETS}")
    stages = STAGES if not only else tuple(only)
    for s in stages:
        if s not in STAGES:
            raise ValueError(f"unknown stage {s!r}; expected some of {STAGES}")
    return stages


def _headline(entry: registry.Study, line: dict) -> dict:
    extra = ", ".join(f"{k}={line[k]}" for k in ("key", "trait", "mode", "pc", "measure") if k in line and
                      not (k == "key" and any(line.get(j) == line["key"] for j in ("trait", "mode", "pc"))))
    value = line["value"]
    cells = evidence(line)
    return dict(stage=entry.stage, metric=line["metric"] + (f" ({extra})" if extra else ""),
                value=f"{value:.4g}" if isinstance(value, float) else str(value),
                **{"95% CI": cells["interval"], "null": cells["null"]}, target=line.get("target") or "")


def run(out: str | Path = "runs/quickstart", preset: str = "quick", only=None, force: bool = False,
        model_name: str = DEFAULT_MODEL, seed: int = 0, model=None) -> Path:
    """Run the main job into `out` and return the path of its report.md."""
    stages = _check(preset, only)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if model is None:
        import psm_jax

        print(f"[quickstart] loading {model_name}", flush=True)
        model = psm_jax.load(model_name)
    timings, headlines = [], []
    for entry in registry.STUDIES:
        if entry.stage not in stages:
            continue
        timing, lines = _run_stage(entry, stage_config(entry, preset, out, model_name, seed), out / entry.stage,
                                   model, preset, force)
        timings.append(timing)
        headlines += [_headline(entry, ln) for ln in lines]
    total = time.time() - t0
    path = _write_main_report(out, preset, stages, seed, model_name, timings, headlines, total)
    print(f"[quickstart] report: {path.resolve()} ({total:.0f} s)", flush=True)
    return path


def _run_stage(entry, cfg, folder: Path, model, preset: str, force: bool) -> tuple[dict, list[dict]]:
    """Run one study into `folder`, or reuse it where its marker holds the same config (unless `force`): (timing,
    its record lines). A stale or half-finished stage folder is removed and redone from scratch; `force` also
    clears the study's own caches (`registry.Study.caches`), so that a forced run does all of its work."""
    cfg_dict = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    marker = folder / ".stage.json"
    if not force and marker.is_file() and json.loads(marker.read_text()).get("config") == cfg_dict:
        print(f"[quickstart] {entry.stage}: cached ({folder})", flush=True)
        saved = json.loads(marker.read_text())
        return dict(stage=entry.stage, seconds=0.0, status="cached"), saved.get("records", [])
    if folder.exists():
        shutil.rmtree(folder)
    for field in entry.caches if force else ():
        cache = Path(getattr(cfg, field))
        if cache.exists():
            print(f"[quickstart] {entry.stage}: clearing its cache {cache}", flush=True)
            shutil.rmtree(cache)
    print(f"[quickstart] {entry.stage}: running", flush=True)
    res = study.execute(entry.module, cfg, folder=folder, model=model, progress=study.progress_printer(entry.stage),
                        record=False, command=f"{study.RERUN_PREFIX} {entry.name} --preset {preset} --out {folder}")
    _release_compiled_code()
    lines = json.loads(json.dumps(res["records"], default=str))
    atomic_write_json(marker, {"config": cfg_dict, "seconds": res["seconds"], "records": lines})
    print(f"[quickstart] {entry.stage}: done in {res['seconds']:.0f} s", flush=True)
    return dict(stage=entry.stage, seconds=round(res["seconds"], 1), status="ran"), lines


def _release_compiled_code() -> None:
    """Drops the finished stage's compiled executables. Later stages compile their own functions, and every live
    XLA CPU executable keeps a few memory mappings: one process running every stage at a large preset would
    otherwise approach the kernel's per-process mapping limit (vm.max_map_count), past which compilation fails."""
    import jax

    jax.clear_caches()


def _write_main_report(out: Path, preset: str, stages, seed: int, model_name: str, timings: list[dict],
                       headlines: list[dict], total: float) -> Path:
    """The main job's report.md: what ran, each stage's time and report, every headline line, two plots a stage."""
    rep = Report(out, f"psm-jax main job on {model_name}", {"preset": preset, "stages": stages, "seed": seed,
                                                             "model": model_name})
    rep.section("What ran", f"Each study ran at its `{preset}` preset on `{model_name}` (seed {seed}); its own report "
                "states the sizes, n, validity checks and intervals. Open them for plots, tables and caveats.")
    rep.table("Stages", [dict(**t, report=f"[{t['stage']}/report.md]({t['stage']}/report.md)") for t in timings])
    rep.table("Headline numbers (each study's record lines)", headlines)
    if (out / "features" / "features.html").is_file():
        rep.section("Feature browser", "[features/features.html](features/features.html) (static, opens from disk)")
    figs = []
    for stage in stages:
        figs += [f"![{stage}: {p.stem}]({stage}/{p.name})" for p in sorted((out / stage).glob("*.png"))[:2]]
    rep.section("Selected plots", "\n\n".join(figs))
    rep.metric("seconds", total)
    rep.metric("stages", timings)
    return rep.finish()


def record_main_job(seconds: float, report_path: Path, preset: str, only, argv, *, force: bool = False) -> dict:
    """Append `main_job_seconds`, its reference naming the preset, the stages with their own seconds, the cores and
    whether the run was forced (every stage and its caches redone: what a fresh machine runs)."""
    import os

    from psm_jax.records import record

    stages = json.loads((Path(report_path).parent / "metrics.json").read_text()).get("stages", [])
    times = ", ".join(f"{s['stage']} {s['seconds']:.0f} s" + (" (cached)" if s["status"] == "cached" else "")
                      for s in stages)
    return record("main_job_seconds", round(seconds, 1), "s",
                  f"psm quickstart --preset {preset}, {only or 'all stages'} on {os.cpu_count()} CPU cores"
                  f"{', forced (stages and their caches redone)' if force else ''}; stages: {times}", "<= 900",
                  command=f"{study.RERUN_PREFIX} quickstart " + " ".join(argv if argv is not None else sys.argv[1:]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="psm quickstart", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/quickstart")
    ap.add_argument("--preset", default="quick", choices=study.PRESETS)
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--force", action="store_true",
                    help="re-run stages even when cached, clearing their own caches (e.g. the features stage's SAE)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--record", action="store_true",
                    help="append main_job_seconds (the whole job's wall time) to benchmarks/results.jsonl")
    a = ap.parse_args(argv)
    try:
        _check(a.preset, a.only.split(",") if a.only else None)
    except ValueError as err:
        print(f"psm quickstart: {err}", file=sys.stderr, flush=True)
        return 2
    t = time.time()
    path = run(a.out, a.preset, a.only.split(",") if a.only else None, a.force, model_name=a.model, seed=a.seed)
    if a.record:
        record_main_job(time.time() - t, path, a.preset, a.only, argv, force=a.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
