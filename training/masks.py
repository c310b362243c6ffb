"""Masks -> detections, shared by evaluation and the video handler (imports only torch, numpy and scipy).

A detection is one connected component of one class in a per-pixel label map: its box is the component's
extent and its score the mean probability of that class inside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

DEFAULT_MIN_AREA = 64  # pixels: smaller components are dropped (noise at 224 px frames)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # diagonal neighbours join: thin straps stay one garment


def masks_to_detections(labels: torch.Tensor, probs: torch.Tensor | None = None,
                        min_area: int = DEFAULT_MIN_AREA, classes: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Connected components of every non-background class (index > 0) of an (H, W) label map.

    Returns [{"label": name (or the index when `classes` is None), "index": k, "score": float,
    "box": [x0, y0, x1, y1]}] in pixel coordinates with x1/y1 exclusive, sorted by score (highest first).
    `probs` (K, H, W): per-class probabilities; the score is their mean for class k over the component
    (1.0 when probs is None). Components of fewer than `min_area` pixels are dropped."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be (H, W), got shape {tuple(labels.shape)}")
    if probs is not None and (probs.dim() != 3 or probs.shape[1:] != labels.shape):
        raise ValueError(f"probs must be (K, H, W) with H, W of labels {tuple(labels.shape)}, "
                         f"got {tuple(probs.shape)}")
    lab = labels.detach().cpu().numpy()
    prob = probs.detach().float().cpu().numpy() if probs is not None else None
    present = np.flatnonzero(np.bincount(lab.ravel()))
    out = []
    for k in present[present > 0].tolist():
        comp, n = ndimage.label(lab == k, structure=_EIGHT_CONNECTED)
        area = np.bincount(comp.ravel(), minlength=n + 1)
        score = (np.bincount(comp.ravel(), weights=prob[k].ravel(), minlength=n + 1) / np.maximum(area, 1)
                 if prob is not None else np.ones(n + 1))
        for i, sl in enumerate(ndimage.find_objects(comp), start=1):
            if sl is None or area[i] < min_area:
                continue
            out.append({"label": classes[k] if classes is not None else k, "index": k, "score": float(score[i]),
                        "box": [sl[1].start, sl[0].start, sl[1].stop, sl[0].stop]})
    out.sort(key=lambda d: -d["score"])
    return out
