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


def pick_samples(labels: torch.Tensor, preds: torch.Tensor, conf: torch.Tensor, n: int = 16) -> list[int]:
    """Indices worth looking at: the most confident mistakes, each followed by the most confident correct image
    of the class it was mistaken for (what the model thought it saw); correct images fill the rest."""
    right = preds == labels
    wrong = (~right).nonzero().flatten()
    wrong = wrong[conf[wrong].argsort(descending=True, stable=True)].tolist()
    picks: list[int] = []
    for i in wrong:
        if len(picks) + 2 > n:
            break
        picks.append(i)
        candidates = [j for j in (right & (labels == preds[i])).nonzero().flatten().tolist() if j not in picks]
        if candidates:
            picks.append(max(candidates, key=lambda j: (conf[j].item(), -j)))
    for j in right.nonzero().flatten().tolist():
        if len(picks) >= n:
            break
        if j not in picks:
            picks.append(j)
    return picks


def sample_grid_figure(images: Sequence[torch.Tensor] | torch.Tensor, labels: torch.Tensor, preds: torch.Tensor,
                       conf: torch.Tensor, classes: Sequence[str], title: str,
                       preprocess: dict[str, Any] | None = None, picks: Sequence[int] | None = None):
    """A grid of up to 16 images with predicted (and true) labels: `picks` (default: `pick_samples`) index
    images/labels/preds/conf. Mistakes in red, correct answers in green; `title` names model, checkpoint, accuracy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = list(picks if picks is not None else pick_samples(labels, preds, conf))
    shown = [images[i] for i in picks]
    if preprocess is not None and len({tuple(i.shape) for i in shown}) > 1:
        shown = [preprocess_display(i, preprocess) for i in shown]
    n, cols = len(picks), 4
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows + 0.6), squeeze=False)
    tiles = _unnormalize_for_display(torch.stack(shown)) if shown else []
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        i, img = picks[k], tiles[k]
        ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        ok = preds[i].item() == labels[i].item()
        text = f"{classes[preds[i]]} {conf[i]:.2f}" + ("" if ok else f"\n(true: {classes[labels[i]]})")
        ax.set_title(text, fontsize=7, color="green" if ok else "red")
    fig.suptitle(f"{title}\nred: the most confident mistakes, each next to a correct image of the class it named",
                 fontsize=8)
    fig.tight_layout()
    return fig


def preprocess_display(image: torch.Tensor, preprocess: dict[str, Any]) -> torch.Tensor:
    """A variable-sized uint8 image resized/cropped like the eval transform (for plotting only)."""
    from training.presets import resize_crop
    return resize_crop([image], preprocess)[0]


def confusion_figure(cm: torch.Tensor, classes: Sequence[str], title: str):
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
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def run_eval(checkpoint: str | Path, out_dir: str | Path, data_root: str | None = None,
             limit: int | None = None, batch_size: int = 256) -> dict[str, Any]:
    """Evaluate a checkpoint on its dataset's test split; write metrics.json, confusion.png, samples.png."""
    from training.checkpoint import build_model, load_checkpoint
    from training.data import load_dataset, make_loaders
    from training.train import evaluate, pick_device

    ckpt = load_checkpoint(checkpoint)
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
    ev = evaluate(model, test_loader, ckpt["preprocess"], device)
    labels = torch.cat([y.cpu() for _, y in test_loader])
    cm = confusion_matrix(ev.preds, labels, len(classes))
    per_class = (cm.diag().float() / cm.sum(1).clamp(min=1)).tolist()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{ckpt['arch']} | {Path(checkpoint).name} | test accuracy {ev.acc:.2%} on {labels.numel()} images"
    fig = confusion_figure(cm, classes, title)
    fig.savefig(out / "confusion.png", dpi=110)
    picks = pick_samples(labels, ev.preds, ev.conf)
    test = splits.test
    images = {i: test.images[i] if hasattr(test, "images") else test[i][0] for i in picks}
    fig2 = sample_grid_figure(images, labels, ev.preds, ev.conf, classes, title, ckpt["preprocess"], picks)
    fig2.savefig(out / "samples.png", dpi=110)
    _close(fig, fig2)
    result = {"checkpoint": str(checkpoint), "arch": ckpt["arch"], "test_acc": ev.acc, "test_loss": ev.loss,
              "n": int(labels.numel()), "per_class_acc": dict(zip(classes, per_class)),
              "confusion_matrix": cm.tolist(),
              "samples": [{"index": i, "label": classes[labels[i]], "predicted": classes[ev.preds[i]],
                           "probability": round(float(ev.conf[i]), 4)} for i in picks]}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result


def _close(*figs) -> None:
    import matplotlib.pyplot as plt

    for f in figs:
        plt.close(f)
