"""`SaeConfig`: one frozen dataclass describing an SAE and how it is trained.

Fields fall in two groups:
  * structural fields (architecture, shapes, optimiser schedule shape, ...) that must be identical for
    all SAEs trained together in one stacked run;
  * sweepable fields (`SWEEPABLE`: k, l1_coef, l0_coef, seed, lr, aux_coef, jumprelu_bandwidth,
    jumprelu_init_threshold) that may differ between the SAEs of one run: they become per-SAE traced
    values (TopK uses `lax.top_k` with the largest k and masks ranks >= its own k).

Parameters, optimiser state and the loss are fp32; `compute_dtype="bfloat16"` runs the step's matrix products on
bf16 casts of the parameters and inputs (fp32 master weights, fp32 gradients and Adam). The config serialises to JSON (`to_dict` / `from_dict`); `diff(a, b)` names the
fields that differ, which is what a run directory holding another config reports.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Sequence

from sae.archs import registry

B_DEC_INITS = ("geometric_median", "mean", "zeros")
DECAYS = ("none", "linear", "cosine")
NORMALIZATIONS = ("none", "expected_average_only_in")
COMPUTE_DTYPES = ("float32", "bfloat16")
SWEEPABLE = ("k", "l1_coef", "l0_coef", "seed", "lr", "aux_coef", "jumprelu_bandwidth", "jumprelu_init_threshold")


class SaeConfigError(ValueError):
    """An invalid SAE configuration (the message names the field and the accepted values)."""


@dataclasses.dataclass(frozen=True)
class SaeConfig:
    # --- architecture -------------------------------------------------------------------------
    architecture: str = "topk"          # a name in sae.archs.registry: relu | topk | batchtopk | jumprelu | ...
    d_in: int = 576
    d_sae: int = 4608
    k: int = 32                         # topk / batchtopk: latents kept per token (batchtopk: on average)
    apply_b_dec_to_input: bool = True   # f = act((x - b_dec) W_enc + b_enc)
    normalize_decoder: bool = True      # unit-norm decoder rows after every step (parallel grad removed)
    # --- sparsity penalties ---------------------------------------------------------------------
    l1_coef: float = 5.0                # relu: coef * sum_i f_i * ||W_dec_i||
    l0_coef: float = 1.0                # jumprelu: coef * E[#active] through the rectangle pseudo-gradient
    jumprelu_bandwidth: float = 0.05    # rectangle kernel width (in units of the pre-activations)
    jumprelu_init_threshold: float = 0.01
    sparsity_warmup_steps: int = 0      # linear warm-up of l1/l0 coefficients
    # --- dead latents ---------------------------------------------------------------------------
    aux_k: int | None = None            # AuxK: latents used to model the residual (default d_in // 2)
    aux_coef: float = 1.0 / 32.0        # topk / batchtopk only
    dead_tokens_threshold: int = 10_000_000   # dead after this many tokens without firing
    # --- batchtopk ------------------------------------------------------------------------------
    threshold_ema_rate: float = 0.01    # threshold <- (1-r) threshold + r * min kept activation
    # --- initialisation -------------------------------------------------------------------------
    b_dec_init: str = "geometric_median"   # geometric_median | mean | zeros (from the first batch)
    geometric_median_iters: int = 50
    normalize_activations: str = "none"    # none | expected_average_only_in (scale so E|x| = sqrt(d_in))
    # --- optimisation ---------------------------------------------------------------------------
    lr: float | None = None             # None: 2e-4 / sqrt(d_sae / 2^14) (the common TopK scaling)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip_norm: float | None = None   # clip each SAE's global gradient norm (SAELens clips at 1.0)
    warmup_steps: int = 100
    decay: str = "linear"               # none | linear | cosine, to 0 at total_steps
    decay_start: float = 0.8            # fraction of total_steps where the decay begins
    total_steps: int | None = None      # None: no decay (constant after warm-up)
    batch_size: int = 4096
    seed: int = 0
    # --- speed ----------------------------------------------------------------------------------
    sparse_decode: bool = True          # topk: decode with gathered decoder rows instead of a dense matmul
    compute_dtype: str = "float32"      # float32 | bfloat16: dtype of the step's forward/backward (params stay fp32)

    def __post_init__(self):
        def bad(field, why):
            raise SaeConfigError(f"SaeConfig.{field}={getattr(self, field)!r}: {why}")

        if self.architecture not in registry.names():
            bad("architecture", f"expected one of {registry.names()}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            bad("compute_dtype", f"expected one of {COMPUTE_DTYPES}")
        for f in ("d_in", "d_sae", "batch_size", "geometric_median_iters"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                bad(f, "expected a positive int")
        if registry.get(self.architecture).uses_k:
            if not isinstance(self.k, int) or not 0 < self.k <= self.d_sae:
                bad("k", f"expected 0 < k <= d_sae={self.d_sae}")
        if self.aux_k is not None and not 0 < self.aux_k <= self.d_sae:
            bad("aux_k", f"expected None or 0 < aux_k <= d_sae={self.d_sae}")
        if self.b_dec_init not in B_DEC_INITS:
            bad("b_dec_init", f"expected one of {B_DEC_INITS}")
        if self.decay not in DECAYS:
            bad("decay", f"expected one of {DECAYS}")
        if self.normalize_activations not in NORMALIZATIONS:
            bad("normalize_activations", f"expected one of {NORMALIZATIONS}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", "expected None or a positive finite float")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            bad("grad_clip_norm", "expected None or > 0")
        if not 0.0 <= self.decay_start <= 1.0:
            bad("decay_start", "expected a fraction in [0, 1]")
        if self.total_steps is not None and self.total_steps <= 0:
            bad("total_steps", "expected None or a positive int")
        for f in ("warmup_steps", "sparsity_warmup_steps", "dead_tokens_threshold"):
            if getattr(self, f) < 0:
                bad(f, "expected >= 0")
        for f in ("l1_coef", "l0_coef", "aux_coef"):
            if not (getattr(self, f) >= 0 and math.isfinite(getattr(self, f))):
                bad(f, "expected a finite float >= 0")
        if not self.jumprelu_bandwidth > 0:
            bad("jumprelu_bandwidth", "expected > 0")
        if not 0 < self.threshold_ema_rate <= 1:
            bad("threshold_ema_rate", "expected in (0, 1]")

    # ---------------------------------------------------------------------------------------------
    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.d_sae / 2 ** 14)

    @property
    def effective_aux_k(self) -> int:
        return min(self.aux_k if self.aux_k is not None else max(self.d_in // 2, 1), self.d_sae)

    @property
    def uses_aux(self) -> bool:
        return registry.get(self.architecture).dead_latent_loss is not None and self.aux_coef > 0

    @property
    def has_threshold(self) -> bool:
        return registry.get(self.architecture).threshold is not None

    def replace(self, **kw) -> "SaeConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SaeConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SaeConfigError(f"unknown SaeConfig field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**dict(d))


def diff(a: Mapping[str, Any] | SaeConfig, b: Mapping[str, Any] | SaeConfig) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ: name -> (a's value, b's value); a missing field reads as '<missing>'."""
    a = a.to_dict() if isinstance(a, SaeConfig) else dict(a)
    b = b.to_dict() if isinstance(b, SaeConfig) else dict(b)
    out = {}
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if va != vb:
            out[key] = (va, vb)
    return out


