"""The SAE architectures by name. Each lives in one module of sae/archs/ exporting `ARCH` (an
`sae.archs.base.Architecture`); adding one is a new module plus its line in `_MODULES`.

    get("topk")                      -> Architecture (raises ValueError naming the known ones)
    names()                          -> ("relu", "topk", "batchtopk", "jumprelu", "matryoshka_topk")
    from_saelens("standard")         -> the Architecture a SAELens v6 folder of that architecture loads as
"""
from __future__ import annotations

import importlib

from sae.archs.base import Architecture

_MODULES = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
_REGISTRY: dict[str, Architecture] = {}


def _load() -> dict[str, Architecture]:
    if not _REGISTRY:
        for mod in _MODULES:
            arch = importlib.import_module(f"sae.archs.{mod}").ARCH
            _REGISTRY[arch.name] = arch
    return _REGISTRY


def names() -> tuple[str, ...]:
    return tuple(_load())


def get(name: str) -> Architecture:
    reg = _load()
    if name not in reg:
        raise ValueError(f"unknown SAE architecture {name!r}; expected one of {tuple(reg)}")
    return reg[name]


def saelens_names() -> tuple[str, ...]:
    """SAELens architectures that load as one of ours."""
    return tuple(sorted({a.saelens_name for a in _load().values() if a.saelens_import}))


def from_saelens(saelens_name: str) -> Architecture:
    for arch in _load().values():
        if arch.saelens_import and arch.saelens_name == saelens_name:
            return arch
    raise ValueError(f"SAELens architecture {saelens_name!r} is not supported; supported: {saelens_names()}")
