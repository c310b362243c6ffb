"""Vision Transformer (Dosovitskiy et al., 2020, "An Image is Worth 16x16 Words") and its hybrid variant.

Image -> patches -> tokens; a learned class token and position embedding; pre-norm Transformer blocks;
final LayerNorm; a linear head on the class token. The hybrid (paper section 3.1) takes its tokens from
the positions of a CNN feature map instead of raw patches, and reuses the same encoder.

`distilled=True` (the `*_distilled` builders) adds DeiT's distillation token (Touvron et al., 2021): a second
learned token with its own head, trained on a teacher's predictions (training/distill.py) while the class head
learns the labels; the model's output is the average of the two heads.
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
    distilled: bool = False  # DeiT distillation token + head; the output averages both heads

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
    stride equal the patch size (one linear projection per non-overlapping patch); the hybrid passes a CNN."""

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
        self.embed = embed
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.num_tokens = 2 if cfg.distilled else 1  # class (+ distillation) tokens before the patches
        self.dist_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + self.num_tokens, cfg.dim))  # learned (paper D.4)
        self.emb_drop = nn.Dropout(cfg.emb_dropout)
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.head_dist = nn.Linear(cfg.dim, cfg.num_classes) if cfg.distilled else None
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        heads = [self.head] + ([self.head_dist] if self.head_dist is not None else [])
        for m in [*self.blocks.modules(), *heads]:  # small-normal Linear init, as timm and the JAX code
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, both_heads: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H, W) -> (N, num_classes). A distilled model averages its class and distillation heads;
        `both_heads=True` returns both (class, distillation) for training on a teacher."""
        x = self.embed(x).flatten(2).transpose(1, 2)  # (N, D, h, w) -> (N, L = h*w, D)
        tokens = [self.cls_token] if self.dist_token is None else [self.cls_token, self.dist_token]
        tokens = [t.expand(x.shape[0], -1, -1) for t in tokens]  # each (N, 1, D)
        x = self.emb_drop(torch.cat([*tokens, x], dim=1) + self.pos_embed)  # (N, T + L, D), T = num_tokens
        x = self.norm(self.blocks(x))  # (N, T + L, D)
        cls = self.head(x[:, 0])  # class token -> (N, num_classes)
        if self.head_dist is None:
            return (cls, cls) if both_heads else cls
        dist = self.head_dist(x[:, 1])  # distillation token -> (N, num_classes)
        return (cls, dist) if both_heads else (cls + dist) / 2


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
def vit_tiny_distilled(**kwargs) -> ViT:
    """ViT-Tiny with DeiT's distillation token (DeiT-Ti distilled): train it with a teacher (recipe key `teacher`)."""
    return vit_tiny(**{**kwargs, "distilled": True})


@register_model
def vit_small_distilled(**kwargs) -> ViT:
    """ViT-Small with DeiT's distillation token: train it with a teacher (recipe key `teacher`)."""
    return vit_small(**{**kwargs, "distilled": True})


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

