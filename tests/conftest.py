import os

import pytest

from tests.fixtures_assets import smollm2, smollm2_tokenizer  # noqa: F401  (session fixtures)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """name -> (directory, torch model); each tiny model is built and saved once per session."""
    from tests import tiny_models

    cache = {}

    def get(name):
        if name not in cache:
            d = tmp_path_factory.mktemp(name)
            cache[name] = (d, tiny_models.save(name, d))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' own load of the packaged SmolLM2 GGUF (torch, fp32): the reference."""
    from transformers import AutoModelForCausalLM

    from psm_jax.loading import registry

    path = registry.resolve("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_model(smollm2):
    """Alias of the shared `smollm2` LoadedModel (loaded once per session)."""
    return smollm2
