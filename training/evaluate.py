"""Evaluation: accuracy, per-class accuracy, confusion matrix and sample-prediction PNGs."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from training.presets import eval_batch


@torch.inference_mode()
def predict_probs(model: nn.Module, preprocess: dict[str, Any],
                  images: Sequence[torch.Tensor] | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """Class probabilities (N, num_classes, float32) for uint8 images, through the checkpoint's eval transform.
    The served handler uses the same transform, so its answers match these."""
    x = eval_batch(images, preprocess, device=device)
    return torch.softmax(model(x).float(), dim=1)


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(true, predicted) counts."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def _unnormalize_for_display(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N,C,H,W) -> float (N,H,W,C) in 0..1 for matplotlib."""
    return x.float().div(255).permute(0, 2, 3, 1).cpu()


def sample_grid_figure(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, preprocess: dict[str, Any],
                       classes: Sequence[str], device: str | torch.device = "cpu"):
    """A 4x4 grid of images with predicted (and true) labels; wrong answers in red."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(images, torch.Tensor):
        images = torch.stack([preprocess_display(i, preprocess) for i in images])
    probs = predict_probs(model, preprocess, images, device=device).cpu()
    conf, pred = probs.max(1)
    n = min(16, len(images))
    cols = 4
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows))
    shown = _unnormalize_for_display(images[:n])
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        img = shown[i]
        ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        ok = pred[i].item() == labels[i].item()
        ax.set_title(f"{classes[pred[i]]} {conf[i]:.2f}\n(true: {classes[labels[i]]})", fontsize=7,
                     color="green" if ok else "red")
    fig.tight_layout()
    return fig


def preprocess_display(image: torch.Tensor, preprocess: dict[str, Any]) -> torch.Tensor:
    """A variable-sized uint8 image resized/cropped like the eval transform (for plotting only)."""
    from training.presets import resize_crop
    return resize_crop([image], preprocess)[0]


def confusion_figure(cm: torch.Tensor, classes: Sequence[str]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.55 * n))
    norm = cm.float() / cm.sum(1, keepdim=True).clamp(min=1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    return fig


def run_eval(checkpoint: str | Path, out_dir: str | Path, data_root: str | None = None,
             limit: int | None = None, batch_size: int = 256, clips_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint on its dataset's test split; write metrics.json, confusion.png, samples.png.
    Segmentation checkpoints: training.seg_eval.run_eval (metrics.json, overlays.png; clips_dir: MP4 clips)."""
    from training.checkpoint import build_model, load_checkpoint
    from training.data import load_dataset, make_loaders
    from training.train import evaluate, pick_device

    ckpt = load_checkpoint(checkpoint)
    if ckpt.get("task") == "segmentation":
        from training.seg_eval import run_eval as run_seg_eval

        return run_seg_eval(ckpt, checkpoint, out_dir, data_root, limit, clips_dir)
    recipe = ckpt["recipe"]
    device = pick_device()
    splits = load_dataset(ckpt.get("dataset", recipe["dataset"]), data_root or recipe.get("data_root"),
                          val_fraction=recipe.get("val_fraction", 0.1), seed=recipe.get("seed", 0),
                          image_size=ckpt["preprocess"]["size"], limit=limit)
    classes = list(ckpt["classes"])
    if list(splits.info.classes) != classes:
        raise ValueError(f"the dataset's classes {splits.info.classes} differ from the checkpoint's {classes}")
    _, _, test_loader = make_loaders(splits, batch_size, device, seed=0)
    model = build_model(ckpt).to(device)
    loss, acc, preds = evaluate(model, test_loader, ckpt["preprocess"], device)
    labels = torch.cat([y.cpu() for _, y in test_loader])
    cm = confusion_matrix(preds, labels, len(classes))
    per_class = (cm.diag().float() / cm.sum(1).clamp(min=1)).tolist()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    confusion_figure(cm, classes).savefig(out / "confusion.png", dpi=110)
    x, y = next(iter(test_loader))
    sample_grid_figure(model, x[:16], y[:16], ckpt["preprocess"], classes, device).savefig(out / "samples.png", dpi=110)
    result = {"checkpoint": str(checkpoint), "arch": ckpt["arch"], "test_acc": acc, "test_loss": loss,
              "n": int(labels.numel()), "per_class_acc": dict(zip(classes, per_class)),
              "confusion_matrix": cm.tolist()}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result
