"""The studies `psm` knows, in the order `psm quickstart` runs them.

Each entry names the command, the module and the inputs it takes from an earlier study's folder in the main job
(`inputs`: config field -> path relative to the main job's output folder; `caches`: those of its inputs that the
study itself fills and reuses, such as a trained SAE, which `psm quickstart --force` clears). Every module follows the study contract
(`experiments.study`); `main_job` marks the studies `psm quickstart` runs.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Study:
    name: str  # the `psm` command
    module: str
    stage: str  # subfolder of the main job's output
    main_job: bool = True
    inputs: tuple[tuple[str, str], ...] = ()  # (config field, path under the main job's folder)
    caches: tuple[str, ...] = ()  # input fields that are the study's own reusable caches (`--force` clears them)


STUDIES = (
    Study("assistant-axis", "experiments.assistant_axis", "axis"),
    Study("persona-vectors", "experiments.persona_vectors", "persona_vectors"),
    Study("capping", "experiments.capping", "capping", inputs=(("axis_file", "axis/axis.safetensors"),)),
    Study("features", "experiments.persona_features", "features", inputs=(("sae_cache", "features_sae"),),
          caches=("sae_cache",)),
    Study("feature-steering", "experiments.feature_steering", "feature_steering",
          inputs=(("features", "features"),)),
    Study("kv-editing", "experiments.kv_editing", "kv_editing", inputs=(("axis_file", "axis/axis.safetensors"),)),
    Study("refusal", "experiments.refusal", "refusal", main_job=False),
    Study("refusal-organism", "experiments.refusal_organism", "refusal_organism", main_job=False),
    Study("finetune", "experiments.finetune", "finetune", inputs=(("axis_file", "axis/axis.safetensors"),)),
)
BY_NAME = {s.name: s for s in STUDIES}


def get(name: str) -> Study:
    if name not in BY_NAME:
        raise ValueError(f"unknown study {name!r}; expected one of {', '.join(BY_NAME)}")
    return BY_NAME[name]
