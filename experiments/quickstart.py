"""The main job: the whole persona pipeline, compactly, on the packaged default model.

Stages (each an experiment module run with a small config into a subfolder of one report folder):
  axis              role vectors, persona space, the Assistant Axis, drift      (experiments.assistant_axis)
  persona_vectors   one trait's persona vector, steering sweep, monitoring      (experiments.persona_vectors)
  capping           activation capping along the axis                           (experiments.capping)
  features          harvest ShareGPT, train a small TopK SAE, discover and label persona latents,
                    HTML feature browser                                         (experiments.persona_features)
  feature_steering  steer with the best persona latent vs the persona vector    (experiments.feature_steering)
  kv_editing        edit cached assistant-token states toward the Assistant     (experiments.kv_editing)
Re-runs reuse finished stages: a stage is skipped when its folder holds `.stage.json` with the same
config. The top-level report.md links every stage report and collects the headline numbers.

    psm quickstart [--out runs/quickstart] [--size quick|ci] [--only axis,kv_editing] [--force]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from experiments.report import Report, atomic_write_json

# Sizes: "quick" is the README's main job (about 15 minutes on 2 CPU cores); "ci" is the smallest
# run that still exercises every stage on the real model.
SIZES = {
    "quick": dict(
        axis=dict(n_roles=10, instructions_per_role=1, n_questions=3, default_samples=1, max_new_tokens=32,
                  drift_sharegpt=4, drift_max_chars=2500),
        persona_vectors=dict(traits=("evil",), n_pairs=3, n_questions=3, n_samples=1, max_new_tokens=32, judge="none",
                             filter=False, sweep_layers=(9, 15, 21), n_monitor_questions=2,
                             coefficients=(-1.0, -0.5, 0.0, 0.5, 1.0), screening=False, n_response_questions=8,
                             response_max_new_tokens=24),
        capping=dict(n_threshold_questions=3, max_new_tokens=24, n_eval_roles=3, n_identity_probes=3,
                     logprob_probes=("Who are you?", "What are you?"), traits=("evil",), n_trait_items=8,
                     roleplay_probes=("Who are you?",), n_ppl_conversations=4, ppl_max_chars=2000),
        features=dict(traits=("evil",), n_pairs=2, n_questions=4, max_new_tokens=32, n_roles=4, role_questions=4,
                      n_candidates=6, context_docs=40, context_max_len=128, n_bins=5, per_bin=2, n_random=6,
                      train_tokens=120_000, train_docs=1500, train_steps=250, train_batch=2048, context_len=256,
                      n_detect=2, max_detect=4),
        feature_steering=dict(strengths=(-0.5, 0.0, 0.25, 0.5), clamp_multiples=(0.0, 2.0), n_eval_questions=2,
                              max_new_tokens=24),
        kv_editing=dict(n_conversations=1, probes=2, samples=4, strengths=(-0.15, 0.3), max_new_tokens=24,
                        layer_ranges=((10, 20),)),
    ),
    "ci": dict(
        axis=dict(n_roles=4, instructions_per_role=1, n_questions=2, default_samples=1, max_new_tokens=12,
                  drift_sharegpt=2, drift_max_chars=1200),
        persona_vectors=dict(traits=("evil",), n_pairs=2, n_questions=2, n_samples=1, max_new_tokens=12, judge="none",
                             filter=False, sweep_layers=(15,), n_monitor_questions=1,
                             coefficients=(-0.5, 0.0, 0.5), screening=False, n_response_questions=4,
                             response_max_new_tokens=12),
        capping=dict(n_threshold_questions=2, max_new_tokens=12, n_eval_roles=2, n_identity_probes=2,
                     logprob_probes=("Who are you?",), traits=("evil",), n_trait_items=4,
                     roleplay_probes=("Who are you?",), n_ppl_conversations=2, ppl_max_chars=1200),
        features=dict(traits=("evil",), n_pairs=2, n_questions=4, max_new_tokens=12, n_roles=4, role_questions=4,
                      n_candidates=4, context_docs=12, context_max_len=96, n_bins=3, per_bin=2, n_random=4,
                      train_tokens=20_000, train_docs=300, train_steps=30, train_batch=1024, context_len=128,
                      n_detect=1, max_detect=2, diff=False),
        feature_steering=dict(strengths=(0.0, 0.5), clamp_multiples=(0.0, 2.0), n_eval_questions=1,
                              max_new_tokens=8, positions=("all",)),
        kv_editing=dict(n_conversations=1, probes=1, samples=2, strengths=(0.3,), max_new_tokens=8,
                        layer_ranges=((10, 20),)),
    ),
}
STAGES = ("axis", "persona_vectors", "capping", "features", "feature_steering", "kv_editing")


def _stage_config(stage: str, size: str, out: Path, model_name: str, seed: int):
    kw = dict(SIZES[size][stage])
    axis_file = str(out / "axis" / "axis.safetensors")
    if stage == "axis":
        from experiments.assistant_axis import AxisConfig

        return AxisConfig(model=model_name, seed=seed, out=str(out / stage), **kw)
    if stage == "persona_vectors":
        from experiments.persona_vectors import PersonaVectorsConfig

        return PersonaVectorsConfig(model=model_name, seed=seed, **kw)
    if stage == "capping":
        from experiments.capping import CappingConfig

        return CappingConfig(model=model_name, seed=seed, axis_file=axis_file, out=str(out / stage), **kw)
    if stage == "features":
        from experiments.persona_features import PersonaFeaturesConfig

        return PersonaFeaturesConfig(model=model_name, seed=seed, sae_cache=str(out / "features_sae"), **kw)
    if stage == "feature_steering":
        from experiments.feature_steering import FeatureSteeringConfig

        return FeatureSteeringConfig(model=model_name, seed=seed, features=str(out / "features"), **kw)
    if stage == "kv_editing":
        from experiments.kv_editing import KVEditConfig

        return KVEditConfig(model=model_name, seed=seed, axis_file=axis_file, out=str(out / stage), **kw)
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")


def _run_stage(stage: str, cfg, out: Path, model):
    if stage == "axis":
        from experiments.assistant_axis import run
        return run(cfg, model=model)
    if stage == "persona_vectors":
        from experiments.persona_vectors import run
        return run(cfg, out / stage, model=model)
    if stage == "capping":
        from experiments.capping import run
        return run(cfg, model=model)
    if stage == "features":
        from experiments.persona_features import run
        return run(cfg, out / stage, model=model)
    if stage == "feature_steering":
        from experiments.feature_steering import run
        return run(cfg, out / stage, model=model)
    from experiments.kv_editing import run
    return run(cfg, model=model)


def _headlines(out: Path) -> list[dict]:
    """A few numbers per stage, read back from each stage's metrics.json (nested ones flattened to one row each)."""
    def num(v):
        return f"{v:.4g}" if isinstance(v, float) else json.dumps(v)[:120]

    def per_stage(stage: str, m: dict):
        if stage == "axis":
            for k in ("persona_space_pcs_for_70pct", "axis_pc1_cosine", "target_layer"):
                yield k, m.get(k)
        elif stage == "persona_vectors":
            for k in ("persona_steering_monotonic_traits", "persona_steering_monotonic_traits_run",
                      "persona_steering_monotonic_traits_response", "persona_steering_monotonic_traits_response_run"):
                yield k, m.get(k)
            for name, tr in (m.get("traits") or {}).items():
                yield f"persona_monitor_r ({name}, items)", tr.get("monitor_r_last_prompt")
                if "response_measure" in tr:
                    yield f"persona_monitor_r ({name}, response likelihood)", tr["response_measure"].get("r_last_prompt")
        elif stage == "capping":
            for k in ("capping_identity_gain", "capping_ppl_cost"):
                yield k, m.get(k)
        elif stage == "features":
            for name, c in (m.get("contrasts") or {}).items():
                yield f"persona_latents_found ({name}; shuffled-label null mean)", f"{c.get('n_found')} ({num(c.get('null_found_mean'))})"
                yield f"best latent ({name}): index, detection balanced accuracy", \
                    f"{c.get('best_latent')}, {num(c.get('best_detection_balanced_accuracy'))}"
        elif stage == "feature_steering":
            for name, tr in (m.get("traits") or {}).items():
                yield f"feature_steering_effect ({name}; persona vector; random)", \
                    f"{num(tr.get('effect'))} ({num(tr.get('vector_effect'))}; {num(tr.get('random_effect'))})"
        elif stage == "kv_editing":
            for mode, v in (m.get("kv_edit_identity_shift") or {}).items():
                yield f"kv_edit_identity_shift ({mode}, s={v.get('strength')}, layers {v.get('layers')}, n={v.get('n')})", \
                    v.get("logodds_shift")

    rows = []
    for stage in STAGES:
        f = out / stage / "metrics.json"
        if not f.is_file():
            continue
        m = json.loads(f.read_text())
        rows += [dict(stage=stage, metric=k, value=v if isinstance(v, str) else num(v))
                 for k, v in per_stage(stage, m) if v is not None]
    return rows


