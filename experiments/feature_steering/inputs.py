"""What the study reads from a `psm features` output folder: candidates.json (the ranked latents per trait and the
SAE's source), the persona directions at the SAE's layer, and the SAE itself; and which latents of a trait's ranking
are steered. Checked on reading, so that a mismatched folder fails before any model time is spent."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from experiments.sae_source import load_feature_sae
from sae import features as F

# (candidates.json as a dict, the persona directions {trait: [D]}, the SAE they were ranked in)
FeaturesRun = tuple[dict, dict[str, np.ndarray], F.FeatureSae]


def read_directions(folder, width: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """persona_directions.safetensors + its JSON sidecar from a features run (read directly: the
    metadata holds free text, which experiments.report.load_vectors may try to parse as JSON)."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    path = folder / "persona_directions.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `psm features --out {folder}` first")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - any safetensors failure
        raise ValueError(f"{path} is corrupt or not safetensors: {err}") from err
    side = folder / "persona_directions.json"
    meta = json.loads(side.read_text()) if side.is_file() else {}
    if width is not None:
        for k, v in tensors.items():
            if v.shape != (width,):
                raise ValueError(f"direction {k!r} in {path} has shape {v.shape}; expected ({width},)")
    return tensors, meta


def load_features(folder, *, model, sae_override: str | None = None) -> FeaturesRun:
    """(candidates dict, directions {name: [D]}, FeatureSae) from a `psm features` output folder."""
    folder = Path(folder)
    path = folder / "candidates.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `psm features --out {folder}` first")
    cand = json.loads(path.read_text())
    tensors, meta = read_directions(folder, width=model.config.d_model)
    src = sae_override or cand["sae"].get("saelens_export") or cand["sae"].get("source")
    if not src or not Path(src).exists():
        raise FileNotFoundError(f"the SAE of {folder} ({src!r}) is not on disk; pass sae=PATH")
    layer = int(cand["sae"]["layer"])
    model.config.check_layer(layer, "SAE layer")
    sae, _ = load_feature_sae(src, layer, default_layer=layer)
    if sae.layer != int(meta.get("layer", sae.layer)):
        raise ValueError(f"the SAE reads layer {sae.layer} but the directions were taken at layer {meta.get('layer')}")
    return cand, tensors, sae


def ranked_info(info: dict, ranking: str, trait: str) -> dict:
    """A trait's entry of candidates.json under `ranking`: the contrast ranking (the entry itself) or its
    trait-specific ranking (the entry's "specific" part: best, candidates, max_act)."""
    if ranking == "contrast":
        return info
    if "specific" not in info:
        raise ValueError(f"ranking={ranking!r}, but the features run has no trait-specific ranking for {trait!r} "
                         "(it needs at least two traits)")
    return info["specific"]


def top_latents(info: dict, n: int) -> list[int]:
    """The trait's best latent, then its other candidates in rank order, `n` at most."""
    out = [int(info["best"])]
    for c in info.get("candidates", []):
        if int(c) not in out:
            out.append(int(c))
    return out[:n]
