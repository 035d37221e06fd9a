"""Synthetic activations with planted sparse features (tests, benchmarks, sanity checks).

x = sum_j a_j D_j + noise: D [n_features, d_in] has unit rows drawn at random; each token activates a fixed number
of features (`active`) chosen uniformly, with magnitudes |N(1, 0.25)| (optionally scaled per feature).
Batch i is drawn from `np.random.default_rng([seed, i])`, so the stream is deterministic and `seek` is exact:
cursor = {"index": next batch index}.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np


class PlantedSource:
    def __init__(self, d_in: int, n_features: int, batch_size: int, *, active: int = 4, seed: int = 0,
                 noise: float = 0.0, bias: float = 0.0, n_batches: int | None = None):
        if not 0 < active <= n_features:
            raise ValueError(f"need 0 < active <= n_features, got active={active}, n_features={n_features}")
        rng = np.random.default_rng([seed, 2 ** 31 - 1])
        d = rng.standard_normal((n_features, d_in))
        self.dictionary = (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)
        self.offset = (bias * rng.standard_normal(d_in)).astype(np.float32)
        self.d_in, self.n_features, self.batch_size = d_in, n_features, batch_size
        self.active, self.seed, self.noise, self.n_batches = active, seed, noise, n_batches
        self.index = 0

    @property
    def cursor(self) -> dict:
        return {"index": self.index}

    def seek(self, cursor: Mapping[str, int]) -> None:
        self.index = int(cursor["index"])

    def batch(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, i])
        B, F = self.batch_size, self.n_features
        idx = np.argsort(rng.random((B, F)), axis=1)[:, : self.active]
        mags = np.abs(rng.normal(1.0, 0.25, (B, self.active))).astype(np.float32)
        codes = np.zeros((B, F), np.float32)
        np.put_along_axis(codes, idx, mags, axis=1)
        x = codes @ self.dictionary + self.offset
        if self.noise:
            x = x + self.noise * rng.standard_normal(x.shape).astype(np.float32)
        return x.astype(np.float32)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self.n_batches is not None and self.index >= self.n_batches:
            raise StopIteration
        x = self.batch(self.index)
        self.index += 1
        return x


def max_cosine(dictionary: np.ndarray, W_dec: np.ndarray) -> np.ndarray:
    """For each planted feature (row of `dictionary`), the best cosine with any decoder row. [n_features]"""
    a = dictionary / np.linalg.norm(dictionary, axis=1, keepdims=True)
    b = W_dec / np.maximum(np.linalg.norm(W_dec, axis=1, keepdims=True), 1e-12)
    return (a @ b.T).max(axis=1)
