"""CBAM, the Convolutional Block Attention Module (Woo et al., 2018): a channel gate, then a spatial gate."""

from __future__ import annotations

import torch
import torch.nn as nn


class ChannelAttention(nn.Module):
    """Like SE, but the shared MLP sees both the average- and the max-pooled descriptor (the paper finds
    max pooling adds a complementary cue)."""

    def __init__(self, channels: int, reduction: int = 16, min_channels: int = 8):
        super().__init__()
        hidden = max(channels // reduction, min_channels)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C, H, W)
        avg = self.mlp(x.mean((2, 3), keepdim=True))  # (N, C, 1, 1)
        mx = self.mlp(x.amax((2, 3), keepdim=True))  # (N, C, 1, 1)
        return x * torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    """A 7x7 conv over the channel-wise mean and max maps gives one gate per position."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C, H, W)
        desc = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)  # (N, 2, H, W)
        return x * torch.sigmoid(self.bn(self.conv(desc)))  # gate (N, 1, H, W) broadcast over channels


class CBAM(nn.Module):
    """Channel attention followed by spatial attention (the order the paper found best)."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))
