"""Bucketed shapes: histories and probes are left-padded, identity answers right-padded, with masked slots to a few
bucket lengths, so that one compiled function serves every conversation and probe of a bucket. Masked slots get no
position and are never attended to, so the numbers equal the unpadded computation's."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments.kv_editing.config import ANSWER_ROOM, PROBE_ROOM, Config

BUCKET_BASE = 16  # bucket lengths: 16, 24, 32, 48, 64, 96, ... (each at most 1.5x the previous)


def bucket(n: int) -> int:
    """The padded length of a sequence of n tokens: the smallest of 16, 24, 32, 48, 64, 96, ... that holds it."""
    b = BUCKET_BASE
    while True:
        for length in (b, b * 3 // 2):
            if length >= n:
                return length
        b *= 2


def left_pad(tokens: np.ndarray, length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) left-padded to `length`: positions follow the mask, so the real tokens keep theirs."""
    off = length - len(tokens)
    return (np.concatenate([np.full(off, pad, np.int32), np.asarray(tokens, np.int32)]),
            np.arange(length) >= off)


def right_pad(tokens: np.ndarray, length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) right-padded to `length` (for scored answers: the mask drops the tail from the mean)."""
    n = len(tokens)
    return np.concatenate([np.asarray(tokens, np.int32), np.full(length - n, pad, np.int32)]), np.arange(length) < n


def repeat(x: np.ndarray, n: int) -> jax.Array:
    """x as n identical batch rows (one per sampled answer), on the device."""
    return jnp.asarray(np.repeat(x[None], n, 0))


def cache_size(cfg: Config, n_pad: int) -> int:
    """Cache slots for a history padded to n_pad, a probe turn and an answer: a function of the bucket only, so one
    compilation serves every history of a bucket."""
    return n_pad + PROBE_ROOM + max(cfg.max_new_tokens, ANSWER_ROOM)
