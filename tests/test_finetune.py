"""Starting weights (torchvision-format state dicts and our checkpoints), head replacement, freeze policies
(which parameters get gradients, BatchNorm modes), per-group learning rates, and the CLI's errors for bad
starting weights."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision
import yaml

from tests.datagen import write_imagefolder
from training.checkpoint import load_checkpoint, save_checkpoint
from training.finetune import (
    FreezePolicy,
    WeightsError,
    init_weights,
    load_weights,
    param_groups,
    read_state_dict,
    sha256_of,
)
from training.models import get_model
from training.recipe import Recipe
from training.train import train

ROOT = Path(__file__).resolve().parents[1]


def torchvision_file(folder: Path, model: nn.Module, name: str) -> Path:
    """A state-dict file named the torchvision way: <name>-<first 8 hex digits of its sha256>.pth."""
    tmp = folder / f"{name}.tmp"
    torch.save(model.state_dict(), tmp)
    path = folder / f"{name}-{sha256_of(tmp)[:8]}.pth"
    tmp.rename(path)
    return path


def test_torchvision_resnet50_loads_and_computes_the_same(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet50().eval()
    with torch.no_grad():  # non-trivial BN statistics, so a BN mapped to the wrong place would show
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    path = torchvision_file(tmp_path, tv, "resnet50")
    state, digest = read_state_dict(path)
    assert path.name == f"resnet50-{digest[:8]}.pth" and len(state) == len(tv.state_dict())
    ours = get_model("resnet50", num_classes=5, in_channels=3, img_size=224)
    fc_before = ours.fc.weight.clone()
    report = load_weights(ours, state, source=str(path))
    assert report["head"] == "new" and report["tensors"] == len(state) - 2
    assert ours.fc.weight.shape == (5, 2048) and torch.equal(ours.fc.weight, fc_before)
    # Same names, same tensors, same computation: torchvision's network with our new head gives our logits.
    tv.fc = nn.Linear(2048, 5)
    tv.fc.load_state_dict(ours.fc.state_dict())
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), tv(x), rtol=1e-4, atol=1e-5)


def test_a_name_whose_hash_prefix_does_not_match_is_refused(tmp_path):
    path = tmp_path / "resnet18-deadbeef.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(WeightsError, match="name says sha256 deadbeef"):
        read_state_dict(path)
    good = path.with_name(f"resnet18-{sha256_of(path)[:8]}.pth")
    shutil.copy(path, good)
    assert set(read_state_dict(good)[0]) == {"fc.weight"}


def test_wrappers_and_ddp_prefix_are_accepted(tmp_path):
    model = get_model("resnet18", num_classes=3, in_channels=3, img_size=32, width=8)
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, tmp_path / "w.pth")
    fresh = get_model("resnet18", num_classes=3, in_channels=3, img_size=32, width=8)
    assert load_weights(fresh, read_state_dict(tmp_path / "w.pth")[0], source="w")["head"] == "loaded"
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_an_old_file_without_batchnorm_step_counters_loads():
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if "num_batches_tracked" not in k}
    model = get_model("resnet18", num_classes=1000, in_channels=3, img_size=224)
    assert load_weights(model, state, source="resnet18-5c106cde.pth")["head"] == "loaded"
    assert torch.equal(model.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])


def test_weights_of_another_architecture_are_listed():
    state = torchvision.models.resnet18().state_dict()
    with pytest.raises(WeightsError) as e:
        load_weights(get_model("resnet50", num_classes=5, in_channels=3, img_size=224), state, source="r18.pth")
    msg = str(e.value)
    assert "missing (layer1.0.conv3.weight" in msg and "with another shape" in msg and "another architecture" in msg


def test_head_keep_refuses_a_class_mismatch():
    state = get_model("resnet18", num_classes=10, in_channels=3, img_size=32, width=8).state_dict()
    model = get_model("resnet18", num_classes=4, in_channels=3, img_size=32, width=8)
    with pytest.raises(WeightsError, match="head/class mismatch: src has a 10-class head"):
        load_weights(model, state, source="src", head="keep")
    assert load_weights(model, state, source="src", head="auto")["head"] == "new"


# ---- a classifier's weights into a segmentation model's backbone ----

FMNIST_CLASSES = [f"c{i}" for i in range(10)]
SEG_CLASSES = ["background", *FMNIST_CLASSES]


def _classifier_file(folder: Path, arch: str = "resnet18", **model_args) -> tuple[Path, nn.Module]:
    """One of our checkpoints holding a grey 28 px classifier (random weights, BN statistics made non-trivial)."""
    torch.manual_seed(1)
    args = {"num_classes": 10, "in_channels": 1, "img_size": 28, "width": 8, **model_args}
    model = get_model(arch, **args)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    pre = {"size": 28, "resize": 28, "channels": 1, "mean": [0.29], "std": [0.35], "interpolation": "bilinear"}
    path = folder / f"{arch}-cls.pt"
    save_checkpoint({"arch": arch, "model_args": args, "state_dict": model.state_dict(), "classes": FMNIST_CLASSES,
                     "preprocess": pre, "metrics": {}, "recipe": {}}, path)
    return path, model.eval()


def _seg_model(width: int = 8) -> nn.Module:
    torch.manual_seed(2)
    return get_model("resnet18_seg", num_classes=11, in_channels=3, img_size=32, width=width, head_width=8,
                     detail_width=8)


def _seg_recipe(path: Path, **kw) -> Recipe:
    return Recipe(arch="resnet18_seg", task="segmentation", dataset="moving_fmnist", img_size=32,
                  init_from=str(path), **kw)


def test_a_classifier_checkpoint_starts_a_segmentation_backbone(tmp_path):
    path, classifier = _classifier_file(tmp_path)
    model = _seg_model()
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    report = init_weights(model, _seg_recipe(path), SEG_CLASSES)
    assert report["backbone"] == "resnet18" and report["head"] == "new" and report["classes"] == FMNIST_CLASSES
    assert report["adapted"] == ["conv1.weight 1 -> 3 channels"] and report["sha256"] == sha256_of(path)
    theirs = classifier.state_dict()
    for k, v in model.backbone.state_dict().items():
        if k != "conv1.weight":
            assert torch.equal(v, theirs[k]), k  # weights and BN statistics arrive
    assert all(torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())  # head stays fresh
    # a grey frame as RGB (three equal channels) gives the features the classifier computed on the grey original
    grey = torch.randn(2, 1, 32, 32)
    model.eval()
    with torch.no_grad():
        want = classifier.forward_features(grey)
        got = model.backbone.forward_features(grey.expand(-1, 3, -1, -1))
    assert want.abs().mean() > 0.01 and torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("arch, args, recipe, message", [
    ("resnet18", {"width": 16}, {}, "does not fit this ResNetSeg's backbone: .*with another shape .*conv1.weight"),
    ("resnet18", {"img_size": 96}, {}, r"conv1.weight \(8, 1, 7, 7\) vs \(8, 3, 3, 3\).*3x3 stem"),
    ("resnet34", {}, {}, "holds a resnet34, the recipe trains a resnet18_seg .*or a resnet18 classifier for its "
                         "backbone"),
    ("resnet18", {}, {"head": "keep"}, "head: keep needs a ResNetSeg checkpoint"),
])
def test_a_classifier_that_does_not_fit_the_backbone_is_refused(tmp_path, arch, args, recipe, message):
    path, _ = _classifier_file(tmp_path, arch, **args)
    model = _seg_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError, match=message):
        init_weights(model, _seg_recipe(path, **recipe), SEG_CLASSES)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded


def test_a_segmentation_head_trains_at_the_full_lr_beside_a_slower_backbone():
    model = _seg_model()
    groups = param_groups(model, 0.05, lr=1e-3, backbone_lr_factor=0.1)
    head = {id(p) for p in model.head.parameters()}
    for g in groups:
        assert all((id(p) in head) == (g["lr"] == pytest.approx(1e-3)) for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


# ---- freeze policies ----

def _tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return get_model("resnet18", num_classes=3, in_channels=3, img_size=32, width=8)


def _with_grad(model: nn.Module) -> set[str]:
    """Top-level module names whose parameters received a gradient from one training step."""
    model.zero_grad(set_to_none=True)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    return {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("policy, epoch, trained", [
    ("none", 0, {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}),
    ("linear_probe", 5, {"fc"}),
    ("layer4_head", 5, {"layer4", "fc"}),
    ("gradual", 0, {"fc"}),
    ("gradual", 2, {"layer3", "layer4", "fc"}),  # unfreeze_every 1: one more stage per epoch, from the top
    ("gradual", 4, {"layer1", "layer2", "layer3", "layer4", "fc"}),
    ("gradual", 5, {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}),
])
def test_freeze_policy_decides_which_parameters_get_gradients(policy, epoch, trained):
    model = _tiny_resnet()
    FreezePolicy(model, policy).start_epoch(model, epoch)
    assert _with_grad(model) == trained


def test_frozen_batchnorm_stays_in_eval_mode_and_keeps_its_statistics():
    model = _tiny_resnet()
    policy = FreezePolicy(model, "layer4_head")
    assert policy.start_epoch(model, 0) and not policy.start_epoch(model, 1)  # the set changes once only
    assert model.training and not model.bn1.training and not model.layer3[0].bn1.training
    assert model.layer4[0].bn1.training
    frozen, live = model.layer3[0].bn1.running_mean.clone(), model.layer4[0].bn1.running_mean.clone()
    model(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert torch.equal(model.layer3[0].bn1.running_mean, frozen)
    assert not torch.equal(model.layer4[0].bn1.running_mean, live)


def test_gradual_unfreezing_every_two_epochs_and_vit_limits():
    model = _tiny_resnet()
    policy = FreezePolicy(model, "gradual", unfreeze_every=2)
    assert [len(policy.trainable(e)) for e in range(4)] == [1, 1, 2, 2]
    vit = get_model("vit_tiny", num_classes=3, in_channels=3, img_size=32, depth=2)
    FreezePolicy(vit, "linear_probe").start_epoch(vit, 0)
    assert {n for n, p in vit.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    with pytest.raises(WeightsError, match="layer4_head needs a ResNet"):
        FreezePolicy(vit, "layer4_head")


def test_backbone_learning_rate_is_a_factor_of_the_head_lr():
    model = _tiny_resnet()
    FreezePolicy(model, "layer4_head").start_epoch(model, 0)
    groups = param_groups(model, 5e-4, lr=0.1, backbone_lr_factor=0.1)
    opt = torch.optim.SGD(groups, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    opt.step()
    sched.step()
    head = {id(p) for p in model.fc.parameters()}
    for g in opt.param_groups:
        is_head = bool(g["params"]) and id(g["params"][0]) in head
        assert g["lr"] == pytest.approx(0.05 if is_head else 0.005)
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(p) for n, p in model.named_parameters() if n.startswith(("layer4.", "fc."))}
    every = param_groups(model, 5e-4, lr=0.1, backbone_lr_factor=0.1, include_frozen=True)
    assert sum(len(g["params"]) for g in every) == len(list(model.parameters()))


# ---- through the training loop ----

def _folder_recipe(root: Path, **kw) -> Recipe:
    base = dict(arch="resnet18", dataset="imagefolder", data_root=str(root), img_size=32, epochs=1, batch_size=8,
                optimizer="sgd", lr=0.05, warmup_epochs=0.5, model_args={"width": 8}, color_jitter=0.0)
    return Recipe(**{**base, **kw})


def test_init_from_with_layer4_head_trains_only_layer4_and_a_new_head(tmp_path):
    write_imagefolder(tmp_path / "a", classes=("p", "q", "r"), per_class=8, size=(36, 36))
    write_imagefolder(tmp_path / "b", classes=("x", "y"), per_class=8, size=(36, 36))
    src = train(_folder_recipe(tmp_path / "a"), tmp_path / "a.pt", progress=False)
    ck = train(_folder_recipe(tmp_path / "b", init_from=str(tmp_path / "a.pt"), freeze="layer4_head",
                              backbone_lr_factor=0.1, epochs=2, ema_decay=0.9), tmp_path / "b.pt", progress=False)
    assert ck["init"]["head"] == "new" and ck["init"]["classes"] == ["p", "q", "r"]
    assert ck["classes"] == ["x", "y"] and ck["state_dict"]["fc.weight"].shape[0] == 2
    before = src["state_dict"]
    for after in (ck["state_dict"], ck["ema_state_dict"]):  # the EMA's recomputed BN statistics too
        for k, v in after.items():
            if k.startswith(("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")) and "num_batches" not in k:
                assert torch.equal(v, before[k]), f"{k} changed although frozen"  # BN statistics included
    after = ck["state_dict"]
    assert not torch.equal(after["layer4.0.conv1.weight"], before["layer4.0.conv1.weight"])
    assert not torch.equal(after["layer4.0.bn1.running_mean"], before["layer4.0.bn1.running_mean"])
    assert load_checkpoint(tmp_path / "b.pt")["recipe"]["freeze"] == "layer4_head"


# ---- the CLI: one clear line and exit code 2 ----

@pytest.fixture(scope="module")
def cli_case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune-cli")
    write_imagefolder(tmp / "flowers", classes=("daisy", "rose"), per_class=2, size=(72, 72))
    r18 = torchvision_file(tmp, torchvision.models.resnet18(), "resnet18")
    return tmp, r18


def _cli(tmp: Path, *args: str, **recipe) -> subprocess.CompletedProcess:
    values = dict(arch="resnet18", dataset="imagefolder", data_root=str(tmp / "flowers"), img_size=72, epochs=1,
                  batch_size=2, **recipe)
    (tmp / "r.yaml").write_text(yaml.safe_dump(values))
    return subprocess.run([sys.executable, "-m", "training", "train", "--recipe", str(tmp / "r.yaml"),
                           "--no-tensorboard", "--out", str(tmp / "out.pt"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case, message", [
    ("missing", "weights file not found: /nonexistent/resnet50-11ad3fa6.pth"),
    ("other_arch", "does not fit this ResNet: 165 missing (layer1.0.conv3.weight"),
    ("head_keep", "head/class mismatch"),
    ("freeze", "unknown freeze policy 'layer5'; choose one of: none, linear_probe, layer4_head, gradual"),
])
def test_cli_bad_starting_weights_are_one_clear_line(cli_case, case, message):
    tmp, r18 = cli_case
    args = {"missing": ["--pretrained-weights", "/nonexistent/resnet50-11ad3fa6.pth"],
            "other_arch": ["--pretrained-weights", str(r18), "--arch", "resnet50"],
            "head_keep": ["--pretrained-weights", str(r18)],
            "freeze": ["--pretrained-weights", str(r18), "--freeze", "layer5"]}[case]
    p = _cli(tmp, *args, **({"head": "keep"} if case == "head_keep" else {}))
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and message in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp / "out.pt").exists()
