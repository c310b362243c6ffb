"""Blocks shared by the model families: channel/spatial attention gates and a non-local self-attention block."""

import torch.nn as nn

from training.models.layers.cbam import CBAM
from training.models.layers.non_local import NonLocalBlock
from training.models.layers.squeeze_excite import SEModule

__all__ = ["CBAM", "NonLocalBlock", "SEModule", "make_attn"]

_ATTN = {"se": SEModule, "cbam": CBAM}


def make_attn(kind: str | None, channels: int) -> nn.Module | None:
    """The attention gate a residual block applies to its branch: "se", "cbam" or None (no module)."""
    if kind is None:
        return None
    if kind not in _ATTN:
        raise ValueError(f"attn must be one of {sorted(_ATTN)} or None, got {kind!r}")
    return _ATTN[kind](channels)
