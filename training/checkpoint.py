"""The checkpoint contract: a plain dict that `torch.load(path, weights_only=True)` can read.

Keys: arch, model_args, state_dict, classes, preprocess, metrics, recipe (and optionally ema_state_dict, ema_updates,
optimizer, scheduler, epoch for resuming, and `task`: "classification" when absent, or "segmentation", whose
classes start with "background" and whose preprocess resizes whole frames, `crop: false`). A checkpoint
rebuilds its model exactly through the registry.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from handlers.artifacts import atomic_write
from training.models._registry import TASKS

REQUIRED_KEYS = ("arch", "model_args", "state_dict", "classes", "preprocess", "metrics", "recipe")
PREPROCESS_KEYS = ("size", "resize", "channels", "mean", "std", "interpolation")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, unsafe or not of our format."""


def save_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike) -> Path:
    """Validate and write atomically (handlers.artifacts.atomic_write)."""
    validate_checkpoint(ckpt)
    return atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with weights_only=True: a file that carries pickled code is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"refusing {path}: it is not a weights-only checkpoint ({first})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    validate_checkpoint(ckpt, source=str(path))
    return ckpt


def validate_checkpoint(ckpt: Any, source: str = "checkpoint") -> None:
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{source}: expected a dict, got {type(ckpt).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{source}: missing keys {missing}")
    pre = ckpt["preprocess"]
    missing = [k for k in PREPROCESS_KEYS if k not in pre]
    if missing:
        raise CheckpointError(f"{source}: preprocess lacks {missing}")
    if len(pre["mean"]) != pre["channels"] or len(pre["std"]) != pre["channels"]:
        raise CheckpointError(f"{source}: preprocess mean/std must have one value per channel")
    if "background" in pre:
        from training.presets import check_background
        try:
            check_background(pre["background"])
        except ValueError as e:
            raise CheckpointError(f"{source}: preprocess {e}") from None
    if not ckpt["classes"]:
        raise CheckpointError(f"{source}: empty class list")
    task = ckpt.get("task", "classification")
    if task not in TASKS:
        raise CheckpointError(f"{source}: task must be one of {', '.join(TASKS)}, got {task!r}")
    if task == "segmentation":
        if ckpt["classes"][0] != "background" or len(ckpt["classes"]) < 2:
            raise CheckpointError(f"{source}: a segmentation checkpoint's classes are background, then the objects")
        if pre.get("crop", True):
            raise CheckpointError(f"{source}: a segmentation checkpoint's preprocess must have crop: false")


def build_model(ckpt: dict[str, Any], use_ema: bool = True) -> nn.Module:
    """Rebuild the model from arch + model_args and load its weights (EMA weights when present)."""
    from training.models import get_model

    model = get_model(ckpt["arch"], **ckpt["model_args"])
    state = ckpt.get("ema_state_dict") if use_ema and ckpt.get("ema_state_dict") else ckpt["state_dict"]
    model.load_state_dict(state)
    return model.eval()
