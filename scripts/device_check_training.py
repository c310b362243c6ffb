"""GPU check for the training targets: ResNet-18 on Fashion-MNIST to >= 95.0 % (goal: <= 60 s of training)
and ViT-Tiny from scratch to >= 92 %. Prints one JSON line per recipe; record the figures in docs/training.md.

The GPU machine has no Debian dataset package: carry the four IDX files, e.g.
    mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/
and run (device tool, carry ["data/fashion-mnist"]):
    python3 scripts/device_check_training.py --data-root data/fashion-mnist [--recipes resnet18_fmnist]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from training.recipe import load_recipe  # noqa: E402
from training.train import train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-root", required=True)
    p.add_argument("--recipes", nargs="+", default=["resnet18_fmnist", "vit_tiny_fmnist"])
    p.add_argument("--out-dir", default="/tmp/device_check_training")
    p.add_argument("--epochs", type=int, help="override every recipe's epochs (quick looks)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check is for the GPU machine")
    for name in a.recipes:
        recipe = load_recipe(name, {"data_root": a.data_root, "epochs": a.epochs})
        ckpt = train(recipe, Path(a.out_dir) / f"{name}.pt", progress=False)
        m = ckpt["metrics"]
        print(json.dumps({"recipe": name, "arch": recipe.arch, "epochs": recipe.epochs, "test_acc": m["test_acc"],
                          "weights": m.get("weights"), "test_acc_raw": m.get("test_acc_raw"),
                          "train_time_s": round(m["train_time_s"], 1), "hardware": m["hardware"],
                          "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
