"""Segmentation through the same recipe, loop, checkpoint and eval as classification: recipe validation, the
training stream's determinism, a one-step run's self-describing checkpoint, and eval on generated and MP4 clips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.checkpoint import build_model, load_checkpoint
from training.clips import make_config, write_clips
from training.recipe import RecipeError, load_recipe, make_recipe
from training.seg_data import FrameStream
from training.train import train

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist is not installed")
SEG = dict(arch="vit_seg_tiny", task="segmentation", dataset="moving_fmnist")


@pytest.mark.parametrize("values, message", [
    ({**SEG, "dataset": "fashion_mnist"}, "task segmentation goes with dataset moving_fmnist"),
    ({"arch": "lenet5", "dataset": "moving_fmnist"}, "task segmentation goes with dataset moving_fmnist"),
    ({**SEG, "data_args": {"train_frame": 10}}, "unknown key.*train_frame.*known keys"),
    ({**SEG, "data_args": {"objects": [0, 2]}}, "objects must be"),
    ({**SEG, "mixup_alpha": 0.2}, "MixUp/CutMix are for classification"),
    ({"arch": "lenet5", "data_args": {"noise": 1}}, "data_args are moving_fmnist's knobs"),
    ({"arch": "lenet5", "dice_weight": 0.5}, "dice_weight is for segmentation"),
    ({**SEG, "task": "detection"}, "task must be"),
])
def test_segmentation_recipes_are_validated(values, message):
    with pytest.raises(RecipeError, match=message):
        make_recipe(values)


def test_a_model_of_the_other_task_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="lenet5 is a classification model; the recipe's task is segmentation"):
        train(make_recipe({**SEG, "arch": "lenet5"}), tmp_path / "x.pt", progress=False)


@needs_fmnist
def test_the_training_stream_is_fresh_each_epoch_and_reproducible():
    cfg = make_config({"train_frames": 8})
    a, b = FrameStream(cfg, 32, 4, seed=0), FrameStream(cfg, 32, 4, seed=0)
    first = [x for x, _ in a]
    b.set_epoch(0)
    assert all(torch.equal(x, y) for x, (y, _) in zip(first, b))  # epoch 0 again: the same frames (resume)
    second = [x for x, _ in a]
    assert len(first) == len(second) == 2 and not torch.equal(first[0], second[0])  # epoch 1: new frames


@needs_fmnist
def test_one_step_run_writes_a_self_describing_segmentation_checkpoint(tmp_path):
    from training.evaluate import run_eval

    recipe = make_recipe({**SEG, "img_size": 64, "epochs": 1, "batch_size": 4, "optimizer": "adamw", "lr": 1e-3,
                          "dice_weight": 0.5, "model_args": {"dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64,
                                                             "head_width": 16, "detail_width": 8},
                          "data_args": {"train_frames": 4, "val_frames": 4, "test_clips": 1, "clip_frames": 4}})
    train(recipe, tmp_path / "seg.pt", progress=False)
    ckpt = torch.load(tmp_path / "seg.pt", weights_only=True)
    assert ckpt["task"] == "segmentation" and ckpt["dataset"] == "moving_fmnist"
    assert ckpt["classes"][0] == "background" and len(ckpt["classes"]) == 11
    assert ckpt["preprocess"]["crop"] is False and ckpt["preprocess"]["size"] == 64
    assert ckpt["model_args"]["img_size"] == 64 and ckpt["model_args"]["num_classes"] == 11
    m = ckpt["metrics"]
    assert 0 <= m["test_miou"] <= 1 and 0 <= m["test_ap50"] <= 1 and len(m["test_per_class_iou"]) == 11
    assert len(m["history"]) == 1 and "val_miou" in m["history"][0]
    model = build_model(load_checkpoint(tmp_path / "seg.pt"))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 11, 64, 64)

    r = run_eval(tmp_path / "seg.pt", tmp_path / "report")
    assert r["task"] == "segmentation" and r["frames"] == 4 and "ap50" in r
    assert r["miou"] == pytest.approx(m["test_miou"], abs=1e-6)  # the same held-out clips as at the end of training
    assert (tmp_path / "report" / "overlays.png").stat().st_size > 5000
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["per_class_iou"]["background"] >= 0

    write_clips(tmp_path / "clips", 1, "test", frames=3, size=(48, 80))  # another frame size: resized to 64 x 64
    r = run_eval(tmp_path / "seg.pt", tmp_path / "report-mp4", clips_dir=tmp_path / "clips")
    assert r["frames"] == 3 and "MP4" in r["data"]


@needs_fmnist
def test_a_segmentation_run_starts_from_a_classifier_and_records_it(tmp_path):
    cls = make_recipe({"arch": "resnet18", "dataset": "fashion_mnist", "epochs": 1, "batch_size": 8, "limit": 16,
                       "model_args": {"width": 8}})
    classifier = train(cls, tmp_path / "cls.pt", progress=False)
    recipe = make_recipe({"arch": "resnet18_seg", "task": "segmentation", "dataset": "moving_fmnist", "img_size": 32,
                          "epochs": 1, "batch_size": 4, "optimizer": "adamw", "lr": 1e-3, "backbone_lr_factor": 0.1,
                          "init_from": str(tmp_path / "cls.pt"), "model_args": {"width": 8, "head_width": 8,
                                                                                "detail_width": 8},
                          "data_args": {"train_frames": 4, "val_frames": 4, "test_clips": 1, "clip_frames": 2}})
    ckpt = train(recipe, tmp_path / "seg.pt", progress=False)
    init = load_checkpoint(tmp_path / "seg.pt")["init"]
    assert init["source"] == str(tmp_path / "cls.pt") and init["backbone"] == "resnet18" and init["head"] == "new"
    assert init["adapted"] == ["conv1.weight 1 -> 3 channels"] and init["classes"] == classifier["classes"]
    # one AdamW step (about lr per weight) at a tenth of the LR: the backbone moved 1e-4 from the classifier's
    # weights, not the 1e-3 the head's LR would give
    before = classifier["state_dict"]["layer4.1.conv2.weight"]
    after = ckpt["state_dict"]["backbone.layer4.1.conv2.weight"]
    assert 0 < (after - before).abs().max() < 2e-4


def test_shipped_segmentation_recipes_name_segmentation_models():
    from training.models import model_task

    recipes = sorted((Path(__file__).resolve().parents[1] / "training" / "recipes").glob("*moving_fmnist*.yaml"))
    assert recipes
    for path in recipes:
        r = load_recipe(str(path))
        assert r.task == "segmentation" and model_task(r.arch) == "segmentation"
