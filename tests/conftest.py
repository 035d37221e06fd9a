import os

# Nothing in the tests may reach a model hub: any attempt fails loudly instead of downloading.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.fixtures_assets import smollm2, smollm2_tokenizer  # noqa: E402,F401  (session fixtures)


def _under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def pytest_configure(config):
    """The default run compiles with XLA's CPU backend optimisations off: its models are tiny, so its time is mostly
    compilation. Runs that select the `slow` real-model checks keep the
    optimising compiler, as does anyone who sets PSM_TEST_XLA_OPTIMIZE=1 or their own backend level in XLA_FLAGS.
    Set before any test touches JAX: XLA reads the flags when its backend starts."""
    selects_slow = "slow" in (config.option.markexpr or "") and "not slow" not in config.option.markexpr
    flags = os.environ.get("XLA_FLAGS", "")
    if selects_slow or os.environ.get("PSM_TEST_XLA_OPTIMIZE") == "1" or "xla_backend_optimization_level" in flags:
        return
    os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE_FLAGS}".strip()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skipped test marked `ci_required` is a failure: CI installs what those checks need, so a
    skip there means a check silently stopped running."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _under_ci() and item.get_closest_marker("ci_required") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"ci_required test was skipped under CI=true: {reason}"


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_code():
    """Drops JAX's compiled executables after each test module. Every live XLA CPU executable keeps a few memory
    mappings, and one process running the whole suite would otherwise pass the kernel's per-process limit
    (vm.max_map_count, 65530 by default), after which compilation aborts or segfaults. Modules rarely share compiled
    functions, so little is compiled twice."""
    yield
    import jax

    jax.clear_caches()


@pytest.fixture(autouse=True)
def _parity_precision(request):
    """Tests marked `parity` compare numbers with a reference implementation: run them at float32 matmul
    precision, which accelerators (TF32/bf16 passes by default) would otherwise lower."""
    if request.node.get_closest_marker("parity") is None:
        yield
        return
    import jax

    with jax.default_matmul_precision("highest"):
        yield


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


@pytest.fixture(scope="session")
def tiny_chat_model():
    """A random 3-layer llama with SmolLM2's vocabulary, tokenizer and chat template (fast; outputs are noise)."""
    import jax.numpy as jnp
    import numpy as np

    from psm_jax.config import ModelConfig
    from psm_jax.loading import LoadedModel, registry
    from psm_jax.loading.gguf import load_gguf_tokenizer
    from psm_jax.loading.names import param_specs

    try:
        path = registry.resolve("smollm2-135m-instruct")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    tok = load_gguf_tokenizer(path)
    config = ModelConfig(family="llama", vocab_size=49152, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                         head_dim=8, d_mlp=64, tie_embeddings=True, eos_token_ids=(2,), pad_token_id=2,
                         bos_token_id=1)
    rng = np.random.default_rng(0)
    params = {"layers": {}}
    for spec in param_specs(config):
        shape = ((config.n_layers,) if spec.per_layer else ()) + spec.shape
        val = 1.0 + 0.1 * rng.normal(size=shape) if "norm" in spec.leaf else 0.2 * rng.normal(size=shape)
        (params["layers"] if spec.per_layer else params)[spec.leaf] = jnp.asarray(val, jnp.float32)
    return LoadedModel(params, config, tok, tok.chat_template, "psm-tiny")


@pytest.fixture(scope="session")
def tiny_chat_4layers(tmp_path_factory, smollm2_tokenizer):  # noqa: F811
    """A random 4-layer llama saved as an HF folder with SmolLM2's tokenizer and chat template, loaded by
    `psm_jax.load` (so loading is on the path too); room for a capped layer range inside the stack."""
    import psm_jax
    from tests.tiny_models import save_chat_llama

    folder = tmp_path_factory.mktemp("tiny_chat_4layers")
    save_chat_llama(folder, smollm2_tokenizer, n_layers=4, seed=2)
    return psm_jax.load(folder)