def check_stackable(cfgs: Sequence[SaeConfig]) -> None:
    """SAEs trained together must agree on every non-sweepable field."""
    if not cfgs:
        raise SaeConfigError("no SaeConfig given")
    base = cfgs[0]
    for i, c in enumerate(cfgs[1:], 1):
        bad = {f: v for f, v in diff(base, c).items() if f not in SWEEPABLE}
        if bad:
            raise SaeConfigError(
                f"SAE {i} cannot be trained stacked with SAE 0: non-sweepable field(s) differ "
                + ", ".join(f"{f}: {va!r} vs {vb!r}" for f, (va, vb) in bad.items())
                + f" (only {SWEEPABLE} may differ)")


def sweep(base: SaeConfig, **values: Sequence[Any]) -> list[SaeConfig]:
    """Zip per-SAE values of sweepable fields: `sweep(cfg, k=[16, 32], seed=[0, 1])` -> two configs."""
    if not values:
        return [base]
    bad = sorted(set(values) - set(SWEEPABLE))
    if bad:
        raise SaeConfigError(f"field(s) {bad} cannot be swept; sweepable: {SWEEPABLE}")
    lengths = {name: len(v) for name, v in values.items()}
    if len(set(lengths.values())) != 1:
        raise SaeConfigError(f"swept value lists must have one length, got {lengths}")
    n = next(iter(lengths.values()))
    return [base.replace(**{name: v[i] for name, v in values.items()}) for i in range(n)]
