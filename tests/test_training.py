"""Recipes, the training loop, resume, evaluation outputs and the CLI's error handling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.checkpoint import build_model, load_checkpoint
from training.commands import python_command
from training.recipe import Recipe, RecipeError, load_recipe, make_recipe
from training.train import train

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist is not installed")
PY = python_command()  # what hints print for this interpreter (.venv/bin/python in the project's venv)


def test_every_shipped_recipe_validates():
    recipes = sorted((ROOT / "training" / "recipes").glob("*.yaml"))
    assert len(recipes) >= 5
    for path in recipes:
        r = load_recipe(str(path))
        assert isinstance(r, Recipe)


def test_unknown_key_is_an_error():
    with pytest.raises(RecipeError, match="unknown key.*learning_rate"):
        make_recipe({"arch": "lenet5", "learning_rate": 0.1})


@pytest.mark.parametrize("values, message", [
    ({"epochs": 0}, "epochs"),
    ({"optimizer": "rmsprop"}, "optimizer"),
    ({"epochs": "ten"}, "epochs must be a int"),
    ({"hflip": "yes"}, "hflip must be true or false"),
    ({"label_smoothing": 1.5}, "label_smoothing"),
    ({"background": [0, 0, 256]}, "background must be three integers 0..255"),
    ({"background": "black"}, "background must be three integers 0..255"),
])
def test_bad_values_are_errors(values, message):
    with pytest.raises(RecipeError, match=message):
        make_recipe(values)


def test_overrides_apply_and_missing_recipe_names_known_ones(tmp_path):
    r = load_recipe("default", {"epochs": 7, "arch": "simple_cnn", "lr": None})
    assert (r.epochs, r.arch) == (7, "simple_cnn")
    with pytest.raises(RecipeError, match="known recipes:.*default"):
        load_recipe("no_such_recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(str(bad))


def _tiny(arch="simple_cnn", **kw) -> Recipe:
    base = dict(arch=arch, dataset="fashion_mnist", epochs=3, batch_size=64, optimizer="adamw", lr=3e-3,
                weight_decay=0.0, warmup_epochs=0.1, limit=1024, crop_padding=0, hflip=False)
    base.update(kw)
    return Recipe(**base)


@needs_fmnist
def test_tiny_run_lowers_the_loss_and_writes_a_weights_only_checkpoint(tmp_path):
    out = tmp_path / "ck.pt"
    ckpt = train(_tiny(), out, log_dir=tmp_path / "tb", progress=False)
    hist = ckpt["metrics"]["history"]
    assert hist[-1]["train_loss"] < 0.8 * hist[0]["train_loss"]
    assert ckpt["metrics"]["test_acc"] > 0.5  # 10 classes: chance is 0.1
    loaded = torch.load(out, weights_only=True)
    for key in ("arch", "model_args", "state_dict", "classes", "preprocess", "metrics", "recipe"):
        assert key in loaded
    assert len(loaded["classes"]) == 10 and loaded["preprocess"]["channels"] == 1
    assert loaded["preprocess"]["background"] == [0, 0, 0]  # Fashion-MNIST items are white on black
    model = build_model(loaded)
    x = torch.randn(2, 1, 28, 28)
    assert model(x).shape == (2, 10)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*")), "TensorBoard logs were not written"
    assert not list(tmp_path.glob(".ck.pt.*")), "a temporary file was left behind"


@needs_fmnist
def test_mixup_cutmix_ema_and_clipping_run(tmp_path):
    r = _tiny(epochs=1, mixup_alpha=0.2, cutmix_alpha=1.0, ema_decay=0.99, grad_clip=1.0, label_smoothing=0.1,
              crop_padding=2, hflip=True, optimizer="sgd", lr=0.05)
    ckpt = train(r, tmp_path / "m.pt", progress=False)
    assert ckpt["ema_state_dict"] is not None
    ema_w = next(iter(ckpt["ema_state_dict"].values()))
    assert torch.isfinite(ema_w).all()


@needs_fmnist
def test_resume_continues_where_it_stopped(tmp_path):
    full = train(_tiny(epochs=2), tmp_path / "full.pt", progress=False)
    train(_tiny(epochs=2), tmp_path / "part.pt", progress=False, stop_after_epoch=1)
    assert load_checkpoint(tmp_path / "part.pt")["epoch"] == 1
    resumed = train(_tiny(epochs=2), tmp_path / "part.pt", resume=tmp_path / "part.pt", progress=False)
    assert resumed["epoch"] == 2 and len(resumed["metrics"]["history"]) == 2
    # Same seeds, same shuffle order per epoch: resuming gives the same weights as one uninterrupted run.
    for k, v in full["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][k], v, rtol=1e-4, atol=1e-5)


@needs_fmnist
def test_eval_writes_metrics_and_plots(tmp_path):
    from training.evaluate import run_eval

    train(_tiny(epochs=1), tmp_path / "e.pt", progress=False)
    r = run_eval(tmp_path / "e.pt", tmp_path / "report", limit=512)
    assert 0 <= r["test_acc"] <= 1 and len(r["per_class_acc"]) == 10
    assert sum(map(sum, r["confusion_matrix"])) == r["n"] == 512
    for name in ("confusion.png", "samples.png", "metrics.json"):
        assert (tmp_path / "report" / name).stat().st_size > 1000
    # The grid leads with the most confident mistake, next to a correct image of the class it named.
    first, second = r["samples"][:2]
    assert first["label"] != first["predicted"] and second["label"] == second["predicted"] == first["predicted"]
    wrong = [s for s in r["samples"] if s["label"] != s["predicted"]]
    assert [s["probability"] for s in wrong] == sorted((s["probability"] for s in wrong), reverse=True)


def test_sample_grid_shows_the_most_confident_mistakes_next_to_correct_ones():
    from training.evaluate import confusion_figure, pick_samples, sample_grid_figure

    labels = torch.tensor([0, 1, 2, 1, 0, 2, 1, 0])
    preds = torch.tensor([0, 0, 2, 1, 1, 1, 1, 0])  # wrong: 1 (called 0), 4 (called 1), 5 (called 1)
    conf = torch.tensor([0.9, 0.6, 0.8, 0.7, 0.95, 0.5, 0.99, 0.3])
    assert pick_samples(labels, preds, conf, n=6) == [4, 6, 1, 0, 5, 3]
    # A mistake whose named class has no correct image stands alone; correct images fill the grid.
    assert pick_samples(torch.tensor([0, 1]), torch.tensor([2, 1]), torch.tensor([0.9, 0.8]), n=4) == [0, 1]
    title = "lenet5 | lenet5-fashion_mnist.pt | test accuracy 62.50% on 8 images"
    images = torch.zeros(8, 1, 28, 28, dtype=torch.uint8)
    fig = sample_grid_figure(images, labels, preds, conf, ["a", "b", "c"], title)
    assert fig._suptitle.get_text().startswith(title)
    texts = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert texts[0] == "b 0.95\n(true: a)" and texts[1] == "b 0.99"
    cm = torch.eye(3, dtype=torch.long)
    assert confusion_figure(cm, ["a", "b", "c"], title).axes[0].get_title() == title


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args, message", [
    (["train", "--arch", "resnet9000", "--epochs", "1"], "unknown arch 'resnet9000'"),
    (["train", "--dataset", "cifar10", "--data-root", "/nonexistent/cifar"], "cifar"),
    (["train", "--recipe", "nope"], "recipe not found"),
    (["eval", "--checkpoint", "/nonexistent/x.pt"],
     f"checkpoint not found: /nonexistent/x.pt; train it: {PY} -m training train --recipe default "
     "--out /nonexistent/x.pt"),
    (["eval", "--checkpoint", "/nonexistent/resnet18-fashion_mnist.pt"],
     f"train it: {PY} -m training train --recipe resnet18_fmnist --out /nonexistent/resnet18-fashion_mnist.pt"),
])
def test_cli_errors_are_one_clear_line(args, message):
    p = _cli(*args)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert message.lower() in p.stderr.lower()
    assert len(p.stderr.strip().splitlines()) <= 2


def test_cli_refuses_a_checkpoint_with_pickled_code(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"arch": "lenet5", "payload": Recipe()}, evil)  # a pickled class, not plain data
    p = _cli("eval", "--checkpoint", str(evil))
    assert p.returncode == 2 and "not a weights-only checkpoint" in p.stderr


@needs_fmnist
def test_in_memory_data_trains_at_a_larger_input_size(tmp_path):
    ckpt = train(_tiny(epochs=1, img_size=36, limit=256), tmp_path / "big.pt", progress=False)
    assert ckpt["preprocess"]["size"] == 36 and ckpt["model_args"]["img_size"] == 36
    assert build_model(ckpt)(torch.randn(1, 1, 36, 36)).shape == (1, 10)
