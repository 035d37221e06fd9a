"""What every (conversation, history, probe) of one run shares, built once per run (`pipeline.run_context`) and passed
to the modules that build caches and score probes."""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from experiments.kv_editing.config import Config
from experiments.kv_editing.runner import Runner


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What every (conversation, history, probe) of one run shares."""
    cfg: Config
    model: object
    runner: Runner
    probes: list[str]
    is_assistant: Callable[[str], bool]  # the keyword scorer of a sampled answer
    eos: tuple
    pad: int
    conditions: list[tuple]
    u_all: np.ndarray  # the unit axis [L, D]
    u_random: np.ndarray  # the control band's directions [n, L, D]
    assistant_ids: np.ndarray  # tokens of the assistant identity answer
