"""Model zoo: every registered model trains a step, the registry's rules, the blocks' defining properties,
torchvision compatibility and the checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from training.checkpoint import build_model, load_checkpoint, save_checkpoint
from training.models import get_model, list_models, register_model
from training.models.layers import CBAM, NonLocalBlock, SEModule
from training.models.resnet import BasicBlock, Bottleneck, ResNet
from training.presets import make_preprocess


def small_kwargs(name: str) -> dict:
    """Shrunk widths/depths so the whole zoo trains a step in seconds; structure is unchanged."""
    if "vit" in name:
        return dict(dim=48, depth=2, mlp_dim=96) | (dict(backbone_width=8) if name.startswith("hybrid") else {})
    if "resnet" in name or name.startswith("plain"):
        return dict(width=8)
    return {}


def first_layer(model: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


@pytest.mark.parametrize("in_channels,img_size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("name", list_models("classification"))  # segmentation: tests/test_seg_models.py
def test_every_model_trains_a_step(name: str, in_channels: int, img_size: int) -> None:
    torch.manual_seed(0)
    model = get_model(name, num_classes=7, in_channels=in_channels, img_size=img_size, **small_kwargs(name))
    x = torch.randn(2, in_channels, img_size, img_size)
    out = model(x)
    assert out.shape == (2, 7)
    nn.functional.cross_entropy(out, torch.tensor([0, 6])).backward()
    grad = first_layer(model).weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_default_size_builds_full_width() -> None:
    model = get_model("resnet18")  # defaults: 10 classes, 1 channel, 28 px
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_duplicate_registration_is_an_error() -> None:
    def resnet18(**kwargs):  # same name as the real builder
        return nn.Identity()

    with pytest.raises(ValueError, match="already registered"):
        register_model(resnet18)
    assert isinstance(get_model("resnet18", width=8), ResNet)  # the original builder is still registered


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(KeyError, match="resnet18") as err:
        get_model("resnet9000")
    assert "vit_tiny" in str(err.value)


def test_unknown_kwarg_is_an_error() -> None:
    with pytest.raises(TypeError):
        get_model("resnet18", widht=8)
    with pytest.raises(TypeError):
        get_model("vit_tiny", detph=2)


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_plain_block_has_no_identity_path(block: type[nn.Module]) -> None:
    torch.manual_seed(0)
    res, plain = block(32, 32 // block.expansion).eval(), block(32, 32 // block.expansion, skip=False).eval()
    plain.load_state_dict(res.state_dict())
    x = torch.randn(2, 32, 8, 8)
    assert not torch.allclose(res(x), plain(x))
    # silence the residual branch: a residual block passes relu(x) through, a plain block passes nothing
    for b in (res, plain):
        nn.init.zeros_(b.last_bn().weight)
        nn.init.zeros_(b.last_bn().bias)
    assert torch.equal(res(x), torch.relu(x))
    assert torch.equal(plain(x), torch.zeros_like(x))


def test_plain_nets_have_no_shortcuts_and_no_zero_init() -> None:
    plain, res = get_model("plain18", width=8), get_model("resnet18", width=8)
    assert not any("downsample" in k for k in plain.state_dict())
    assert any("downsample" in k for k in res.state_dict())
    assert all(m.last_bn().weight.abs().sum() > 0 for m in plain.modules() if isinstance(m, BasicBlock))
    assert all(m.last_bn().weight.abs().sum() == 0 for m in res.modules() if isinstance(m, BasicBlock))
    with pytest.raises(ValueError, match="zero_init_residual"):
        get_model("plain18", zero_init_residual=True)


def test_non_local_block_starts_as_identity_and_learns() -> None:
    torch.manual_seed(0)
    block = NonLocalBlock(16)
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    y = block(x)
    assert torch.equal(y, x)
    y.square().sum().backward()
    assert block.bn.weight.grad.abs().sum() > 0  # the gate can open


def test_selfattn_resnet_equals_resnet_at_init() -> None:
    torch.manual_seed(0)
    base, attn = get_model("resnet18", width=8).eval(), get_model("resnet18_selfattn", width=8).eval()
    missing = attn.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("non_local.") for k in missing)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(attn(x), base(x))


@pytest.mark.parametrize("gate", [SEModule, CBAM])
def test_attention_gates_keep_shape_and_rescale(gate: type[nn.Module]) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 32, 6, 6)
    y = gate(32).eval()(x)
    assert y.shape == x.shape
    assert not torch.allclose(y, x)
    assert (y.abs() <= x.abs() + 1e-6).all()  # a sigmoid gate only scales down


def test_attention_is_a_block_option() -> None:
    kinds = {name: {type(m.attn) for m in get_model(name, width=8).modules() if isinstance(m, BasicBlock)}
             for name in ("resnet18", "se_resnet18", "cbam_resnet18")}
    assert kinds == {"resnet18": {type(None)}, "se_resnet18": {SEModule}, "cbam_resnet18": {CBAM}}


def test_stem_suits_input_size() -> None:
    small, large = get_model("resnet18", img_size=32, width=8), get_model("resnet18", img_size=224, width=8)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity) and small.feature_size == 4
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, nn.MaxPool2d) and large.feature_size == 7


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_224px_state_dict_loads_into_torchvision(name: str) -> None:
    torch.manual_seed(0)
    ours = get_model(name, num_classes=5, in_channels=3, img_size=224).eval()
    theirs = getattr(torchvision.models, name)(num_classes=5).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x))


def test_vit_tokens_and_patch_size() -> None:
    assert get_model("vit_tiny", depth=1).pos_embed.shape == (1, 7 * 7 + 1, 192)  # 28 px / patch 4
    assert get_model("vit_tiny", depth=1, img_size=224, in_channels=3).pos_embed.shape == (1, 14 * 14 + 1, 192)
    assert get_model("vit_small", depth=1, patch_size=7).pos_embed.shape == (1, 4 * 4 + 1, 384)
    assert get_model("hybrid_vit", depth=1, backbone_width=8).pos_embed.shape == (1, 7 * 7 + 1, 192)
    with pytest.raises(ValueError, match="multiple"):
        get_model("vit_tiny", depth=1, patch_size=5)


def test_vit_attention_matches_reference() -> None:
    torch.manual_seed(0)
    vit = get_model("vit_tiny", dim=24, depth=1, mlp_dim=48).eval()
    attn = vit.blocks[0].attn
    ref = nn.MultiheadAttention(24, 3, batch_first=True).eval()
    ref.in_proj_weight.data.copy_(attn.qkv.weight)
    ref.in_proj_bias.data.copy_(attn.qkv.bias)
    ref.out_proj.weight.data.copy_(attn.proj.weight)
    ref.out_proj.bias.data.copy_(attn.proj.bias)
    x = torch.randn(2, 10, 24)
    torch.testing.assert_close(attn(x), ref(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("name,extra", [("se_resnet18", dict(width=8)),
                                        ("vit_tiny", dict(dim=48, depth=2, mlp_dim=96)),
                                        ("hybrid_vit", dict(dim=48, depth=1, backbone_width=8))])
def test_checkpoint_round_trip(tmp_path, name: str, extra: dict) -> None:
    torch.manual_seed(0)
    model_args = dict(num_classes=4, in_channels=1, img_size=28, **extra)
    model = get_model(name, **model_args)
    model.train()(torch.randn(8, 1, 28, 28))  # move BN running stats off their defaults
    ckpt = {"arch": name, "model_args": model_args, "state_dict": model.state_dict(),
            "classes": ["a", "b", "c", "d"], "preprocess": make_preprocess(28, 1, [0.286], [0.353]),
            "metrics": {}, "recipe": {}}
    path = save_checkpoint(ckpt, tmp_path / f"{name}.pt")
    rebuilt = build_model(load_checkpoint(path))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))
