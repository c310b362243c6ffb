"""Squeeze-and-Excitation (Hu et al., 2018): global context re-weights the channels of a feature map."""

from __future__ import annotations

import torch
import torch.nn as nn


class SEModule(nn.Module):
    """x * sigmoid(fc(relu(fc(avgpool(x))))). 1x1 convs stand in for the paper's FC layers (same maths,
    no reshapes). The bottleneck keeps at least `min_channels` so narrow nets still get a useful gate."""

    def __init__(self, channels: int, reduction: int = 16, min_channels: int = 8):
        super().__init__()
        hidden = max(channels // reduction, min_channels)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C, H, W)
        s = x.mean((2, 3), keepdim=True)  # squeeze: (N, C, 1, 1)
        return x * torch.sigmoid(self.fc2(self.relu(self.fc1(s))))  # excite: per-channel gate in (0, 1)
