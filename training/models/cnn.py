"""Small classic CNNs: a minimal Conv-ReLU-Pool network and LeNet-5 (LeCun et al., 1998)."""

from __future__ import annotations

import torch
import torch.nn as nn

from training.models._registry import register_model


class SimpleCNN(nn.Module):
    """Conv -> ReLU -> MaxPool, twice; Flatten -> Linear -> Linear."""

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1, img_size: int = 28,
                 width: int = 32, hidden: int = 128, dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        feat = 2 * width * (img_size // 4) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(feat, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, num_classes)
        return self.classifier(self.features(x))


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling. Inputs of any size >= 28 px; an adaptive pool keeps the 5x5 map
    the classifier expects, so the same net takes 28 px Fashion-MNIST and 32 px CIFAR."""

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1, img_size: int = 28,
                 dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(5),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(120, 84), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model
def simple_cnn(**kwargs) -> SimpleCNN:
    return SimpleCNN(**kwargs)


@register_model
def lenet5(**kwargs) -> LeNet5:
    return LeNet5(**kwargs)