def run(out: str | Path = "runs/quickstart", size: str = "quick", only=None, force: bool = False,
        model_name: str = "smollm2-135m-instruct", seed: int = 0) -> Path:
    import psm_jax

    if size not in SIZES:
        raise ValueError(f"size={size!r}; expected one of {sorted(SIZES)}")
    stages = STAGES if not only else tuple(only)
    for s in stages:
        if s not in STAGES:
            raise ValueError(f"unknown stage {s!r}; expected some of {STAGES}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"[quickstart] loading {model_name}", flush=True)
    model = psm_jax.load(model_name)
    timings = []
    for stage in stages:
        cfg = _stage_config(stage, size, out, model_name, seed)
        cfg_dict = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
        marker = out / stage / ".stage.json"
        if not force and marker.is_file() and json.loads(marker.read_text()).get("config") == cfg_dict:
            print(f"[quickstart] {stage}: cached ({marker.parent})", flush=True)
            timings.append(dict(stage=stage, seconds=0.0, status="cached"))
            continue
        if (out / stage).exists():
            shutil.rmtree(out / stage)  # a stale or half-finished stage is redone from scratch
        print(f"[quickstart] {stage}: running", flush=True)
        ts = time.time()
        _run_stage(stage, cfg, out, model)
        secs = time.time() - ts
        atomic_write_json(marker, {"config": cfg_dict, "seconds": secs})
        timings.append(dict(stage=stage, seconds=round(secs, 1), status="ran"))
        print(f"[quickstart] {stage}: done in {secs:.0f} s", flush=True)

    rep = Report(out, "psm-jax quickstart: the persona pipeline on " + model_name,
                 {"size": size, "stages": stages, "seed": seed, "model": model_name})
    rep.section("What ran", "Each stage wrote its own report; open them for plots, tables and caveats. "
                "SmolLM2-135M-Instruct is a small model and a weak judge: effects are small and several are null.")
    rep.table("Stages", [dict(**t, report=f"[{t['stage']}/report.md]({t['stage']}/report.md)") for t in timings])
    rep.table("Headline numbers", _headlines(out))
    if (out / "features" / "features.html").is_file():
        rep.section("Feature browser", "[features/features.html](features/features.html) (static, opens from disk)")
    figs = []
    for stage in stages:
        pngs = sorted((out / stage).glob("*.png"))[:2]
        figs += [f"![{stage}: {p.stem}]({stage}/{p.name})" for p in pngs]
    rep.section("Selected plots", "\n\n".join(figs))
    total = time.time() - t0
    rep.metric("seconds", total)
    rep.metric("stages", timings)
    path = rep.finish()
    print(f"[quickstart] report: {path.resolve()} ({total:.0f} s)", flush=True)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="psm quickstart", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/quickstart")
    ap.add_argument("--size", default="quick", choices=sorted(SIZES))
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--force", action="store_true", help="re-run stages even when cached")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--record", action="store_true", help="append main_job_seconds to benchmarks/results.jsonl")
    a = ap.parse_args(argv)
    t = time.time()
    run(a.out, a.size, a.only.split(",") if a.only else None, a.force, seed=a.seed)
    if a.record:
        from benchmarks.record import record

        record("main_job_seconds", round(time.time() - t, 1), "s", f"psm quickstart --size {a.size}, all stages, "
               "fresh output folder, 2 CPU cores", "<= 900", command=".venv/bin/python -m experiments.cli quickstart "
               + " ".join(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
