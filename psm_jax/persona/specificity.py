"""Specificity of steering directions: steer with direction i, read measure j, and score each cell against random
directions steered at the same norm and layer.

A direction is specific when it moves its own measure beyond the random band (diagonal z > `MIN_Z`) and moves every
other measure less than its own (each off-diagonal |z| below the diagonal). The cells are symmetric effects
m(+v) - m(-v), so a shift that any perturbation of that norm causes whatever its sign (which random directions show
too) cancels out. Works for any set of directions: persona vectors, SAE decoder rows, their trait-specific parts.
Pure functions over a model and arrays."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from psm_jax.persona.directions import orthogonal_component, unit
from psm_jax.persona.stats import MIN_NULL_DRAWS, zscore
from psm_jax.persona.steering import ContrastPairs, steered_values

MIN_Z = 3.0  # the diagonal z a specific direction must exceed


def symmetric_effects(model, pairs: ContrastPairs, vectors, layer: int) -> np.ndarray:
    """The steering effect m(+v) - m(-v) of each vector at `layer` on `pairs` (mean over units): [n_vectors].

    The antisymmetric contrast keeps the odd-order part of the measure's response to a vector and cancels its
    even-order part, the response that any perturbation of that norm causes whatever its sign (a generic
    "perturbed model" shift that random directions at matched norm show too). It is the statistic of the steering
    curve's random band (`steering.random_band`)."""
    vecs = np.asarray(vectors, np.float64)
    vals = steered_values(model, pairs, np.concatenate([vecs, -vecs]), layer).mean(1)
    return vals[:len(vecs)] - vals[len(vecs):]


def cross_effects(model, vectors, layers: Sequence[int], random_units, targets: Sequence[ContrastPairs | None]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Steer with vectors[i] at layers[i] and with each of random_units[i] (unit directions [T, R, D], scaled to
    |vectors[i]|), and read targets[j] (None: no valid measure, its column stays NaN). Returns the symmetric
    effects (`symmetric_effects`) of the vectors [T, T] and of the random directions [T, T, R]. R may be 0 (no
    band)."""
    vecs = np.asarray(vectors, np.float64)
    units = np.asarray(random_units, np.float64)
    T = len(vecs)
    if units.ndim != 3 or units.shape[0] != T or len(layers) != T or len(targets) != T:
        raise ValueError(f"{T} vectors, {len(layers)} layers, {len(targets)} targets, random units {units.shape}; "
                         "expected T of each and random units [T, R, d_model]")
    cells, band = np.full((T, T), np.nan), np.full((T, T, units.shape[1]), np.nan)
    for i in range(T):
        steer = np.concatenate([vecs[i][None], units[i] * np.linalg.norm(vecs[i])])
        for j, pairs in enumerate(targets):
            if pairs is not None:
                effects = symmetric_effects(model, pairs, steer, int(layers[i]))
                cells[i, j], band[i, j] = effects[0], effects[1:]
    return cells, band


def specificity_scores(cells, random, valid, min_z: float = MIN_Z) -> dict:
    """Each cell as a z-score against its own random band (`stats.zscore`; NaN where the target measure is not
    valid or the band has < MIN_NULL_DRAWS draws), and per steered direction i: the diagonal z, the largest
    off-diagonal |z| over valid targets, and `pass` = diagonal z > min_z and every off-diagonal |z| below the
    diagonal."""
    cells, random = np.asarray(cells, np.float64), np.asarray(random, np.float64)
    valid = np.asarray(valid, bool)
    T = cells.shape[0]
    if cells.shape != (T, T) or random.shape[:2] != (T, T) or valid.shape != (T,):
        raise ValueError(f"cells {cells.shape}, random {random.shape}, valid {valid.shape}; expected [T, T], "
                         "[T, T, n_random] and [T]")
    z = np.full((T, T), np.nan)
    if random.shape[2] >= MIN_NULL_DRAWS:
        for i in range(T):
            for j in np.flatnonzero(valid):
                z[i, j] = zscore(cells[i, j], random[i, j])
    rows = []
    for i in range(T):
        off = [abs(z[i, j]) for j in range(T) if j != i and np.isfinite(z[i, j])]
        diag = float(z[i, i])
        max_off = max(off) if off else None
        ok = bool(np.isfinite(diag) and diag > min_z and (max_off is None or max_off < diag))
        rows.append({"diag_z": diag, "offdiag_max_abs_z": max_off, "n_offdiag": len(off), "pass": ok,
                     "valid": bool(valid[i])})
    return {"z": z, "per_trait": rows}


def specificity_matrix(model, vectors, layers: Sequence[int], random_units, targets: Sequence[ContrastPairs | None],
                       min_z: float = MIN_Z) -> dict:
    """The specificity matrix of T directions over T measures in one call: the cells and their random bands
    (`cross_effects`: vectors[i] steered at layers[i], random_units[i] [R, D] at its norm, targets[j] read on its
    units) with their z-scores and per-direction pass (`specificity_scores`). A target that is None (its measure
    failed its validity check) is not valid: its column stays NaN and no pass looks at it. Returns {cells [T, T],
    random [T, T, R], z [T, T], per_trait, valid [T], n_random, min_z}."""
    cells, band = cross_effects(model, vectors, layers, random_units, targets)
    valid = [t is not None for t in targets]
    return {"cells": cells, "random": band, **specificity_scores(cells, band, valid, min_z), "valid": valid,
            "n_random": int(np.asarray(band).shape[2]), "min_z": min_z}


def matrix_against_band(model, vectors, layers: Sequence[int], targets: Sequence[ContrastPairs | None], random,
                        min_z: float = MIN_Z) -> dict:
    """Another set of steering vectors scored against an existing matrix's random bands (`specificity_matrix`'s
    "random" [T, T, R]): vectors[i] (e.g. direction i's trait-specific part, `specific_part`, at the whole vector's
    norm) steered at layers[i] and read on targets[j] (`symmetric_effects`). With the same layers, norms and
    targets, the random directions are the same ones, so the steered vector is the only thing that differs between
    the two matrices. vectors[i] None (nothing left of it) leaves row i NaN; targets[j] None leaves column j NaN and
    not valid. Returns {cells [T, T], z [T, T], per_trait} (`specificity_scores`)."""
    T = len(vectors)
    if len(layers) != T or len(targets) != T:
        raise ValueError(f"{T} vectors, {len(layers)} layers and {len(targets)} targets; expected T of each")
    cells = np.full((T, T), np.nan)
    for i, vec in enumerate(vectors):
        if vec is None:
            continue
        for j, pairs in enumerate(targets):
            if pairs is not None:
                cells[i, j] = symmetric_effects(model, pairs, np.asarray(vec)[None], int(layers[i]))[0]
    return {"cells": cells, **specificity_scores(cells, random, [t is not None for t in targets], min_z)}


def specific_part(own, others, norm: float) -> tuple[np.ndarray | None, float]:
    """The part of direction `own` [D] orthogonal to every row of `others` [K, D] (`directions.orthogonal_component`),
    rescaled to `norm` so that it meets the same random band as the whole vector. Returns (vector, or None where
    nothing is left; the fraction of |own| the part keeps)."""
    own = np.asarray(own, np.float64)
    rest = np.asarray(others, np.float64).reshape(-1, own.shape[0])
    part = orthogonal_component(own, rest)
    kept = float(np.linalg.norm(part) / max(np.linalg.norm(own), 1e-30))
    if kept < 1e-6:
        return None, kept
    return unit(part) * float(norm), kept
