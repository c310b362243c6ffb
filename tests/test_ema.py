"""The weight EMA warms up, BN statistics are measured for the averaged weights, and a run too short for its
schedule says so (raw and EMA accuracy both reported)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from training.ema import WeightEMA, ema_decay_at, ema_horizon, recalibrate_bn
from training.recipe import RECIPES_DIR, Recipe, load_recipe
from training.train import near_chance_warning, short_run_warning, train

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist is not installed")


def test_ema_decay_grows_with_the_number_of_updates():
    assert ema_decay_at(0, 0.999) == 0.0  # the first update copies the weights
    assert ema_decay_at(1, 0.999) == pytest.approx(1 - 2 ** -0.75)  # 0.4054
    assert ema_decay_at(3, 0.999) == pytest.approx(1 - 4 ** -0.75)  # 0.6464
    assert ema_decay_at(99, 0.999) == pytest.approx(1 - 100 ** -0.75)  # 0.9684
    assert ema_decay_at(9_998, 0.999) < 0.999 and ema_decay_at(10_000, 0.999) == 0.999  # capped from 10k on
    assert ema_decay_at(5, 0.5) == 0.5  # a low decay caps early
    values = [ema_decay_at(t, 0.9999) for t in range(0, 3000, 7)]
    assert values == sorted(values)
    assert (ema_horizon(0.999), ema_horizon(0.9998), ema_horizon(0.0)) == (1000, 5000, 0)


def test_weight_ema_follows_the_warmed_up_average():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)  # the initialisation
    ema = WeightEMA(model, decay=0.999)
    expected = None
    for t, w in enumerate([4.0, 6.0, 3.0, 5.0]):
        with torch.no_grad():
            model.weight.fill_(w)
        ema.update(model)
        d = ema_decay_at(t, 0.999)
        expected = w if expected is None else d * expected + (1 - d) * w
        assert ema.module.weight.item() == pytest.approx(expected, abs=1e-6)
    assert ema.updates == 4 and not ema.module.weight.requires_grad
    # After 4 updates the average sits among the trained weights; a plain 0.999 average would still be ~0.02.
    assert 3.0 < ema.module.weight.item() < 6.0


def test_recalibrate_bn_measures_statistics_of_the_averaged_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    batches = [torch.randn(16, 3) * 2 + 1 for _ in range(5)]
    with torch.no_grad():
        feats = torch.cat([model[0](b) for b in batches])
    model.eval()
    used = recalibrate_bn(model, iter(batches), max_batches=3)
    assert used == 3 and not model.training and model[1].momentum == 0.1
    first3 = feats[:48].view(3, 16, 4)
    torch.testing.assert_close(model[1].running_mean, first3.mean(1).mean(0))  # plain average of batch means
    torch.testing.assert_close(model[1].running_var, first3.var(1).mean(0))
    before = model[1].running_mean.clone()
    assert recalibrate_bn(model, iter([])) == 0  # nothing to measure on: statistics kept
    torch.testing.assert_close(model[1].running_mean, before)
    assert recalibrate_bn(nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2)), iter(batches)) == 0


def test_short_run_and_near_chance_warnings_name_the_reason():
    r = Recipe(epochs=1, batch_size=512, ema_decay=0.999, warmup_epochs=1.0)
    msg = short_run_warning(r, n_train=2048, steps_per_epoch=4, warmup_steps=4)
    assert msg.startswith("warning: 4 optimizer steps") and "\n" not in msg
    assert "LR warm-up (4 steps" in msg and "EMA horizon (1000 steps at ema_decay 0.999)" in msg
    long = Recipe(epochs=10, batch_size=64, ema_decay=0.99, warmup_epochs=1.0)
    assert short_run_warning(long, n_train=54_000, steps_per_epoch=843, warmup_steps=843) is None
    assert near_chance_warning(0.5, 10, None) is None
    assert "too short" in near_chance_warning(0.0975, 10, msg)
    assert "near chance (0.10 for 10 classes)" in near_chance_warning(0.0975, 10, None)


@needs_fmnist
def test_a_four_step_run_with_ema_warns_and_reports_raw_and_ema_accuracy(tmp_path, capsys):
    r = Recipe(arch="simple_cnn", epochs=1, batch_size=512, limit=2048, optimizer="sgd", lr=0.4, warmup_epochs=1,
               label_smoothing=0.1, crop_padding=2, ema_decay=0.999)
    ckpt = train(r, tmp_path / "short.pt", progress=False)
    m = ckpt["metrics"]
    assert m["steps"] == 4 and ckpt["ema_updates"] == 4
    err = capsys.readouterr().err
    assert "warning: 4 optimizer steps" in err and "EMA horizon (1000 steps" in err
    assert m["warnings"][0].startswith("warning: 4 optimizer steps")
    assert m["weights"] == "ema" and m["test_acc"] == m["test_acc_ema"]
    for key in ("test_acc_raw", "test_acc_ema", "val_acc_raw", "val_acc_ema"):
        assert 0.0 <= m[key] <= 1.0
    if m["test_acc"] < 0.2:  # near chance: said so, with the reason
        assert any("near chance" in w and "too short" in w for w in m["warnings"])


@needs_fmnist
def test_quick_runs_of_shipped_recipes_end_above_chance_or_warn(tmp_path):
    """`--epochs 1 --limit 2000` of every shipped recipe: a recipe whose schedule fits trains (run here),
    every other one warns before it starts."""
    fits = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        r = load_recipe(str(path), {"epochs": 1, "limit": 2000})
        if r.task != "classification":  # segmentation scores are mIoU, not accuracy against chance
            continue
        steps = 2000 // r.batch_size
        if short_run_warning(r, 2000, steps, max(1, int(r.warmup_epochs * steps))) is None:
            fits[path.name] = r
    # the demo recipe, and the one `make search` writes when it chose a CNN; all others carry an EMA or long warm-up
    assert "default.yaml" in fits and set(fits) <= {"default.yaml", "searched_fmnist.yaml"}
    for name, r in fits.items():
        m = train(r, tmp_path / f"{name}.pt", progress=False)["metrics"]
        assert m["warnings"] == [] and m["test_acc"] > 0.5, (name, m)  # 10 classes: chance is 0.1
