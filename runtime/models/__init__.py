"""Model registry: architecture name (``config.architectures[0]``) -> our model class.

Adding an architecture means adding one file here that calls :func:`register`, and its module name to
``_MODULES``.
"""

from __future__ import annotations

import importlib

_REGISTRY: dict[str, type] = {}
_MODULES = ("llama", "mistral", "qwen2", "qwen3")


def register(architecture: str, cls: type) -> None:
    _REGISTRY[architecture] = cls


def _import_all() -> None:
    for module in _MODULES:
        importlib.import_module(f"{__name__}.{module}")


def get_model_class(architectures: list[str] | None) -> type:
    _import_all()
    for arch in architectures or []:
        if arch in _REGISTRY:
            return _REGISTRY[arch]
    raise ValueError(
        f"unsupported model architecture {architectures!r}; supported: {', '.join(sorted(_REGISTRY))}"
    )


def supported_architectures() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)
