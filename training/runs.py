"""Resumable experiment runs: one recipe -> one checkpoint, trained once, resumed after an interruption."""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training.checkpoint import load_checkpoint
from training.recipe import Recipe

DEFAULTS = Recipe()  # a key a checkpoint's recipe predates counts as its default
HOW_TO_RUN = ("threads",)  # recipe keys that change how fast a run trains, not what it trains


def train_or_resume(recipe: Recipe, path: Path, progress: bool = True) -> dict[str, Any]:
    """The finished checkpoint at `path` for `recipe`: reused when it is complete, resumed when a run of the same
    recipe stopped early, trained otherwise (the thread count may differ between the parts). A checkpoint of another
    recipe at the path is an error."""
    from training.train import train

    if path.is_file():
        ckpt = load_checkpoint(path)
        diff = sorted(k for k, v in recipe.to_dict().items()
                      if k not in HOW_TO_RUN and ckpt["recipe"].get(k, getattr(DEFAULTS, k)) != v)
        if diff:
            raise ValueError(f"{path} was trained with another recipe (differs in {', '.join(diff)}); move it away "
                             "to train this one")
        if int(ckpt.get("epoch", 0)) >= recipe.epochs:
            return ckpt
        print(f"resuming {path} at epoch {ckpt['epoch']}/{recipe.epochs}", flush=True)
        return train(recipe, path, resume=path, progress=progress)
    print(f"training {path} ({recipe.arch}, {recipe.epochs} epochs)", flush=True)
    return train(recipe, path, progress=progress)


def machine() -> dict[str, Any]:
    """Where and when figures were measured (for every summary JSON): the CPU (the threads a figure used are stated
    beside it), the GPU when there is one."""
    import torch

    from training.train import cpu_name

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"hardware": cpu_name() + (f", {gpu}" if gpu else ""), "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "date": datetime.now(UTC).strftime("%Y-%m-%d")}
