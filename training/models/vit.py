"""Vision Transformer (Dosovitskiy et al., 2020, "An Image is Worth 16x16 Words") and its hybrid variant.

Image -> patches -> tokens; a learned class token and position embedding; pre-norm Transformer blocks;
final LayerNorm; a linear head on the class token. The hybrid (paper section 3.1) takes its tokens from
the positions of a CNN feature map instead of raw patches, and reuses the same encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.models._registry import register_model
from training.models.resnet import BasicBlock, ResNet


@dataclass(kw_only=True)
class ViTConfig:
    num_classes: int = 10
    in_channels: int = 1
    img_size: int = 28
    patch_size: int | None = None  # None: 4 up to 64 px (7x7 tokens at 28 px), else 16 (the paper's /16)
    dim: int = 192  # token width D
    depth: int = 12  # Transformer blocks
    heads: int = 3  # attention heads; dim must divide by heads
    mlp_dim: int = 768  # hidden width of each block's MLP (4 * dim in the paper)
    dropout: float = 0.0  # after the attention and MLP projections
    attn_dropout: float = 0.0  # on the attention weights
    emb_dropout: float = 0.0  # on the token embeddings (patches + position)

    def __post_init__(self) -> None:
        if self.patch_size is None:
            self.patch_size = 4 if self.img_size <= 64 else 16
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")


class Attention(nn.Module):
    """Multi-head self-attention; the softmax(QK^T / sqrt(d)) V product is one fused SDPA call."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads, self.attn_dropout = cfg.heads, cfg.attn_dropout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, D) -> (N, L, D)
        n, length, dim = x.shape
        qkv = self.qkv(x).view(n, length, 3, self.heads, dim // self.heads)  # (N, L, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, H, L, D/H)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(n, length, dim)  # heads back side by side: (N, L, D)
        return self.drop(self.proj(y))


class Block(nn.Module):
    """Pre-norm block: x + MSA(LN(x)), then x + MLP(LN(x)) (paper eq. 2-3)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.mlp_dim), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.mlp_dim, cfg.dim), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, D) -> (N, L, D)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """`embed` maps images to a (N, D, h, w) grid of token features: by default a Conv2d whose kernel and
    stride equal the patch size (one linear projection per non-overlapping patch); the hybrid passes a CNN.
    `num_classes=0` leaves out the head (an Identity), for use as an encoder via `forward_tokens`."""

    def __init__(self, cfg: ViTConfig, embed: nn.Module | None = None, grid: int | None = None):
        super().__init__()
        self.cfg = cfg
        if embed is None:
            if cfg.img_size % cfg.patch_size:
                raise ValueError(f"img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
            embed = nn.Conv2d(cfg.in_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
            grid = cfg.img_size // cfg.patch_size
        if grid is None:
            raise ValueError("a custom embed must come with its output grid size")
        self.embed, self.grid = embed, grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, cfg.dim))  # learned, 1-D (paper D.4)
        self.emb_drop = nn.Dropout(cfg.emb_dropout)
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in [*self.blocks.modules(), self.head]:  # small-normal Linear init, as timm and the JAX code
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """(1, h*w + 1, D): the learned embedding, bicubically resized when the token grid is not the training
        grid (a frame of another size, as in the paper's fine-tuning at higher resolution, section 3.2)."""
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = grid.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(N, C, H, W) -> normed tokens (N, 1 + h*w, D), class token first, and the token grid (h, w)."""
        x = self.embed(x)  # (N, D, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (N, L = h*w, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (N, 1, D)
        x = self.emb_drop(torch.cat([cls, x], dim=1) + self.position_embedding(h, w))  # (N, L + 1, D)
        return self.norm(self.blocks(x)), (h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, num_classes)
        return self.head(self.forward_tokens(x)[0][:, 0])  # class token -> (N, num_classes)


def _vit(preset: dict, kwargs: dict) -> ViT:
    return ViT(ViTConfig(**{**preset, **kwargs}))  # kwargs override the preset (tests build tiny ones)


@register_model
def vit_tiny(**kwargs) -> ViT:
    return _vit(dict(dim=192, depth=12, heads=3, mlp_dim=768), kwargs)


@register_model
def vit_small(**kwargs) -> ViT:
    return _vit(dict(dim=384, depth=12, heads=6, mlp_dim=1536), kwargs)


@register_model
def vit_base(**kwargs) -> ViT:
    """ViT-B; at img_size > 64 the default patch is 16, i.e. ViT-B/16 (86 M parameters at 224 px)."""
    return _vit(dict(dim=768, depth=12, heads=12, mlp_dim=3072), kwargs)


@register_model
def hybrid_vit(*, backbone_layers: Sequence[int] = (2, 2, 2), backbone_width: int = 64, **kwargs) -> ViT:
    """ResNet-18's stem and first three stages (stride 4 up to 64 px, 16 above: 7x7 tokens at 28 px, 14x14
    at 224) feed a ViT-Tiny-wide encoder of half depth, since the CNN already does the early local mixing.
    `patch_size` (default 1) is the patch on the CNN feature map, as in the paper."""
    cfg = ViTConfig(**{"dim": 192, "depth": 6, "heads": 3, "mlp_dim": 768, "patch_size": 1, **kwargs})
    cnn = ResNet(BasicBlock, list(backbone_layers), num_classes=0, in_channels=cfg.in_channels,
                 img_size=cfg.img_size, width=backbone_width)
    if cnn.feature_size % cfg.patch_size:
        raise ValueError(f"feature map {cnn.feature_size} px is not a multiple of patch_size {cfg.patch_size}")
    proj = nn.Conv2d(cnn.num_features, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
    embed = nn.Sequential(_Features(cnn), proj)  # (N, C, H, W) -> (N, F, h, w) -> (N, D, h/p, w/p)
    return ViT(cfg, embed=embed, grid=cnn.feature_size // cfg.patch_size)


class _Features(nn.Module):
    """Wraps a ResNet so its feature map (not its logits) feeds the token projection."""

    def __init__(self, cnn: ResNet):
        super().__init__()
        self.cnn = cnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cnn.forward_features(x)

