"""The experiments: CIFAR-style ResNets and their plain twins, attention placement, the gradient-norm recorder,
resumable runs, and both drivers end to end on tiny settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from training.experiments.attention import paired, variants
from training.experiments.depth import compare_training_error, verdicts
from training.experiments.runs import Run
from training.gradnorm import GradNormRecorder, weighted_layers
from training.models import get_model
from training.models.layers import CBAM, NonLocalBlock, SEModule
from training.models.resnet import BasicBlock, PadShortcut
from training.recipe import Recipe

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist is not installed")
TINY = {"width": 4}  # same depth and structure, a fraction of the compute


@pytest.mark.parametrize("depth", [20, 56, 110])
def test_cifar_nets_have_6n_plus_2_weighted_layers_and_twins_share_their_weights(depth: int) -> None:
    for in_channels, size in ((1, 28), (3, 32)):
        res, plain = (get_model(f"{family}{depth}", in_channels=in_channels, img_size=size, **TINY).eval()
                      for family in ("resnet", "plain"))
        for model in (res, plain):
            assert len(weighted_layers(model)) == depth  # convs + the classifier, counted from the modules
            assert [len(getattr(model, s)) for s in model.stage_names] == [(depth - 2) // 6] * 3
            x = torch.zeros(2, in_channels, size, size)
            assert model.forward_features(x).shape == (2, 16, size // 4, size // 4)  # 3 stages: /1, /2, /4
            assert model(x).shape == (2, 10)
    # option-A shortcuts carry no weights and the residual branch is not zero-initialised: with one seed a residual
    # net and its plain twin start from the very same weights; only the identity add differs
    twins = []
    for family in ("resnet", "plain"):
        torch.manual_seed(0)
        twins.append(get_model(f"{family}{depth}", **TINY).state_dict())
    assert twins[0].keys() == twins[1].keys() and all(torch.equal(twins[0][k], twins[1][k]) for k in twins[0])


def test_cifar_nets_match_the_papers_sizes() -> None:
    """He et al. table 6 (CIFAR-10, 3 x 32 x 32): 0.27M, 0.85M and 1.7M parameters."""
    sizes = {d: sum(p.numel() for p in get_model(f"resnet{d}", in_channels=3, img_size=32).parameters())
             for d in (20, 56, 110)}
    assert sizes[20] == pytest.approx(0.27e6, rel=0.02)
    assert sizes[56] == pytest.approx(0.85e6, rel=0.02)
    assert sizes[110] == pytest.approx(1.7e6, rel=0.03)


@pytest.mark.parametrize("depth", [20, 110])
def test_plain_twins_add_no_identity(depth: int) -> None:
    """Hooks on every block: a plain block's output is relu(its branch), a residual block's is
    relu(branch + shortcut(input)) and differs from relu(branch)."""
    torch.manual_seed(0)
    for name, skip in ((f"plain{depth}", False), (f"resnet{depth}", True)):
        model = get_model(name, **TINY).eval()
        seen = []

        def hook(block, inputs, output, seen=seen):
            branch = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(inputs[0])))))
            if not block.skip:
                seen.append((torch.allclose(output, torch.relu(branch)), False))
                return
            shortcut = inputs[0] if block.downsample is None else block.downsample(inputs[0])
            seen.append((torch.allclose(output, torch.relu(branch)),
                         torch.allclose(output, torch.relu(branch + shortcut), atol=1e-6)))

        blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
        for b in blocks:
            b.register_forward_hook(hook)
        model(torch.randn(2, 1, 28, 28))
        assert len(seen) == len(blocks) == 3 * (depth - 2) // 6
        assert all(plain_like != skip and residual_like == skip for plain_like, residual_like in seen)


def test_pad_shortcut_subsamples_and_zero_pads() -> None:
    x = torch.randn(2, 4, 6, 6)
    y = PadShortcut(8, 2)(x)
    assert y.shape == (2, 8, 3, 3)
    assert torch.equal(y[:, :4], x[:, :, ::2, ::2]) and torch.equal(y[:, 4:], torch.zeros(2, 4, 3, 3))
    assert not list(PadShortcut(8, 2).parameters())
    with pytest.raises(ValueError, match="shortcut"):
        get_model("resnet20", shortcut="B")


def test_attention_goes_only_where_placed() -> None:
    def stages_with(model: nn.Module, kind: type[nn.Module]) -> list[int]:
        return [i + 1 for i, s in enumerate(model.stage_names) if any(isinstance(m, kind)
                                                                      for m in getattr(model, s).modules())]

    assert stages_with(get_model("resnet20", attn="se", attn_stages=[3], **TINY), SEModule) == [3]
    assert stages_with(get_model("resnet20", attn="cbam", attn_stages=[2, 3], **TINY), CBAM) == [2, 3]
    assert stages_with(get_model("resnet20", attn="se", **TINY), SEModule) == [1, 2, 3]
    nl = get_model("resnet20", non_local_stages=[1, 3], **TINY)
    assert stages_with(nl, NonLocalBlock) == [1, 3] and isinstance(nl.layer3[-1], NonLocalBlock)
    with pytest.raises(ValueError, match="stages 1..3"):
        get_model("resnet20", attn="se", attn_stages=[4])
    # a freshly placed non-local block is the identity: same function as the backbone with the same weights
    torch.manual_seed(0)
    base = get_model("resnet20", **TINY).eval()
    nl.load_state_dict(base.state_dict(), strict=False)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(nl.eval()(x), base(x))


def test_recorder_records_each_layers_gradient_norm() -> None:
    torch.manual_seed(0)
    model = get_model("plain20", **TINY)
    recorder = GradNormRecorder(every=2)
    for step in range(5):
        model.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3])).backward()
        recorder(model, step)
    assert [r["step"] for r in recorder.records] == [0, 2, 4]
    assert len(recorder.layers) == 20 and recorder.layers[0] == "conv1" and recorder.layers[-1] == "fc"
    expected = [m.weight.grad.norm().item() for _, m in weighted_layers(model)]
    assert recorder.records[-1]["norms"] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="after backward"):
        recorder(get_model("plain20", **TINY), 6)


def _tiny_recipe(**kw) -> Recipe:
    base = dict(arch="plain20", dataset="fashion_mnist", epochs=2, batch_size=32, lr=0.05, warmup_epochs=0.5,
                limit=256, crop_padding=0, hflip=False, model_args=dict(TINY), threads=1)
    return Recipe(**(base | kw))


@needs_fmnist
def test_run_records_gradient_norms_and_resumes_without_gaps_or_repeats(tmp_path) -> None:
    run = Run("plain20", _tiny_recipe(), tmp_path, gradnorm_every=3)
    first = run.advance(1, progress=False)
    assert first["epochs_done"] == 1 and (tmp_path / "plain20-e1.pt").is_file()
    again = Run("plain20", _tiny_recipe(), tmp_path, gradnorm_every=3)  # a new process picks it up
    record = again.advance(progress=False)
    steps = [r["step"] for r in record["gradnorms"]["records"]]
    assert record["steps"] == 16 and steps == list(range(0, 16, 3))  # 256 images / batch 32 x 2 epochs
    assert len(record["gradnorms"]["layers"]) == 20
    assert all(math.isfinite(n) and n > 0 for r in record["gradnorms"]["records"] for n in r["norms"])
    assert [p.name for p in tmp_path.glob("*.pt")] == ["plain20-e2.pt"]  # the epoch-1 checkpoint is gone
    assert again.done() and again.advance(progress=False)["wall_s"] == record["wall_s"]  # nothing retrained
    with pytest.raises(ValueError, match="trained differently.*lr"):
        Run("plain20", _tiny_recipe(lr=0.1), tmp_path, gradnorm_every=3).advance(progress=False)
    # a record made before a recipe key existed still matches while that key keeps its default
    saved = json.loads(again.path.read_text())
    del saved["recipe"]["freeze"], saved["recipe"]["data_args"]  # a plain default and a factory default ({})
    again.path.write_text(json.dumps(saved))
    assert again.load()["epochs_done"] == 2
    with pytest.raises(ValueError, match="trained differently.*freeze"):
        Run("plain20", _tiny_recipe(freeze="linear_probe"), tmp_path, gradnorm_every=3).load()


@needs_fmnist
def test_depth_driver_end_to_end(tmp_path) -> None:
    from training.experiments.depth import depth_experiment

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "training.md").write_text("# T\n<!-- depth_cpu:begin -->\nold\n<!-- depth_cpu:end -->\nrest\n")
    overrides = {"limit": 256, "epochs": 2, "batch_size": 32, "warmup_epochs": 0.25, "model_args": TINY}
    s = depth_experiment("depth_cpu", tmp_path / "out", nets=("plain20", "resnet20"), overrides=overrides,
                         gradnorm_every=2, train_eval_images=128, docs_dir=docs, progress=False)
    assert s["complete"] and set(s["nets"]) == {"plain20", "resnet20"}
    for net in s["nets"].values():
        assert net["layers"] == 20 and len(net["history"]) == 2 and net["test_err"] is not None
        assert 0 <= net["history"][-1]["train_err"] <= 1
        assert [p["epoch"] for p in net["gradnorms"]["per_epoch"]] == [1, 2]
        assert len(net["gradnorms"]["per_epoch"][0]["mean"]) == 20
    assert s["nets"]["resnet20"]["skip"] and not s["nets"]["plain20"]["skip"]
    assert json.loads((docs / "experiments" / "depth_cpu.json").read_text())["nets"].keys() == s["nets"].keys()
    assert (docs / "experiments" / "depth_cpu_gradnorms.png").stat().st_size > 0
    page = (docs / "training.md").read_text()
    assert "old" not in page and "| plain20 | no | 20 |" in page and s["verdicts"][0] in page
    assert page.startswith("# T\n<!-- depth_cpu:begin -->\n") and page.endswith("<!-- depth_cpu:end -->\nrest\n")


def _net(errs: list[float]) -> dict:
    return {"skip": True, "history": [{"train_err": e} for e in errs], "epochs_done": 1,
            "gradnorms": {"per_epoch": [{"epoch": 1, "mean": [100.0, 1.0, 1.0, 1.0, 5.0]}]}}  # 4 convs + fc


def test_depth_verdicts_come_from_the_curves() -> None:
    assert compare_training_error(_net([0.5, 0.4, 0.3, 0.2]), _net([0.5, 0.3, 0.2, 0.1])) == "higher"
    assert compare_training_error(_net([0.5, 0.3, 0.1, 0.05]), _net([0.5, 0.3, 0.2, 0.1])) == "lower"
    assert compare_training_error(_net([0.5, 0.3, 0.1, 0.2]), _net([0.5, 0.3, 0.2, 0.1])) == "not separated"
    nets = {"plain20": _net([0.3, 0.2]), "plain56": _net([0.4, 0.3]), "resnet20": _net([0.3, 0.2]),
            "resnet56": _net([0.2, 0.1]), "resnet110": _net([0.3, 0.25])}
    lines = verdicts({"nets": nets})
    assert "plain56's training error is higher than plain20's" in lines[0] and "deeper is worse" in lines[0]
    assert any("partly reproduced here (2 of 3" in line for line in lines)
    plain56 = next(line for line in lines if line.startswith("plain56: "))
    assert "grows 100x (exploding towards the input) in epoch 1" in plain56


def test_paired_gain_and_its_verdict() -> None:
    base = {0: 0.90, 1: 0.91, 2: 0.92}
    noisy = paired({0: 0.91, 1: 0.93, 2: 0.95}, base)  # gains 1, 2, 3 pp: t = 3.46 < 4.30 with 2 df
    assert noisy["gain_mean"] == pytest.approx(0.02) and noisy["t"] == pytest.approx(2 * math.sqrt(3))
    assert noisy["verdict"] == "within noise" and noisy["t_crit"] == 4.303
    assert paired({0: 0.92, 1: 0.931, 2: 0.939}, base)["verdict"] == "gain"
    assert paired({0: 0.88, 1: 0.889, 2: 0.901}, base)["verdict"] == "loss"
    assert paired({0: 0.95}, base)["verdict"] == "too few seeds"


def test_variants_cover_each_stage_the_last_stages_and_everywhere() -> None:
    v = variants(("se", "non_local"), ("stage1", "stages2-3", "all"))
    assert list(v) == ["baseline", "se_stage1", "se_stages2-3", "se_all", "non_local_stage1", "non_local_stages2-3",
                       "non_local_all"]
    assert v["se_stages2-3"]["model_args"] == {"attn": "se", "attn_stages": [2, 3]}
    assert v["non_local_all"]["model_args"] == {"non_local_stages": [1, 2, 3]}
    with pytest.raises(ValueError, match="unknown kind"):
        variants(("eca",))
    assert list(variants(("se", "non_local"), ("stage1", "all"), skip=("non_local_stage1",))) == [
        "baseline", "se_stage1", "se_all", "non_local_all"]
    with pytest.raises(ValueError, match="non_local_stage9"):
        variants(skip=("non_local_stage9",))


@needs_fmnist
def test_attention_driver_two_variants_one_epoch(tmp_path) -> None:
    from training.experiments.attention import attention_experiment

    overrides = {"limit": 256, "epochs": 1, "batch_size": 32, "warmup_epochs": 0.25, "model_args": TINY}
    kw = dict(kinds=("se",), placements=("stage3",), seeds=(0, 1), overrides=overrides, progress=False)
    s = attention_experiment("attention_cpu", tmp_path, latency=True, **kw)
    assert s["complete"] and s["runs_done"] == 4 and list(s["variants"]) == ["baseline", "se_stage3"]
    base, se = s["variants"]["baseline"], s["variants"]["se_stage3"]
    assert set(base["test_acc"]) == {"0", "1"} and 0 <= base["acc_mean"] <= 1 and base["acc_std"] is not None
    assert se["params"] > base["params"] and se["flops"] > base["flops"]
    assert se["latency_ms"] > 0 and s["latency"]["load_before"] and base["latency_x"] == 1.0
    gain = se["vs_baseline"]
    diffs = [se["test_acc"][k] - base["test_acc"][k] for k in ("0", "1")]
    assert gain["n"] == 2 and gain["gain_mean"] == pytest.approx(sum(diffs) / 2)
    assert gain["verdict"] in ("gain", "loss", "within noise")
    assert any("se is best in stage3" in v for v in s["verdicts"])
    record = json.loads((tmp_path / "runs" / "se_stage3-seed1.json").read_text())
    assert record["model_args"]["attn_stages"] == [3] and record["recipe"]["seed"] == 1
    # resumable: a second call trains nothing and keeps the latency figures
    again = attention_experiment("attention_cpu", tmp_path, **kw)
    assert again["variants"]["se_stage3"]["test_acc"] == se["test_acc"] and again["latency"] == s["latency"]
    assert (tmp_path / "attention_cpu.png").stat().st_size > 0
