"""The checkpoint contract: a plain dict that `torch.load(path, weights_only=True)` can read.

Keys: arch, model_args, state_dict, classes, preprocess, metrics, recipe (and optionally ema_state_dict, ema_updates,
optimizer, scheduler, epoch for resuming). A checkpoint rebuilds its model exactly through the registry.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

REQUIRED_KEYS = ("arch", "model_args", "state_dict", "classes", "preprocess", "metrics", "recipe")
PREPROCESS_KEYS = ("size", "resize", "channels", "mean", "std", "interpolation")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, unsafe or not of our format."""


def save_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike) -> Path:
    """Validate and write atomically (temp file in the same folder, then os.replace)."""
    validate_checkpoint(ckpt)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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


def build_model(ckpt: dict[str, Any], use_ema: bool = True) -> nn.Module:
    """Rebuild the model from arch + model_args and load its weights (EMA weights when present)."""
    from training.models import get_model

    model = get_model(ckpt["arch"], **ckpt["model_args"])
    state = ckpt.get("ema_state_dict") if use_ema and ckpt.get("ema_state_dict") else ckpt["state_dict"]
    model.load_state_dict(state)
    return model.eval()
