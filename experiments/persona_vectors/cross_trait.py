"""Steps 6 and 8, which compare the traits' vectors with each other: where each vector is steered across traits,
the specificity matrix of the whole vectors and of their trait-specific parts, and the cosine matrix."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from experiments.persona_vectors.config import MEASURE_KEYS
from experiments.persona_vectors.trait_result import TraitResult
from psm_jax.persona import specificity as SP
from psm_jax.persona.measures import is_valid
from psm_jax.persona.steering import ContrastPairs, steering_vector


def primary_measure(r: TraitResult) -> str | None:
    """The trait's first measure (items, then response likelihood) whose validity check passed; None if none."""
    for name, key in MEASURE_KEYS:
        if key in r and is_valid(r[key].get("validity")):
            return name
    return None


def steering_layer(r: TraitResult) -> int:
    """Where trait r's vector is steered across traits: its valid measure's chosen layer (else the last measure's)."""
    name = primary_measure(r)
    keys = [key for n, key in MEASURE_KEYS if key in r and (name is None or n == name)]
    return int(r[keys[-1] if name is None else keys[0]]["layer"])


MIN_SPECIFICITY_TRAITS = 2  # specificity compares a trait's effect with its effect on the others


def _steering_vector_of(r: TraitResult, coef: float) -> np.ndarray:
    """Trait r's vector as it is steered across traits: coef steering units of its response-average direction at
    `steering_layer`."""
    return coef * steering_vector(r["vectors"]["response_avg"], r["scales"], steering_layer(r))


def _specificity_targets(results: list[TraitResult], measure: Sequence[str | None]) -> list[ContrastPairs | None]:
    """Trait j's column of the specificity matrix: the held-out units of its valid measure (None: none valid)."""
    return [r["held_out_pairs"][m] if m is not None else None for r, m in zip(results, measure)]


def specificity_matrix(model, results: list[TraitResult], coef: float) -> dict:
    """The specificity matrix over the traits (`specificity.specificity_matrix`): steer with trait i's vector
    (`_steering_vector_of`) and with its random unit directions at the same norm and layer, measure trait j on its
    valid measure's held-out units (symmetric effects m(+coef) - m(-coef); NaN columns where trait j has no valid
    measure), each cell as a z-score against its random band. Adds the trait names, the measures, layers and coef."""
    measure = [primary_measure(r) for r in results]
    layers = [steering_layer(r) for r in results]
    matrix = SP.specificity_matrix(model, [_steering_vector_of(r, coef) for r in results], layers,
                                   [r["random_units"] for r in results], _specificity_targets(results, measure))
    return {"traits": [r["trait"] for r in results], "measure": measure, "layers": layers, "coef": coef, **matrix}


def trait_specific_vector(results: list[TraitResult], i: int, coef: float) -> tuple[np.ndarray | None, float]:
    """Trait i's steering vector without the part it shares with the other traits' vectors: the component of its
    response-average direction at its steering layer orthogonal to the other traits' response-average directions at
    that layer, at the whole vector's norm (`specificity.specific_part`). Returns (vector or None where nothing is
    left, the fraction of the direction's length the component keeps)."""
    layer = steering_layer(results[i])
    own = np.asarray(results[i]["vectors"]["response_avg"], np.float64)[layer]
    others = [np.asarray(r["vectors"]["response_avg"], np.float64)[layer] for j, r in enumerate(results) if j != i]
    return SP.specific_part(own, others, float(np.linalg.norm(_steering_vector_of(results[i], coef))))


def trait_specific_matrix(model, results: list[TraitResult], whole: dict) -> dict:
    """The specificity matrix of each vector's trait-specific part (`trait_specific_vector`), scored against the
    whole-vector matrix's random bands: the same random units at the same norm and layer, so the steered vector is
    the only thing that differs between the two matrices (`specificity.matrix_against_band`). `whole` is
    `specificity_matrix`'s output."""
    parts = [trait_specific_vector(results, i, whole["coef"]) for i in range(len(results))]
    matrix = SP.matrix_against_band(model, [vec for vec, _ in parts], whole["layers"],
                                    _specificity_targets(results, whole["measure"]), whole["random"], whole["min_z"])
    shared = {k: whole[k] for k in ("traits", "measure", "layers", "coef", "random", "valid", "n_random", "min_z")}
    return {**shared, **matrix, "kept_fraction": [kept for _, kept in parts]}


def cosine_matrix(results: list[TraitResult]) -> tuple[int, list[str], np.ndarray]:
    """Cosines between the traits' response_avg vectors at the layer chosen most often: (layer, names, [T, T])."""
    chosen = [r["steering"]["layer"] for r in results]
    common = max(sorted(set(chosen)), key=chosen.count)
    V = np.stack([r["vectors"]["response_avg"][common] for r in results]).astype(np.float64)
    Vn = V / (np.linalg.norm(V, axis=1, keepdims=True) + 1e-8)
    return common, [r["trait"] for r in results], Vn @ Vn.T
