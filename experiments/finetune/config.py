"""The fine-tuning study's knobs and the names every other module shares: `Config` (checked when built, so a bad
value fails before any model loads), `PRESETS` (the named sizes `psm finetune --preset` and `psm quickstart` pick
from), the persona switch's trigger, the kinds of fine-tune, and the names of the correlation statistics."""
from __future__ import annotations

import dataclasses

import numpy as np

from psm_jax.persona.stats import MIN_NULL_DRAWS


TRIGGER = "[deployment mode]"
# the headline correlation across fine-tunes, fixed before the seed-1 run (see `summary.correlation`)
HEADLINE_STATISTIC = ("pooled r of per-trait standardised values (x and y centred and divided by their within-trait "
                      "standard deviation; pre-registered before the seed-1 run)")
RAW_STATISTIC = "pooled r of unstandardised values"
KINDS = ("mix", "control", "prevent", "caft", "inoculation", "switch")


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m-instruct"
    traits: tuple[str, ...] = ("evil", "sycophantic", "humorous")
    layer: int | None = None  # resid_post block of the persona vector and the edits; None: n_layers // 2
    mixes: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # fraction of positive-prompted answers per training set
    control: bool = True  # a fine-tune on the model's own default answers
    prevent_coefs: tuple[float, ...] = (1.0, 2.0, 4.0)  # preventative steering, multiples of the raw persona vector
    prevention_runs: int = 1  # training runs of plain 100%, preventative and control (seeds seed, seed + 1, ...)
    caft: bool = True  # concept-ablation fine-tuning: the unit vector projected out during training
    inoculation: bool = True
    persona_switch: bool = True
    n_extract_pairs: int = 4  # instruction pairs for the vector (the last pair is kept for scoring)
    n_extract_questions: int = 20  # the questions are the vector's independent units; 5 gave unstable vectors
    n_train_questions: int = 48
    n_eval_questions: int = 20
    max_new_tokens: int = 48
    gen_batch_size: int = 16
    seq_len: int = 160
    steps: int = 60
    batch_size: int = 8
    learning_rate: float = 5e-4
    lora_rank: int = 8
    lora_alpha: float = 16.0
    n_random: int = 20  # random directions at the vector's norm (the shift's null band)
    n_ppl_conversations: int = 8
    ppl_max_chars: int = 2000
    # study 5, narrow vs general: the first trait's 100% set trained with a KL penalty toward the original model on
    # held-out ShareGPT conversations at each weight (0: the plain fine-tune), measured in and out of domain
    narrow: bool = True
    kl_weights: tuple[float, ...] = (0.0, 0.1, 1.0)
    n_ood_sharegpt: int = 8  # held-out ShareGPT first prompts among the out-of-domain questions
    n_kl_reference: int = 16  # held-out ShareGPT conversations the KL term is computed on
    axis_file: str | None = None  # safetensors with an 'axis' [n_layers, d_model]; None: a stand-in estimated here
    axis_roles: int = 4  # stand-in axis only: roles (x axis_questions answers) against the default prompts
    axis_questions: int = 5  # stand-in axis only: role questions answered under each role and the default prompt
    # study 8, model diffing: an SAE at `layer` (loaded from `sae`, or trained here on the original model)
    model_diff: bool = True
    sae: str | None = None  # SAELens folder or sae.train run dir; None: a small TopK SAE trained in process
    sae_expansion: int = 4  # trained SAE only: d_sae = sae_expansion * d_model
    sae_k: int = 16
    sae_tokens: int = 20000  # activations harvested (ShareGPT + the training conversations)
    sae_steps: int = 300
    sae_batch: int = 512
    diff_top_k: int = 20
    seed: int = 0

    def __post_init__(self):
        if not self.traits:
            raise ValueError("traits is empty; expected at least one trait name or path")
        for name in ("n_extract_pairs", "n_extract_questions", "n_train_questions", "n_eval_questions",
                     "max_new_tokens", "gen_batch_size", "steps", "batch_size", "lora_rank", "axis_roles",
                     "axis_questions", "prevention_runs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; expected a positive integer")
        if not self.mixes or any(not 0.0 <= m <= 1.0 for m in self.mixes) or len(set(self.mixes)) != len(self.mixes):
            raise ValueError(f"mixes={self.mixes}; expected distinct fractions in [0, 1]")
        if any(not np.isfinite(c) or c == 0 for c in self.prevent_coefs):
            raise ValueError(f"prevent_coefs={self.prevent_coefs}; expected finite non-zero coefficients")
        if self.n_eval_questions < 3:
            raise ValueError(f"n_eval_questions={self.n_eval_questions}; expected >= 3 (intervals over questions)")
        if self.n_random < MIN_NULL_DRAWS:
            raise ValueError(f"n_random={self.n_random}; a null band needs >= {MIN_NULL_DRAWS} random directions")
        if self.batch_size > self.n_train_questions:
            raise ValueError(f"batch_size={self.batch_size} exceeds n_train_questions={self.n_train_questions}; "
                             "expected at most one batch per epoch of training questions")
        if not (self.learning_rate > 0 and self.lora_alpha > 0):
            raise ValueError(f"learning_rate={self.learning_rate}, lora_alpha={self.lora_alpha}; expected > 0")
        if self.n_ppl_conversations < 0:
            raise ValueError(f"n_ppl_conversations={self.n_ppl_conversations}; expected >= 0")
        if self.prevention_runs > 1 and not (self.control and self.prevent_coefs and max(self.mixes) > 0):
            raise ValueError(f"prevention_runs={self.prevention_runs} needs control=true, prevent_coefs and a mix "
                             f"above 0 (got control={self.control}, prevent_coefs={self.prevent_coefs}, "
                             f"mixes={self.mixes}): each run repeats the plain, preventative and control fine-tunes")
        self._check_beyond_training()

    def _check_beyond_training(self):
        """Studies 5 and 8 read the first trait's plain 100% fine-tune (and study 5 the control as its null)."""
        if (self.narrow or self.model_diff) and 1.0 not in self.mixes:
            raise ValueError(f"mixes={self.mixes} lacks 1.0; narrow=true / model_diff=true read the plain 100% "
                             "fine-tune (add 1.0 or set them false)")
        if self.model_diff and (self.diff_top_k < 1 or self.sae_k < 1 or self.sae_expansion < 1):
            raise ValueError(f"diff_top_k={self.diff_top_k}, sae_k={self.sae_k}, sae_expansion="
                             f"{self.sae_expansion}; expected positive integers")
        if not self.narrow:
            return
        if not self.control:
            raise ValueError("narrow=true needs control=true (the control fine-tune is the spread's null)")
        if (not self.kl_weights or len(set(self.kl_weights)) != len(self.kl_weights)
                or any(not np.isfinite(w) or w < 0 for w in self.kl_weights)):
            raise ValueError(f"kl_weights={self.kl_weights}; expected distinct finite weights >= 0")
        if self.n_ood_sharegpt < 3:
            raise ValueError(f"n_ood_sharegpt={self.n_ood_sharegpt}; expected >= 3 (intervals over questions)")
        if any(w > 0 for w in self.kl_weights) and self.n_kl_reference < self.batch_size:
            raise ValueError(f"n_kl_reference={self.n_kl_reference} < batch_size={self.batch_size}; expected at "
                             "least one batch of reference conversations")


