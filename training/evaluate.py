"""Evaluation: accuracy, per-class accuracy, confusion matrix and sample-prediction PNGs."""

from __future__ import annotations

from typing import Any, Sequence

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
