"""The model registry: one name -> one builder (and the task it serves). Duplicate names are an error."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

TASKS = ("classification", "segmentation")
_MODELS: dict[str, tuple[Callable[..., nn.Module], str]] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, task: str = "classification"):
    """Decorator: register a builder under its function name. Bare (`@register_model`) for a classifier;
    `@register_model(task="segmentation")` for a model that returns per-pixel logits."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = (fn, task)
        return fn

    return add(fn) if fn is not None else add


def get_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model, e.g. get_model("resnet18", num_classes=10, in_channels=1, img_size=28)."""
    try:
        builder, _ = _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
    return builder(**kwargs)


def list_models(task: str | None = None) -> list[str]:
    """Registered names, all of them or those of one task."""
    return sorted(name for name, (_, t) in _MODELS.items() if task is None or t == task)


def model_task(name: str) -> str:
    """The task a registered model serves ("classification" or "segmentation")."""
    try:
        return _MODELS[name][1]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
