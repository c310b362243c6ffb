"""Segmentation models: shapes and a backward pass at small size, position-embedding interpolation, ONNX export
with a dynamic batch, the registry's task split and the checkpoint's task contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from training.checkpoint import CheckpointError, validate_checkpoint
from training.models import get_model, list_models, model_task
from training.presets import eval_batch, make_preprocess

SEG_MODELS = ["vit_seg_tiny", "vit_seg_small", "vit_seg_b16", "resnet18_seg"]


def tiny(name: str, **kw) -> nn.Module:
    """Shrunk widths and depth; the structure (encoder, head stages, detail branch) is unchanged."""
    small = dict(width=8) if name.startswith("resnet") else dict(dim=32, depth=2, heads=2, mlp_dim=64)
    return get_model(name, **{"img_size": 64, "head_width": 16, "detail_width": 8, **small, **kw})


def test_registry_lists_segmentation_models_apart():
    assert list_models("segmentation") == sorted(SEG_MODELS)
    assert not set(SEG_MODELS) & set(list_models("classification"))
    assert model_task("vit_seg_tiny") == "segmentation" and model_task("resnet18") == "classification"


def test_full_size_defaults_are_the_named_architectures():
    enc = get_model("vit_seg_b16", depth=1).encoder  # one block of the twelve keeps the test fast
    assert (enc.cfg.dim, enc.cfg.heads, enc.cfg.mlp_dim, enc.cfg.patch_size) == (768, 12, 3072, 16)
    assert enc.pos_embed.shape == (1, 14 * 14 + 1, 768)  # 224 px frames, /16 patches
    tiny_enc = get_model("vit_seg_tiny").encoder
    assert (tiny_enc.cfg.dim, tiny_enc.cfg.depth, tiny_enc.cfg.heads) == (192, 12, 3)
    assert isinstance(tiny_enc.head, nn.Identity)  # no class head inside the encoder


@pytest.mark.parametrize("name", SEG_MODELS)
def test_per_pixel_logits_and_a_backward_pass(name):
    torch.manual_seed(0)
    model = tiny(name, num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 5, 64, 64)
    target = torch.randint(0, 5, (2, 64, 64))
    nn.functional.cross_entropy(out, target).backward()
    for p in (next(model.parameters()), model.head.classifier.weight, model.head.detail[0][0].weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_position_embedding_is_interpolated_for_another_frame_size():
    torch.manual_seed(0)
    model = tiny("vit_seg_tiny").eval()  # trained grid: 64 / 16 = 4 x 4
    enc = model.encoder
    assert enc.position_embedding(4, 4) is enc.pos_embed  # the training grid is used as is
    resized = enc.position_embedding(6, 8)
    assert resized.shape == (1, 6 * 8 + 1, 32)
    torch.testing.assert_close(resized[:, 0], enc.pos_embed[:, 0])  # the class token's embedding is kept
    with torch.no_grad():  # bicubic interpolation keeps a constant field constant
        enc.pos_embed[:, 1:] = 0.5
    torch.testing.assert_close(enc.position_embedding(6, 8)[:, 1:], torch.full((1, 48, 32), 0.5))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 128)).shape == (1, 11, 96, 128)
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        model(torch.randn(1, 3, 64, 72))


def test_resnet_head_handles_sizes_off_the_stride():
    model = tiny("resnet18_seg", img_size=96).eval()  # ImageNet stem above 64 px: stride 32
    with torch.no_grad():
        assert model(torch.randn(1, 3, 100, 132)).shape == (1, 11, 100, 132)


@pytest.mark.parametrize("name", ["vit_seg_tiny", "resnet18_seg"])
def test_onnx_export_with_a_dynamic_batch_matches_eager(tmp_path, name):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = tiny(name).eval()
    path = tmp_path / "seg.onnx"
    torch.onnx.export(model, (torch.randn(2, 3, 64, 64),), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, dynamo=True, external_data=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 64, 64)  # another batch size than the one exported with
    got = session.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4, rtol=1e-4)


def _seg_ckpt(**overrides) -> dict:
    ckpt = {"arch": "vit_seg_tiny", "task": "segmentation", "model_args": {"img_size": 64, "num_classes": 3},
            "state_dict": {}, "classes": ["background", "a", "b"], "metrics": {}, "recipe": {},
            "preprocess": make_preprocess(64, 3, [0.5] * 3, [0.25] * 3, crop=False)}
    ckpt.update(overrides)
    return ckpt


def test_checkpoint_task_contract():
    validate_checkpoint(_seg_ckpt())
    legacy = _seg_ckpt(classes=["a", "b"], preprocess=make_preprocess(28, 1, [0.3], [0.3]))
    del legacy["task"]  # no task key: a classifier, as every checkpoint written before segmentation
    validate_checkpoint(legacy)
    with pytest.raises(CheckpointError, match="task must be one of"):
        validate_checkpoint(_seg_ckpt(task="detection"))
    with pytest.raises(CheckpointError, match="background"):
        validate_checkpoint(_seg_ckpt(classes=["a", "b"]))
    with pytest.raises(CheckpointError, match="crop: false"):
        validate_checkpoint(_seg_ckpt(preprocess=make_preprocess(64, 3, [0.5] * 3, [0.25] * 3)))


def test_crop_false_resizes_the_whole_frame():
    frame = torch.zeros(3, 60, 120, dtype=torch.uint8)
    frame[:, :, :10] = 255  # a bright strip at the left edge: a centre crop would cut it away
    whole = make_preprocess(32, 3, [0.0] * 3, [1.0] * 3, crop=False)
    cropped = make_preprocess(32, 3, [0.0] * 3, [1.0] * 3)
    assert eval_batch([frame], whole).shape == eval_batch([frame], cropped).shape == (1, 3, 32, 32)
    assert eval_batch([frame], whole)[0, :, :, 0].min() > 0.9
    assert eval_batch([frame], cropped)[0, :, :, 0].max() < 0.1
