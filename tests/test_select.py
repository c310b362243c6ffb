"""The model-selection report: the choices it derives, and the whole report built from small checkpoints that this
test trains (a CNN, a ViT and a QAT CNN)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.recipe import Recipe
from training.select import SelectError, Settings, measure
from training.select_report import best_under, fastest_reaching, front, points, transfer_lines, write
from training.train import train

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist is not installed")


def _pt(model: str, acc: float, ms: float) -> dict:
    return {"model": model, "runtime": "eager", "acc": acc, "ms_b1": ms}


def test_choices_under_a_budget_and_for_a_target():
    pts = [_pt("a", 0.80, 0.1), _pt("b", 0.88, 0.5), _pt("c", 0.86, 0.7), _pt("d", 0.91, 4.0)]
    assert [p["model"] for p in front(pts)] == ["a", "b", "d"]  # c is slower and less accurate than b
    assert best_under(pts, 0.05) is None and best_under(pts, 1.0)["model"] == "b"
    assert best_under(pts, 10.0)["model"] == "d"
    assert fastest_reaching(pts, 0.85)["model"] == "b" and fastest_reaching(pts, 0.95) is None


def test_transfer_lines_compare_the_best_pretrained_start_with_scratch_per_data_size():
    cell = lambda mean: {"mean": mean, "n": 2}  # noqa: E731
    transfer = {"config": {"arch": "resnet50", "width": 16, "finetune_steps": 50, "seeds": [0, 1], "shots": [10, 50],
                           "methods": ["scratch", "linear_probe", "full"]},
                "pretrain_test_acc": 0.75, "test_images": 1000,
                "cells": {"10/scratch": cell(0.50), "10/linear_probe": cell(0.55), "10/full": cell(0.57),
                          "50/scratch": cell(0.60), "50/linear_probe": {"mean": 0.9, "n": 1}}}  # one seed of two
    lines = transfer_lines(transfer)
    assert "resnet50 at width 16" in lines[0] and "mean of 2 seeds on 1,000 test images" in lines[0]
    assert lines[1] == ("  - 10 images per class: from scratch 50.0 %, the best pretrained start (full fine-tuning) "
                        "57.0 % (+7.0 points).")
    assert lines[2] == "  - 50 images per class: not all runs finished."


@pytest.fixture(scope="module")
def small_checkpoints(tmp_path_factory) -> list[str]:
    if not FMNIST.exists():
        pytest.skip("dataset-fashion-mnist is not installed")
    tmp = tmp_path_factory.mktemp("select")
    base = dict(dataset="fashion_mnist", epochs=1, batch_size=32, optimizer="adamw", lr=3e-3, warmup_epochs=0.1,
                limit=256, crop_padding=0)
    runs = {"cnn": Recipe(arch="lenet5", **base),
            "vit": Recipe(arch="vit_tiny", model_args={"dim": 48, "depth": 2, "mlp_dim": 96, "patch_size": 7},
                          **base),
            "cnn-qat": Recipe(arch="lenet5", qat=True, **base)}
    for name, recipe in runs.items():
        train(recipe, tmp / f"{name}.pt", progress=False)
    return [str(tmp / f"{name}.pt") for name in runs]


def test_the_report_builds_from_small_checkpoints(small_checkpoints, tmp_path):
    summary = measure(Settings(checkpoints=small_checkpoints, runtimes=("eager", "int8", "qat"), reps=2,
                               accuracy_images=128))
    models = {m["name"]: m for m in summary["models"]}
    assert set(models) == {"cnn", "vit", "cnn-qat"}
    assert set(models["cnn-qat"]["runtimes"]) == {"eager", "int8", "qat"}  # qat only where QAT trained
    assert set(models["cnn"]["runtimes"]) == {"eager", "int8"}
    assert (models["vit"]["family"], models["cnn"]["family"]) == ("ViT", "CNN")
    assert models["cnn"]["runtimes"]["int8"]["convs"] == {"int8": 2, "float": 0}  # LeNet-5's two, fused by ORT
    assert sum(models["cnn-qat"]["runtimes"]["qat"]["convs"].values()) == 2
    assert "convs" not in models["cnn"]["runtimes"]["eager"]  # eager runs no ONNX graph
    for m in summary["models"]:
        assert m["params"] > 0 and m["gflops"] > 0 and m["train_images"] == 256
        for r in m["runtimes"].values():
            assert 0 <= r["acc"] <= 1 and 0 < r["ms_b1"] and r["img_s_b8"] == pytest.approx(8000 / r["ms_b8"])
    page = write(summary, tmp_path).read_text()
    assert json.loads((tmp_path / "model-selection.json").read_text())["models"] == summary["models"]
    assert (tmp_path / "model-selection.png").stat().st_size > 10_000
    for name in models:
        assert f"| {name} |" in page
    assert "int8 QAT (ORT)" in page and "GPU columns are empty" in page
    assert "Checkpoints of one architecture run the same computation" in page  # cnn and cnn-qat: both LeNet-5
    pts = points(summary)
    for budget in (0.25, 1.0, 10.0):  # the page's choice under a budget is the most accurate that fits
        pick = best_under(pts, budget)
        if pick:
            assert pick["ms_b1"] <= budget
            assert all(p["acc"] <= pick["acc"] for p in pts if p["ms_b1"] <= budget)
            assert f"| {budget:g} ms | {pick['model']} (" in page


def test_checkpoints_of_several_datasets_or_none_are_refused(small_checkpoints, tmp_path):
    from training.checkpoint import load_checkpoint, save_checkpoint

    with pytest.raises(SelectError, match="no checkpoints"):
        measure(Settings(checkpoints=[]))
    other = load_checkpoint(small_checkpoints[0])
    other["recipe"]["dataset"] = "cifar10"
    save_checkpoint(other, tmp_path / "other" / "c.pt")
    with pytest.raises(SelectError, match="several datasets.*one dataset at a time"):
        measure(Settings(checkpoints=[small_checkpoints[0], str(tmp_path / "other" / "c.pt")]))
    p = subprocess.run([sys.executable, "-m", "training", "select", "--root", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "no checkpoints to compare" in p.stderr and "Traceback" not in p.stderr
