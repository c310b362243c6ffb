"""The model registry: one name -> one builder. Duplicate names are an error."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a builder under its function name."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def get_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model, e.g. get_model("resnet18", num_classes=10, in_channels=1, img_size=28)."""
    try:
        builder = _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
    return builder(**kwargs)


def list_models() -> list[str]:
    return sorted(_MODELS)
