"""Pictures of segmentation results: frames with predicted masks and boxes next to the ground truth."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from training.masks import labels_and_scores, masks_to_detections
from training.seg_eval import instance_truth


def palette(n: int) -> torch.Tensor:
    """(n, 3) float colours 0..1, index 0 (background) unused; tab10 for the objects."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return torch.tensor([(0.0, 0.0, 0.0)] + [cmap(i % 10)[:3] for i in range(n - 1)])


def overlay(frame: torch.Tensor, mask: torch.Tensor, colours: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """uint8 (3, H, W) frame and (H, W) class mask -> (H, W, 3) float image, classes tinted in."""
    img = frame.float().permute(1, 2, 0) / 255
    tint = colours[mask]
    return torch.where((mask > 0)[..., None], (1 - alpha) * img + alpha * tint, img)


def overlay_figure(frames: torch.Tensor, logits: torch.Tensor, masks: torch.Tensor, instances: torch.Tensor,
                   classes: Sequence[str], title: str):
    """One row per frame: prediction (mask, component boxes with class and score) | ground truth (mask,
    instance boxes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    logits = F.interpolate(logits.float().cpu(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
    pred, scores = labels_and_scores(logits)
    colours = palette(len(classes))
    n = len(frames)
    fig, axes = plt.subplots(n, 2, figsize=(7.2, 3.5 * n + 0.4), squeeze=False)
    for i in range(n):
        truth = instance_truth(masks[i], instances[i], min_area=1)
        sides = [(pred[i], masks_to_detections(pred[i], scores[i]), "prediction"),
                 (masks[i], [{"index": int(k), "box": b.tolist(), "score": None}
                             for k, b in zip(truth["labels"], truth["boxes"])], "ground truth")]
        for ax, (mask, dets, name) in zip(axes[i], sides):
            ax.imshow(overlay(frames[i], mask, colours).numpy())
            for d in dets:
                x0, y0, x1, y1 = d["box"]
                colour = colours[d["index"]].tolist()
                ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.5, color=colour))
                text = classes[d["index"]] + ("" if d["score"] is None else f" {d['score']:.2f}")
                ax.text(x0, y0 - 2, text, fontsize=7, color="white", va="bottom",
                        bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "lw": 0})
            ax.set_title(name, fontsize=9)
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
