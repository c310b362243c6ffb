"""Attention fusion at ONNX export (handlers/fusion.py through handlers.runtimes.export_onnx): every ViT attention core
becomes one MultiHeadAttention, the fused graph computes what eager PyTorch does, the metadata says what was fused,
and graphs without the pattern are left as they were."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from handlers.fusion import ATTENTION_KEY, fuse_attention
from handlers.runtimes import export_onnx
from training.models import get_model
from training.models.vit import Attention, ViTConfig
from training.presets import make_preprocess

SIZE = 32


def ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def run(path, x: torch.Tensor) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]


def metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_a_vit_segmentation_export_fuses_every_attention_core_and_matches_eager(tmp_path):
    torch.manual_seed(0)
    model = get_model("vit_seg_tiny", num_classes=11, in_channels=3, img_size=SIZE, depth=2, dim=32, heads=2,
                      mlp_dim=64, head_width=16, detail_width=8).eval()
    pre = make_preprocess(SIZE, 3, [0.5] * 3, [0.25] * 3, crop=False)
    export_onnx(model, pre, tmp_path / "fused.onnx")
    export_onnx(model, pre, tmp_path / "plain.onnx", fuse=False)
    fused, plain = ops(tmp_path / "fused.onnx"), ops(tmp_path / "plain.onnx")
    assert fused["MultiHeadAttention"] == 2 and fused["Softmax"] == 0 and plain["Softmax"] == 2
    assert metadata(tmp_path / "fused.onnx")[ATTENTION_KEY] == "MultiHeadAttention x2"
    assert ATTENTION_KEY not in metadata(tmp_path / "plain.onnx")
    x = torch.randn(3, 3, SIZE, SIZE)  # batch 3: the exported batch axis is dynamic
    with torch.inference_mode():
        eager = model(x).numpy()
    out = run(tmp_path / "fused.onnx", x)
    assert out.shape == eager.shape
    np.testing.assert_allclose(out, eager, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out, run(tmp_path / "plain.onnx", x), atol=1e-5, rtol=1e-5)


class ScaledAttention(torch.nn.Module):
    """The zoo's attention with a non-default SDPA scale: the fused node must carry the graph's scale."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Attention(ViTConfig(img_size=SIZE, dim=32, heads=4, depth=1, mlp_dim=64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) image -> (N, L, D) tokens
        tokens = x.flatten(2).transpose(1, 2)[..., :32]
        n, length, dim = tokens.shape
        a = self.inner
        qkv = a.qkv(tokens).view(n, length, 3, a.heads, dim // a.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, scale=0.05)
        return a.proj(y.transpose(1, 2).reshape(n, length, dim))


def test_the_fused_node_keeps_a_non_default_scale(tmp_path):
    torch.manual_seed(1)
    model = ScaledAttention().eval()
    pre = make_preprocess(8, 64, [0.0] * 64, [1.0] * 64, crop=False)  # 64 channels of 8 x 8: 64 tokens of 64
    export_onnx(model, pre, tmp_path / "a.onnx")
    graph = onnx.load(str(tmp_path / "a.onnx")).graph
    [node] = [n for n in graph.node if n.op_type == "MultiHeadAttention"]
    scale = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}["scale"]
    assert scale == pytest.approx(0.05, rel=1e-5)
    x = torch.randn(2, 64, 8, 8)
    with torch.inference_mode():
        np.testing.assert_allclose(run(tmp_path / "a.onnx", x), model(x).numpy(), atol=1e-5, rtol=1e-4)


def test_a_graph_without_attention_is_left_as_exported(tmp_path):
    torch.manual_seed(0)
    model = get_model("resnet18_seg", num_classes=11, in_channels=3, img_size=SIZE).eval()
    pre = make_preprocess(SIZE, 3, [0.5] * 3, [0.25] * 3, crop=False)
    export_onnx(model, pre, tmp_path / "r.onnx", fuse=False)
    graph = onnx.load(str(tmp_path / "r.onnx"))
    before = [n.op_type for n in graph.graph.node]
    assert fuse_attention(graph) == 0
    assert [n.op_type for n in graph.graph.node] == before
    assert {p.key: p.value for p in graph.metadata_props}[ATTENTION_KEY] == "none"
