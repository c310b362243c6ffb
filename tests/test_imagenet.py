"""The ImageNet folder layout: sorting the flat val folder from each kind of ground-truth file, loading the
train/<wnid> + val/<wnid> tree with both decoders, and the loader benchmark's pipeline on a tiny tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.datagen import write_image
from training.data import DatasetError, load_dataset, make_loaders
from training.imagenet import read_ground_truth, reorganise_val
from training.loader_bench import markdown, measure, write_synthetic_imagenet
from training.presets import imagefolder_train_transform, make_preprocess

ROOT = Path(__file__).resolve().parents[1]
WNIDS = ["n01440764", "n01443537", "n01484850"]
# ILSVRC2012_val_00000001..6 -> these classes (image i of the flat folder is filled with the value 40 * i)
TRUTH = [2, 0, 1, 1, 0, 2]


def _tree(root: Path) -> Path:
    for c, wnid in enumerate(WNIDS):
        for i in range(2):
            write_image(root / "train" / wnid / f"{wnid}_{i}.JPEG", (16, 12), value=100 + c)
    for i in range(1, 7):
        write_image(root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", (16, 12), value=40 * i)
    return root


def _devkit(folder: Path) -> Path:
    """The devkit's data/ folder: meta.mat (leaf synsets get ILSVRC2012_IDs in their own, non-sorted order,
    plus a non-leaf synset) and the ground truth as IDs."""
    from scipy.io import savemat

    ids = {WNIDS[0]: 3, WNIDS[1]: 1, WNIDS[2]: 2}
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children"]
    syn = np.zeros(4, dtype=[(f, object) for f in fields])
    for k, (wnid, i) in enumerate([*ids.items(), ("n00001740", 1001)]):
        syn[k] = (i, wnid, "w", "g", 0 if i <= 1000 else 3)
    folder.mkdir(parents=True)
    savemat(folder / "meta.mat", {"synsets": syn})
    path = folder / "ILSVRC2012_validation_ground_truth.txt"
    path.write_text("".join(f"{ids[WNIDS[c]]}\n" for c in TRUTH))
    return path


@pytest.mark.parametrize("fmt", ["pairs", "loc_csv", "devkit"])
def test_val_is_sorted_from_each_ground_truth_format(tmp_path, fmt):
    root = _tree(tmp_path / "imagenet")
    names = [f"ILSVRC2012_val_{i:08d}" for i in range(1, 7)]
    if fmt == "pairs":
        truth = tmp_path / "val_labels.txt"
        truth.write_text("".join(f"{n}.JPEG {WNIDS[c]}\n" for n, c in zip(names, TRUTH)))
    elif fmt == "loc_csv":
        truth = tmp_path / "LOC_val_solution.csv"
        truth.write_text("ImageId,PredictionString\n" + "".join(
            f"{n},{WNIDS[c]} 1 2 30 40 {WNIDS[c]} 5 6 70 80\n" for n, c in zip(names, TRUTH)))
    else:
        truth = _devkit(tmp_path / "devkit" / "data")
    assert read_ground_truth(truth) == {n: WNIDS[c] for n, c in zip(names, TRUTH)}
    r = reorganise_val(root / "val", truth)
    assert r == {"images": 6, "sorted_now": 6, "classes": 3, "labels_without_image": 0}
    assert not list((root / "val").glob("*.JPEG"))
    splits = load_dataset("imagefolder", root)
    assert splits.info.classes == WNIDS and splits.test.samples == splits.val.samples  # val/ serves as test
    by_value = {round(float(x.float().mean()) / 40): y for x, y in splits.val}  # value 40 * i -> image i
    assert [by_value[i] for i in range(1, 7)] == TRUTH
    assert reorganise_val(root / "val", truth)["sorted_now"] == 0  # a rerun has nothing left to do


def test_val_with_an_unlabelled_image_moves_nothing_and_cli_says_why(tmp_path):
    root = _tree(tmp_path / "imagenet")
    truth = tmp_path / "labels.txt"
    truth.write_text("".join(f"ILSVRC2012_val_{i:08d}.JPEG {WNIDS[0]}\n" for i in range(1, 6)))  # no 6th
    with pytest.raises(DatasetError, match="1 images in .* have no label .*ILSVRC2012_val_00000006.JPEG"):
        reorganise_val(root / "val", truth)
    assert len(list((root / "val").glob("*.JPEG"))) == 6
    p = subprocess.run([sys.executable, "-m", "training", "imagenet-val", str(root / "val"), "--ground-truth",
                        str(truth)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: 1 images in") and "nothing was moved" in p.stderr


def test_copy_mode_keeps_the_flat_folder(tmp_path):
    root = _tree(tmp_path / "imagenet")
    truth = tmp_path / "labels.txt"
    truth.write_text("".join(f"ILSVRC2012_val_{i:08d} {WNIDS[c]}\n" for i, c in enumerate(TRUTH, start=1))
                     + f"ILSVRC2012_val_00000099 {WNIDS[0]}\n")
    r = reorganise_val(root / "val", truth, mode="copy")
    assert r["images"] == 6 and r["labels_without_image"] == 1
    assert len(list((root / "val").glob("*.JPEG"))) == 6 and len(list((root / "val").glob("*/*.JPEG"))) == 6


def test_imagenet_layout_trains_through_both_decoders(tmp_path):
    root = write_synthetic_imagenet(tmp_path / "synth", classes=2, per_class=4, size=(64, 48))
    splits = load_dataset("imagefolder", root, val_fraction=0.25)
    pil = splits.train[0][0]
    splits.train.decoder = "torchvision"
    tv = splits.train[0][0]
    assert pil.shape == tv.shape == (3, 48, 64) and (pil.int() - tv.int()).abs().max() <= 2  # two JPEG decoders
    pre = make_preprocess(32, 3, splits.info.mean, splits.info.std)
    transform = imagefolder_train_transform(pre, size=24, auto_augment="randaugment", random_erasing=0.5)
    train, _, _ = make_loaders(splits, 2, "cpu", 0, train_transform=transform, decoder="torchvision")
    x, y = next(iter(train))
    assert x.shape == (2, 3, 24, 24) and x.dtype == torch.uint8 and y.tolist() <= [1, 1]


def test_loader_benchmark_measures_and_reports(tmp_path):
    root = write_synthetic_imagenet(tmp_path / "synth", classes=2, per_class=4, size=(64, 48))
    rows = [measure(root, "pil", 0, aug, batch_size=2, batches=1, repeats=1) for aug in (False, True)]
    assert all(r["images_per_s"] > 0 for r in rows)
    md = markdown({"date": "d", "machine": "m", "torch": "t", "loadavg_start": 0.1, "loadavg_end": 0.2,
                   "tree": {"classes": 2, "per_class": 4, "size": [64, 48], "quality": 90, "mean_kb": 3.0},
                   "rows": rows + [{**rows[1], "decoder": "torchvision", "images_per_s": 2 * rows[1]["images_per_s"]}]})
    assert "| pil | 0 | none (decode only) |" in md and "One core decodes and augments about" in md
    assert "busy" not in md and "median of 1 passes" in md
    busy = markdown({"date": "d", "machine": "m", "torch": "t", "loadavg_start": 0.5, "loadavg_end": 6.3,
                     "tree": {"classes": 2, "per_class": 4, "size": [64, 48], "quality": 90, "mean_kb": 3.0},
                     "rows": rows})
    assert "The machine was busy (load average up to 6.3" in busy
    beside = markdown({"date": "d", "machine": "m", "torch": "t", "loadavg_start": 1.2, "loadavg_end": 1.4,
                       "tree": {"classes": 2, "per_class": 4, "size": [64, 48], "quality": 90, "mean_kb": 3.0},
                       "beside": "niced training, one thread", "rows": rows})
    assert "Beside the benchmark ran: niced training, one thread" in beside and "busy" not in beside
    assert "Beside the benchmark" not in md
