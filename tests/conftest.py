import os

import pytest

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
