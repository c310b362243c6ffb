"""An exponential moving average of the weights, with a warm-up, and batch-norm statistics for the average.

The effective decay grows with the number of updates, as in timm's ModelEmaV3 (warm-up form
1 - (1 + t)^(-3/4), which reaches 0.999 after 10k updates), capped at the recipe's `ema_decay`: a short run
averages its last steps instead of staying next to the initialisation, and a long run ends with the full decay.

Batch-norm running statistics are not weights: a running mean of activations computed with the raw weights
does not describe the averaged ones. `recalibrate_bn` recomputes them with the averaged weights on training
batches (a cumulative average, as `torch.optim.swa_utils.update_bn` does for SWA), before every evaluation.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from itertools import islice

import torch
import torch.nn as nn

WARMUP_POWER = 0.75
BN_BATCHES = 20  # training batches for recomputing BN statistics of the averaged weights


def ema_decay_at(updates: int, decay: float, power: float = WARMUP_POWER) -> float:
    """Decay applied at the update that follows `updates` earlier ones: 0 for the first (a copy), then
    1 - (1 + updates)^-power, never above `decay`."""
    return min(decay, 1.0 - (1.0 + updates) ** -power)


def ema_horizon(decay: float) -> int:
    """Updates an EMA with this decay averages over (1 / (1 - decay)): 1000 for 0.999."""
    return round(1.0 / (1.0 - decay)) if decay > 0 else 0


class WeightEMA:
    """`module` holds the averaged weights (eval mode, no gradients); `update(model)` after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0
        self._params = list(self.module.parameters())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = ema_decay_at(self.updates, self.decay)
        params = list(model.parameters())
        torch._foreach_lerp_(self._params, [p.detach() for p in params], 1.0 - d)
        # Buffers (BN statistics, counters) follow the raw model until recalibrate_bn replaces them.
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = updates


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recalibrate_bn(model: nn.Module, inputs: Iterable[torch.Tensor], max_batches: int = BN_BATCHES) -> int:
    """Recompute BN running mean/var of `model` as the plain average over up to `max_batches` batches of
    training inputs (as the model sees them). Returns the number of batches used; 0 when the model has no BN."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    saved = [(m.running_mean.clone(), m.running_var.clone()) for m in bns if m.track_running_stats]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    was_training = model.training
    model.train()
    n = 0
    try:
        for x in islice(inputs, max_batches):
            model(x)
            n += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    if n == 0:  # no batch to measure on: keep the statistics it had
        for m, (mean, var) in zip((m for m in bns if m.track_running_stats), saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
    return n
