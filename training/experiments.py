"""The depth experiment (He et al. 2016, Fig. 1/4): plain nets get worse as they get deeper, residual nets
get better. Trains plain18/plain34/resnet18/resnet34 with the same recipe and plots their curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.recipe import Recipe
from training.train import train

ARCHS = ("plain18", "plain34", "resnet18", "resnet34")


def depth_experiment(out_dir: str | Path, epochs: int = 3, limit: int | None = 12000, width: int = 16,
                     data_root: str | None = None, archs: tuple[str, ...] = ARCHS) -> dict[str, Any]:
    """Same data, schedule and width for each net; only depth and the skip connections differ.
    `width` 16 (a quarter of the usual 64) keeps a run within minutes on a 2-core CPU."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for arch in archs:
        recipe = Recipe(arch=arch, dataset="fashion_mnist", data_root=data_root, epochs=epochs, batch_size=128,
                        optimizer="sgd", lr=0.1, weight_decay=5e-4, warmup_epochs=0.5, crop_padding=0, hflip=False,
                        limit=limit, model_args={"width": width})
        print(f"== {arch}", flush=True)
        ckpt = train(recipe, out / f"{arch}.pt", progress=True)
        m = ckpt["metrics"]
        results[arch] = {"history": m["history"], "test_acc": m["test_acc"], "train_time_s": m["train_time_s"],
                         "final_train_loss": m["history"][-1]["train_loss"], "hardware": m["hardware"]}
    (out / "results.json").write_text(json.dumps({"epochs": epochs, "limit": limit, "width": width,
                                                  "results": results}, indent=2))
    _plot(results, out / "depth_curves.png")
    table = _table(results)
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out}/depth_curves.png, results.md, results.json")
    return results


def _table(results: dict[str, Any]) -> str:
    rows = ["| net | final train loss | test accuracy | train time (s) |", "|---|---|---|---|"]
    for arch, r in results.items():
        rows.append(f"| {arch} | {r['final_train_loss']:.4f} | {r['test_acc']:.4f} | {r['train_time_s']:.0f} |")
    return "\n".join(rows)


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for arch, r in results.items():
        ep = [h["epoch"] for h in r["history"]]
        style = "--" if arch.startswith("plain") else "-"
        ax1.plot(ep, [h["train_loss"] for h in r["history"]], style, marker="o", label=arch)
        ax2.plot(ep, [100 * (1 - h["val_acc"]) for h in r["history"]], style, marker="o", label=arch)
    ax1.set(xlabel="epoch", ylabel="training loss", title="training loss (dashed: no skips)")
    ax2.set(xlabel="epoch", ylabel="validation error (%)", title="validation error")
    for ax in (ax1, ax2):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
