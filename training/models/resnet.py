"""ResNet (He et al., 2015), its plain (skip-free) twins, and the attention variants (SE, CBAM, non-local).

One `ResNet(block, layers)` class and a one-line builder per variant, in the style of torchvision's
models/resnet.py. Module names follow torchvision (conv1, bn1, layer1..layer4, fc, downsample), so a 224 px
model's state_dict loads into `torchvision.models.resnet18(num_classes=...)` and back. Attention is a block
option (`attn="se" | "cbam"`), as in timm, not a separate family; `attn_stages` and `non_local_stages` place it
per stage. The CIFAR-style nets of the paper's section 4.2 (resnet20/56/110 and their plain twins: 3 stages of
16/32/64 channels, 6n+2 weighted layers, parameter-free shortcuts) are builders of the same class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.models._registry import register_model
from training.models.layers import NonLocalBlock, make_attn


def _out_size(n: int, stride: int) -> int:
    """Side of a feature map after a padded ('same') conv or max pool with this stride."""
    return (n - 1) // stride + 1


class BasicBlock(nn.Module):
    """Two 3x3 convs. `skip=False` drops the identity path (a plain block, for the degradation experiment)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, *, attn: str | None = None, skip: bool = True,
                 shortcut: str = "conv"):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu_out = nn.ReLU(inplace=True)  # one module per call site: pt2e quantizers match modules
        self.attn = make_attn(attn, planes)
        self.skip = skip
        self.downsample = _downsample(inplanes, planes * self.expansion, stride, shortcut) if skip else None

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return _finish(self, x, out)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride, as torchvision's "ResNet v1.5") -> 1x1 expand by `expansion`."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, *, attn: str | None = None, skip: bool = True,
                 shortcut: str = "conv"):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.relu2 = nn.ReLU(inplace=True)
        self.relu_out = nn.ReLU(inplace=True)  # one module per call site: pt2e quantizers match modules
        self.attn = make_attn(attn, out)
        self.skip = skip
        self.downsample = _downsample(inplanes, out, stride, shortcut) if skip else None

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return _finish(self, x, out)


SHORTCUTS = ("conv", "pad")


class PadShortcut(nn.Module):
    """The paper's option A: subsample by the stride and zero-pad the new channels (no parameters, so a residual
    net has exactly the weights of its plain twin)."""

    def __init__(self, outplanes: int, stride: int):
        super().__init__()
        self.outplanes, self.stride = outplanes, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, outplanes, H/stride, W/stride)
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.outplanes - x.shape[1]))


def _downsample(inplanes: int, outplanes: int, stride: int, shortcut: str = "conv") -> nn.Module | None:
    """Where the shape changes: a projection (1x1 conv + BN, option B) or `PadShortcut` (option A, "pad");
    identity (None) elsewhere."""
    if stride == 1 and inplanes == outplanes:
        return None
    if shortcut == "pad":
        return PadShortcut(outplanes, stride)
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), nn.BatchNorm2d(outplanes))


