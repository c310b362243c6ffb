"""Non-local block (Wang et al., 2018), embedded-Gaussian form: every position attends to every other one.

    z = x + BN(W_z y),   y_i = sum_j softmax_j(theta(x_i) . phi(x_j)) g(x_j)

The output BN starts with gamma = 0, so a freshly inserted block is the identity and does not disturb
the network it is added to (the paper's initialisation).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class NonLocalBlock(nn.Module):
    def __init__(self, channels: int, inner_channels: int | None = None):
        super().__init__()
        inner = inner_channels or max(channels // 2, 1)  # the paper halves the channels inside the block
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.proj = nn.Conv2d(inner, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C, H, W)
        n, _, h, w = x.shape
        q = self.theta(x).flatten(2).transpose(1, 2)  # (N, HW, C')
        k = self.phi(x).flatten(2).transpose(1, 2)  # (N, HW, C')
        v = self.g(x).flatten(2).transpose(1, 2)  # (N, HW, C')
        # scale=1: the embedded-Gaussian softmax of plain dot products, as in the paper (no 1/sqrt(d))
        y = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (N, HW, C')
        y = y.transpose(1, 2).reshape(n, -1, h, w)  # (N, C', H, W)
        return x + self.bn(self.proj(y))