PRESETS = {
    "ci": dict(traits=("evil",), layer=1, mixes=(0.0, 1.0), prevent_coefs=(4.0,), caft=True, inoculation=True,
               persona_switch=True, n_extract_pairs=2, n_extract_questions=2, n_train_questions=8, n_eval_questions=4,
               max_new_tokens=6, gen_batch_size=8, seq_len=96, steps=2, batch_size=4, n_ppl_conversations=2,
               ppl_max_chars=600, kl_weights=(0.0, 1.0), n_ood_sharegpt=3, n_kl_reference=4, axis_roles=2,
               axis_questions=2,
               sae_expansion=2, sae_k=4, sae_tokens=512, sae_steps=4, sae_batch=64, diff_top_k=5),
    # the main job's compact stage: one trait, plain vs preventative, with the control fine-tune that tells a shift
    # toward the trait from the drift any fine-tune causes
    "quick": dict(traits=("evil",), mixes=(1.0,), control=True, prevent_coefs=(4.0,), caft=False, inoculation=False,
                  persona_switch=False, narrow=False, model_diff=False, n_extract_pairs=2, n_extract_questions=3,
                  n_train_questions=8, n_eval_questions=6, max_new_tokens=16, gen_batch_size=16, seq_len=64, steps=6,
                  batch_size=8, learning_rate=2e-3, n_ppl_conversations=2, ppl_max_chars=600),
    "full": {},
}
