"""Preprocessing, defined once. The evaluation transform is rebuilt from a checkpoint's `preprocess` dict
by both `python -m training eval` and the TorchServe handler, so a served answer equals an evaluated one.

All functions work on whole batches of uint8 image tensors (C, H, W) whose channel count already matches
`preprocess["channels"]`; decoding and channel conversion happen before (see handlers/pipeline.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

_INTERP = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
           "nearest": T.InterpolationMode.NEAREST}
# Where transparent input pixels go when a checkpoint records no `background` (checkpoints written before the
# key existed): white, the way a browser shows an image on a white page.
DEFAULT_BACKGROUND = (255, 255, 255)


def make_preprocess(size: int, channels: int, mean: Sequence[float], std: Sequence[float],
                    resize: int | None = None, interpolation: str = "bilinear",
                    background: Sequence[int] | None = None, crop: bool = True) -> dict[str, Any]:
    """The `preprocess` block of a checkpoint: shorter side -> `resize`, center crop -> `size`, normalize.
    `background` (RGB, 0..255) is what the training images show behind their objects: a served image with
    transparency is composited on it (black for Fashion-MNIST's white-on-black items). `crop=False`
    (segmentation: a mask covers the whole frame) resizes the whole image to size x size instead."""
    if interpolation not in _INTERP:
        raise ValueError(f"interpolation must be one of {sorted(_INTERP)}")
    pre = {"size": int(size), "resize": int(resize or size), "channels": int(channels),
           "mean": [float(m) for m in mean], "std": [float(s) for s in std], "interpolation": interpolation}
    if background is not None:
        pre["background"] = check_background(background)
    if not crop:
        pre["crop"] = False
    return pre


def check_background(value: Any) -> list[int]:
    """An RGB colour as three integers 0..255; ValueError otherwise."""
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)):
        raise ValueError(f"background must be three integers 0..255 (RGB), got {value!r}")
    return [int(v) for v in value]


def alpha_background(preprocess: dict[str, Any]) -> tuple[int, int, int]:
    """The colour transparent pixels are composited on: the checkpoint's `background`, else DEFAULT_BACKGROUND."""
    bg = preprocess.get("background")
    return tuple(check_background(bg)) if bg is not None else DEFAULT_BACKGROUND  # type: ignore[return-value]


def resize_crop(images: Sequence[torch.Tensor] | torch.Tensor, preprocess: dict[str, Any]) -> torch.Tensor:
    """Resize the shorter side to preprocess["resize"] and center-crop to preprocess["size"]; with
    preprocess["crop"] False (absent means True) resize the whole image to size x size instead.

    Images of equal shape are resized together in one call (a batch of same-sized photos costs one kernel
    launch, not one per image). Returns an (N, C, size, size) tensor of the input dtype.
    """
    size, resize = preprocess["size"], preprocess["resize"]
    crop = preprocess.get("crop", True)
    interp = _INTERP[preprocess["interpolation"]]
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        groups = {tuple(images.shape[-2:]): (list(range(len(images))), images)}
    else:
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            by_shape.setdefault(tuple(img.shape[-2:]), []).append(i)
        groups = {hw: (idx, torch.stack([images[i] for i in idx])) for hw, idx in by_shape.items()}
    out: torch.Tensor | None = None
    for (h, w), (idx, batch) in groups.items():
        if not crop:
            if (h, w) != (size, size):
                batch = TF.resize(batch, [size, size], interpolation=interp, antialias=True)
        elif min(h, w) != resize:
            batch = TF.resize(batch, [resize], interpolation=interp, antialias=True)
        if tuple(batch.shape[-2:]) != (size, size):
            batch = TF.center_crop(batch, [size, size])
        if out is None:
            n = len(images)
            out = torch.empty((n, *batch.shape[1:]), dtype=batch.dtype, device=batch.device)
        out[idx] = batch
    if out is None:
        raise ValueError("empty batch")
    return out


def normalize(x: torch.Tensor, preprocess: dict[str, Any], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (or float in 0..255) batch -> float, scaled to 0..1 and normalized with the checkpoint's mean/std."""
    mean = torch.tensor(preprocess["mean"], device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(preprocess["std"], device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    scale = 1.0 / (255.0 * std)
    return (x.float() * scale - mean / std).to(dtype)


def eval_batch(images: Sequence[torch.Tensor] | torch.Tensor, preprocess: dict[str, Any],
               device: torch.device | str | None = None) -> torch.Tensor:
    """The evaluation transform for a batch: resize/crop, then normalize; float32 (N, C, size, size)."""
    if device is not None:
        images = images.to(device) if isinstance(images, torch.Tensor) else [i.to(device) for i in images]
    return normalize(resize_crop(images, preprocess), preprocess)


def train_batch(x: torch.Tensor, preprocess: dict[str, Any], pad: int = 4, flip: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched augmentation for small in-memory datasets (uint8 N,C,H,W already at model size, any device):
    random crop with zero padding and random horizontal flip, then normalize."""
    n, _, h, w = x.shape
    x = normalize(x, preprocess)
    if pad:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
        rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        batch_idx = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        chan_idx = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
        x = padded[batch_idx, chan_idx, rows, cols]
    if flip:
        mask = torch.rand(n, device=x.device, generator=generator) < 0.5
        x = torch.where(mask.view(n, 1, 1, 1), x.flip(-1), x)
    return x


def imagefolder_train_transform(preprocess: dict[str, Any], *, size: int | None = None, scale_min: float = 0.35,
                                color_jitter: float = 0.3, auto_augment: str = "none",
                                random_erasing: float = 0.0) -> T.Compose:
    """Per-sample augmentation for photo datasets (ImageFolder), from torchvision.transforms.v2:
    RandomResizedCrop (area scale_min..1) + flip, optionally TrivialAugmentWide or RandAugment (2 ops,
    magnitude 9), ColorJitter, RandomErasing (filled with the mean colour, i.e. zero after normalisation).
    Produces uint8 tensors at `size` (default: the model size); `normalize` then runs on the whole batch."""
    interp = _INTERP[preprocess["interpolation"]]
    ops: list[T.Transform] = [
        T.RandomResizedCrop(size or preprocess["size"], scale=(scale_min, 1.0), interpolation=interp, antialias=True),
        T.RandomHorizontalFlip(),
    ]
    if auto_augment == "trivial":
        ops.append(T.TrivialAugmentWide(interpolation=interp))
    elif auto_augment == "randaugment":
        ops.append(T.RandAugment(num_ops=2, magnitude=9, interpolation=interp))
    elif auto_augment != "none":
        raise ValueError(f"auto_augment must be none, trivial or randaugment, got {auto_augment!r}")
    if color_jitter > 0:
        ops.append(T.ColorJitter(color_jitter, color_jitter, color_jitter, min(0.5, color_jitter / 6)))
    if random_erasing > 0:
        ops.append(T.RandomErasing(random_erasing, value=[round(255 * m) for m in preprocess["mean"]]))
    return T.Compose(ops)
