"""What the archive step takes from a checkpoint's own dataset, per task: the images int8 is calibrated on (a
stated, seeded sample of the training split) and the test-split metric an artifact is measured with.

Both dispatch on the checkpoint's `task` ("classification" when absent) through one table each, so a task
plugs in by adding its entries:

    CALIBRATION_SOURCES["segmentation"] = <frames of train-split clips (training/clips.py)>
    METRICS["segmentation"] = <mIoU over test-split clips>

Used by the archive step and by in-process tools (benchmarks, tests); never by a TorchServe worker, which loads
the artifact built here (handlers/artifacts.py). Images come out through the checkpoint's own eval transform
(training.presets.eval_batch), exactly as the served pipeline feeds the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from training.presets import eval_batch

BATCH = 16  # images per calibration batch


class CalibrationError(ValueError):
    """The checkpoint's data cannot be read (no dataset named, not on this machine) or the task has no source."""


def _task(ckpt: Mapping[str, Any]) -> str:
    return str(ckpt.get("task") or "classification")


def _splits(ckpt: Mapping[str, Any], data_root: str | None) -> tuple[Any, str]:
    """The checkpoint's dataset, split exactly as in training (its recipe's seed and val_fraction)."""
    from training.data import DatasetError, load_dataset

    recipe = dict(ckpt.get("recipe") or {})
    name = recipe.get("dataset")
    if not name:
        raise CalibrationError("the checkpoint's recipe names no dataset")
    try:
        splits = load_dataset(name, data_root or recipe.get("data_root"), seed=int(recipe.get("seed", 0)),
                              val_fraction=float(recipe.get("val_fraction", 0.1)), image_size=recipe.get("img_size"))
    except (DatasetError, OSError) as e:
        raise CalibrationError(str(e)) from None
    return splits, name


def _images(split: Any, indices: list[int]) -> torch.Tensor | list[torch.Tensor]:
    if hasattr(split, "images"):  # in-memory uint8 (N, C, H, W)
        return split.images[torch.tensor(indices, dtype=torch.long)]
    return [split[i][0] for i in indices]  # an ImageFolder split decodes lazily


def _labels(split: Any, indices: list[int]) -> torch.Tensor:
    if hasattr(split, "labels"):
        return split.labels[torch.tensor(indices, dtype=torch.long)]
    return torch.tensor([split.samples[i][1] for i in indices])


def classification_images(ckpt: Mapping[str, Any], n: int, seed: int,
                          data_root: str | None) -> tuple[torch.Tensor | list[torch.Tensor], dict[str, Any]]:
    """n images drawn without replacement from the training split with a seeded permutation."""
    splits, name = _splits(ckpt, data_root)
    train = splits.train
    if len(train) == 0:
        raise CalibrationError(f"the {name} training split is empty")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    indices = sorted(perm.tolist())
    recipe = ckpt.get("recipe") or {}
    return _images(train, indices), {
        "source": f"{name}:train", "images": len(indices), "seed": seed,
        "split_seed": int(recipe.get("seed", 0)), "indices_sha256": hashlib.sha256(str(indices).encode()).hexdigest()}


# task -> (checkpoint, n, seed, data_root) -> (uint8 images, description). Segmentation: frames of train-split
# clips from training/clips.py, whole frames resized as its preprocess says (crop false).
CALIBRATION_SOURCES: dict[str, Callable[..., tuple[Any, dict[str, Any]]]] = {
    "classification": classification_images,
}


def calibration_set(ckpt: Mapping[str, Any], n: int, seed: int, data_root: str | None = None,
                    synthetic: bool = False) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Normalized calibration batches (float32, BATCH images each) and a description of where they came from.

    synthetic=True: no data at all (random-weight benchmark models): the description says "synthetic" and
    the caller must say so loudly; it costs accuracy on trained models (docs/runtimes.md)."""
    preprocess = dict(ckpt["preprocess"])
    if synthetic:
        x, about = synthetic_images(preprocess, n, seed), {"source": "synthetic", "images": n, "seed": seed}
    else:
        task = _task(ckpt)
        if task not in CALIBRATION_SOURCES:
            raise CalibrationError(f"no calibration source for task {task!r} (training/calibration.py "
                                   "CALIBRATION_SOURCES)")
        images, about = CALIBRATION_SOURCES[task](ckpt, n, seed, data_root)
        x = eval_batch(images, preprocess)
    return [x[i:i + BATCH].contiguous() for i in range(0, len(x), BATCH)], about


def synthetic_images(preprocess: Mapping[str, Any], n: int, seed: int = 0) -> torch.Tensor:
    """Smooth random fields plus fine noise, squashed by a sigmoid into 0..1 pixels, then normalized with the
    checkpoint's mean/std. Of the generators tried this lost least accuracy (docs/runtimes.md)."""
    g = torch.Generator().manual_seed(seed)
    c, s = int(preprocess["channels"]), int(preprocess["size"])
    field = F.interpolate(torch.randn(n, c, 7, 7, generator=g), size=(s, s), mode="bilinear", align_corners=False)
    pixels = torch.sigmoid(field / field.std() + 0.3 * torch.randn(n, c, s, s, generator=g))
    mean = torch.tensor(preprocess["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(preprocess["std"]).view(1, -1, 1, 1)
    return (pixels - mean) / std


@torch.inference_mode()
def top1_accuracy(forward: Callable[[torch.Tensor], torch.Tensor], ckpt: Mapping[str, Any], data_root: str | None,
                  limit: int | None, batch: int = 256) -> dict[str, Any]:
    """Top-1 accuracy of `forward` (normalized batch -> logits) on the first `limit` test images (all: None)."""
    splits, name = _splits(ckpt, data_root)
    test = splits.test
    n = len(test) if limit is None else min(limit, len(test))
    preprocess, correct = dict(ckpt["preprocess"]), 0
    for start in range(0, n, batch):
        idx = list(range(start, min(start + batch, n)))
        logits = forward(eval_batch(_images(test, idx), preprocess))
        correct += int((logits.float().argmax(1).cpu() == _labels(test, idx)).sum())
    if n == 0:
        raise CalibrationError(f"the {name} test split is empty")
    return {"metric": "top1", "value": round(correct / n, 6), "images": n, "split": f"{name}:test"}


# task -> (forward, checkpoint, data_root, limit) -> {"metric", "value", "images", "split"}; higher is better.
# Segmentation: mean IoU of the argmax masks over test-split clips.
METRICS: dict[str, Callable[..., dict[str, Any]]] = {"classification": top1_accuracy}


def measure(forward: Callable[[torch.Tensor], torch.Tensor], ckpt: Mapping[str, Any], data_root: str | None = None,
            limit: int | None = None) -> dict[str, Any]:
    """The task's test-split metric for `forward` (raises CalibrationError when the data is not here)."""
    task = _task(ckpt)
    if task not in METRICS:
        raise CalibrationError(f"no test metric for task {task!r} (training/calibration.py METRICS)")
    return METRICS[task](forward, ckpt, data_root, limit)