def _finish(block: BasicBlock | Bottleneck, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Shared block tail: attention gate on the residual branch, then the skip (if any), then ReLU."""
    if block.attn is not None:
        out = block.attn(out)
    if block.skip:
        out = out + (x if block.downsample is None else block.downsample(x))
    return block.relu_out(out)


class ResNet(nn.Module):
    """Stem -> len(layers) stages (width doubles, resolution halves after the first) -> pool -> dropout -> fc.

    Attention: `attn` gates the blocks of the stages in `attn_stages` (1-based; None: every stage);
    `non_local_stages` appends a non-local block to the end of those stages; `self_attn` puts one after the
    last stage (outside it, under the name `non_local`).

    The stem suits the input: up to 64 px a 3x3 stride-1 conv without max pool (the CIFAR variant; the
    ImageNet stem would shrink a 28 px image to 7 px before the first stage), above that 7x7/2 + maxpool/2.
    `num_classes=0` leaves out the head (fc is an Identity), for use as a backbone via `forward_features`.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: Sequence[int], *, num_classes: int = 10,
                 in_channels: int = 1, img_size: int = 28, width: int = 64, attn: str | None = None,
                 skip: bool = True, zero_init_residual: bool | None = None, self_attn: bool = False,
                 dropout: float = 0.0, shortcut: str = "conv", attn_stages: Sequence[int] | None = None,
                 non_local_stages: Sequence[int] = ()):
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        stages = range(1, len(layers) + 1)
        for what, chosen in (("attn_stages", attn_stages or ()), ("non_local_stages", non_local_stages)):
            if any(s not in stages for s in chosen):
                raise ValueError(f"{what} must name stages 1..{len(layers)}, got {list(chosen)}")
        attn_stages = stages if attn_stages is None else attn_stages
        # zero-init of the last BN makes each residual block start as the identity; without a skip it
        # would make the block output constant zero, so it follows `skip` unless set.
        if zero_init_residual is None:
            zero_init_residual = skip
        if zero_init_residual and not skip:
            raise ValueError("zero_init_residual needs skip connections (a plain block would output zeros)")
        if img_size <= 64:
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
            size, stem_stride = img_size, 1
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            size, stem_stride = _out_size(_out_size(img_size, 2), 2), 4
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        inplanes = width
        self.stage_names = [f"layer{i + 1}" for i in range(len(layers))]
        for i, (name, n_blocks) in enumerate(zip(self.stage_names, layers)):
            stride = 1 if i == 0 else 2
            planes = width * 2**i
            blocks: list[nn.Module] = [
                block(inplanes if j == 0 else planes * block.expansion, planes, stride if j == 0 else 1,
                      attn=attn if i + 1 in attn_stages else None, skip=skip, shortcut=shortcut)
                for j in range(n_blocks)]
            if i + 1 in non_local_stages:
                blocks.append(NonLocalBlock(planes * block.expansion))
            setattr(self, name, nn.Sequential(*blocks))
            inplanes, size = planes * block.expansion, _out_size(size, stride)
        self.num_features, self.feature_size = inplanes, size  # forward_features: (N, num_features, size, size)
        self.feature_stride = stem_stride * 2 ** (len(layers) - 1)  # input pixels per feature-map cell
        self.non_local = NonLocalBlock(inplanes) if self_attn else None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(inplanes, num_classes) if num_classes > 0 else nn.Identity()

        for m in self.modules():  # torchvision's init; NonLocalBlocks then re-zero their own output BN
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, NonLocalBlock):
                nn.init.zeros_(m.bn.weight)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, F, h, w)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x if self.non_local is None else self.non_local(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, num_classes)
        x = torch.flatten(self.avgpool(self.forward_features(x)), 1)
        return self.fc(self.dropout(x))


@register_model
def resnet18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


@register_model
def resnet34(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


@register_model
def resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


@register_model
def resnet101(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], **kwargs)


@register_model
def plain18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], skip=False, **kwargs)


@register_model
def plain34(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], skip=False, **kwargs)


@register_model
def se_resnet18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], attn="se", **kwargs)


@register_model
def se_resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], attn="se", **kwargs)


@register_model
def cbam_resnet18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], attn="cbam", **kwargs)


@register_model
def resnet18_selfattn(**kwargs) -> ResNet:
    """ResNet-18 with a non-local block after the last stage (global context at the coarsest scale)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], self_attn=True, **kwargs)


def _cifar(n: int, skip: bool, kwargs: dict) -> ResNet:
    """He et al. (2016) section 4.2: a 3x3 conv of 16 channels, 3 stages of n basic blocks at 16/32/64 channels,
    pool, fc: 6n+2 weighted layers. Option A shortcuts and no zero-init of the residual branch, as in the paper,
    so a residual net and its plain twin have the same weights and the same initialisation."""
    kwargs = {"width": 16, "shortcut": "pad", "zero_init_residual": False, **kwargs}
    return ResNet(BasicBlock, [n, n, n], skip=skip, **kwargs)


@register_model
def resnet20(**kwargs) -> ResNet:
    return _cifar(3, True, kwargs)


@register_model
def resnet56(**kwargs) -> ResNet:
    return _cifar(9, True, kwargs)


@register_model
def resnet110(**kwargs) -> ResNet:
    return _cifar(18, True, kwargs)


@register_model
def plain20(**kwargs) -> ResNet:
    return _cifar(3, False, kwargs)


@register_model
def plain56(**kwargs) -> ResNet:
    return _cifar(9, False, kwargs)


@register_model
def plain110(**kwargs) -> ResNet:
    return _cifar(18, False, kwargs)
