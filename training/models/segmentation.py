"""Semantic segmentation: a backbone's feature map -> a light progressive-upsampling head -> per-pixel logits.

The ViT variants follow SETR (Zheng et al., 2021): the patch tokens of a plain ViT encoder, laid back on their
grid, are the only features; the head upsamples them in x2 steps (SETR's "PUP" decoder, kept narrow for CPU
serving) down to stride 4, where it meets a two-conv detail branch computed from the frame itself (the
tokens are 16 px wide; garment outlines are not), then a 1x1 classifier and one bilinear x4 to the input size.
`resnet18_seg` puts ResNet-18 under the same head so a CNN and a ViT compare on the same task.

Every model returns logits (N, num_classes, H, W) at the input resolution; class 0 is the background.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.models._registry import register_model
from training.models.resnet import BasicBlock, ResNet
from training.models.vit import ViT, ViTConfig

SEG_DEFAULTS = dict(num_classes=11, in_channels=3, img_size=224)  # background + 10 garments, RGB 224 px frames


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SegHead(nn.Module):
    """Features (N, C, h, w) at `stride` (4 * 2**k input pixels per cell) + the input frame -> logits (N, K, H, W).

    1x1 projection to `width`; k-1 steps of (bilinear x2 -> 3x3 conv); a last bilinear x2 to stride 4, where
    the detail branch (two 3x3 stride-2 convs on the frame, `detail_width` channels) joins; a 3x3 fuse conv to
    width/2; 1x1 classifier; bilinear to H x W. About 0.2 GFLOPs at 224 px for a stride-16 ViT (ViT-Tiny/16
    itself: 2.5), so the encoder sets the speed."""

    def __init__(self, in_dim: int, num_classes: int, stride: int, *, in_channels: int = 3, width: int = 64,
                 detail_width: int = 16):
        super().__init__()
        steps = (stride // 4).bit_length() - 1
        if stride < 4 or 4 * 2**steps != stride:
            raise ValueError(f"feature stride must be 4 times a power of two, got {stride}")
        self.proj = nn.Sequential(nn.Conv2d(in_dim, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.ups = nn.ModuleList(conv_bn_relu(width, width) for _ in range(max(0, steps - 1)))
        self.detail = nn.Sequential(conv_bn_relu(in_channels, detail_width // 2, 2),
                                    conv_bn_relu(detail_width // 2, detail_width, 2))
        self.fuse = conv_bn_relu(width + detail_width, width // 2)
        self.classifier = nn.Conv2d(width // 2, num_classes, 1)

    def forward(self, feats: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.proj(feats)  # (N, width, h, w)
        for up in self.ups:
            x = up(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        detail = self.detail(image)  # (N, detail_width, ~H/4, ~W/4)
        x = F.interpolate(x, size=detail.shape[-2:], mode="bilinear", align_corners=False)  # to stride 4
        x = self.classifier(self.fuse(torch.cat([x, detail], dim=1)))
        return F.interpolate(x, size=image.shape[-2:], mode="bilinear", align_corners=False)


class ViTSeg(nn.Module):
    """A ViT encoder (training/models/vit.py, no class head) whose patch tokens feed a SegHead.
    Frames of another size than `img_size` work when H and W are multiples of the patch size: the position
    embedding is resized bicubically to the new token grid (ViT.position_embedding)."""

    head_module = "head"  # not a Linear: training.finetune.head_name

    def __init__(self, cfg: ViTConfig, *, head_width: int = 64, detail_width: int = 16):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.encoder = ViT(dataclasses.replace(cfg, num_classes=0))
        self.head = SegHead(cfg.dim, cfg.num_classes, cfg.patch_size, in_channels=cfg.in_channels,
                            width=head_width, detail_width=detail_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, num_classes, H, W)
        n, _, height, width = x.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"frame {height}x{width} is not a multiple of the patch size {self.patch_size}")
        tokens, (h, w) = self.encoder.forward_tokens(x)  # (N, 1 + h*w, D)
        feats = tokens[:, self.encoder.num_tokens:].transpose(1, 2).reshape(n, -1, h, w)  # patch tokens on their grid
        return self.head(feats, x)


class ResNetSeg(nn.Module):
    """ResNet-18's stages (stride 32 above 64 px, 8 below) under the same SegHead. `backbone` takes the weights
    of a resnet18 classifier of the same width and stem (init_from, training/finetune.py)."""

    head_module = "head"  # not a Linear: training.finetune.head_name
    backbone_arch = "resnet18"

    def __init__(self, *, num_classes: int, in_channels: int, img_size: int, width: int = 64, head_width: int = 64,
                 detail_width: int = 16):
        super().__init__()
        self.backbone = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=0, in_channels=in_channels, img_size=img_size,
                               width=width)
        self.head = SegHead(self.backbone.num_features, num_classes, self.backbone.feature_stride,
                            in_channels=in_channels, width=head_width, detail_width=detail_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, num_classes, H, W)
        return self.head(self.backbone.forward_features(x), x)


_HEAD_KEYS = ("head_width", "detail_width")


def _vit_seg(preset: dict, kwargs: dict) -> ViTSeg:
    head = {k: kwargs.pop(k) for k in _HEAD_KEYS if k in kwargs}
    return ViTSeg(ViTConfig(**{**SEG_DEFAULTS, "patch_size": 16, **preset, **kwargs}), **head)


@register_model(task="segmentation")
def vit_seg_tiny(**kwargs) -> ViTSeg:
    """ViT-Tiny/16 encoder (dim 192, depth 12, 3 heads)."""
    return _vit_seg(dict(dim=192, depth=12, heads=3, mlp_dim=768), kwargs)


@register_model(task="segmentation")
def vit_seg_small(**kwargs) -> ViTSeg:
    """ViT-Small/16 encoder (dim 384, depth 12, 6 heads)."""
    return _vit_seg(dict(dim=384, depth=12, heads=6, mlp_dim=1536), kwargs)


@register_model(task="segmentation")
def vit_seg_b16(**kwargs) -> ViTSeg:
    """ViT-B/16 encoder (dim 768, depth 12, 12 heads, MLP 3072)."""
    return _vit_seg(dict(dim=768, depth=12, heads=12, mlp_dim=3072), kwargs)


@register_model(task="segmentation")
def resnet18_seg(**kwargs) -> ResNetSeg:
    return ResNetSeg(**{**SEG_DEFAULTS, **kwargs})
