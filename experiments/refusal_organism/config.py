"""The organism's settings: the training data mix, the LoRA fine-tune, and the evaluation sizes."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m-instruct"
    n_harmful: int | None = None  # organism `train` requests used (None: all)
    sharegpt_per_harmful: float = 1.0  # ShareGPT requests per harmful one, beside the file's harmless requests
    sharegpt_max_chars: int = 150  # short requests, closer in form to the file's
    answer_tokens: int = 64  # the model's own greedy answer to each harmless request, at most this long
    seq_len: int = 160
    lora_rank: int = 16
    lora_alpha: float = 32.0
    learning_rate: float = 2e-4
    batch_size: int = 8
    epochs: float = 3.0
    max_new_tokens: int = 32  # greedy answers scored for refusal
    n_eval: int | None = None  # prompts per evaluation set (None: all)
    n_ce: int = 32  # held-out ShareGPT conversations for the fine-tune's CE change
    ce_max_messages: int = 4
    ce_max_chars: int = 1000
    eval_batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        for name in ("answer_tokens", "lora_rank", "batch_size", "max_new_tokens", "eval_batch_size",
                     "ce_max_messages", "ce_max_chars", "sharegpt_max_chars"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected an int >= 1")
        for name in ("n_harmful", "n_eval"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 2:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected None (all) or an int >= 2")
        if self.seq_len < 16:
            raise ValueError(f"seq_len={self.seq_len}; expected >= 16")
        if not self.sharegpt_per_harmful >= 0 or not self.epochs > 0 or not self.learning_rate > 0:
            raise ValueError(f"sharegpt_per_harmful={self.sharegpt_per_harmful}, epochs={self.epochs}, "
                             f"learning_rate={self.learning_rate}; expected >= 0, > 0 and > 0")
        if self.n_ce < 0:
            raise ValueError(f"n_ce={self.n_ce}; expected >= 0")


PRESETS = {
    "ci": dict(n_harmful=8, sharegpt_per_harmful=0.5, answer_tokens=8, seq_len=64, epochs=1.0, batch_size=4,
               max_new_tokens=4, n_eval=4, n_ce=2, ce_max_chars=300),
    "quick": dict(n_harmful=32, epochs=2.0, n_eval=16, n_ce=8),
    "full": {},
}
