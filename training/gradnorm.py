"""Per-layer gradient norms during training: the evidence for (or against) vanishing and exploding gradients.

    recorder = GradNormRecorder(every=5)
    train(recipe, out, after_backward=recorder)   # called after each backward pass, before the optimizer step
    recorder.layers                               # weighted layers (conv, linear) in the order the model defines them
    recorder.records                              # [{"step": s, "norms": [L2 norm of each layer's weight gradient]}]

A record is taken every `every` optimizer steps (step 0 included). The norms are of the weight gradients of the
weighted layers — the 6n+2 layers of a CIFAR-style ResNet — not of biases or norm layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

WEIGHTED = (nn.Conv2d, nn.Linear)


def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every conv and linear layer, in definition order (input to output for our nets)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, WEIGHTED)]


class GradNormRecorder:
    def __init__(self, every: int = 1):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.layers: list[str] = []
        self.records: list[dict[str, Any]] = []

    def __call__(self, model: nn.Module, step: int) -> None:
        if step % self.every:
            return
        layers = weighted_layers(model)
        names = [name for name, _ in layers]
        if self.layers and names != self.layers:
            raise ValueError("GradNormRecorder: the model's layers changed between steps")
        self.layers = names
        grads = [m.weight.grad for _, m in layers]
        if any(g is None for g in grads):
            missing = [n for n, g in zip(names, grads) if g is None]
            raise ValueError(f"GradNormRecorder: no gradient for {', '.join(missing[:3])}; call it after backward")
        norms = torch.stack(torch._foreach_norm(grads)).float().cpu().tolist()
        self.records.append({"step": step, "norms": norms})

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "layers": self.layers, "records": self.records}

    def load_state_dict(self, state: dict[str, Any], before_step: int | None = None) -> None:
        """Restore; `before_step` drops records of steps at or after it (a run resumed from an earlier
        checkpoint redoes those steps)."""
        self.every, self.layers = int(state["every"]), list(state["layers"])
        self.records = [r for r in state["records"] if before_step is None or r["step"] < before_step]


def mean_norms(records: list[dict[str, Any]], first_step: int, end_step: int) -> list[float] | None:
    """Per-layer mean of the records with first_step <= step < end_step (None when there are none)."""
    rows = [r["norms"] for r in records if first_step <= r["step"] < end_step]
    if not rows:
        return None
    return torch.tensor(rows, dtype=torch.float64).mean(0).tolist()
