"""Data-loader throughput on a synthetic tree in the ImageNet layout (`make bench-loader`).

Writes train/<wnid>/<wnid>_<i>.JPEG photos-like images of ImageNet's typical size (500x375, JPEG quality 90),
then measures images/s of the training loader exactly as `python -m training train` builds it (ImageFolder
split, FolderLoader, the resnet50_imagenet recipe's per-image augmentation), for each decoder (PIL,
torchvision.io) and DataLoader worker count, plus decode-only rows. Each figure is the median of `repeats`
passes; the machine's load average is recorded at the start and the end.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from training.data import load_dataset, make_loaders
from training.presets import imagefolder_train_transform, make_preprocess
from training.recipe import load_recipe
from training.train import cpu_name

RECIPE = "resnet50_imagenet"
BUSY_LOAD = 2.0  # a load average from here up: the figures say they were measured beside other work


def write_synthetic_imagenet(root: str | Path, classes: int = 8, per_class: int = 48,
                             size: tuple[int, int] = (500, 375), quality: int = 90, seed: int = 0) -> Path:
    """<root>/train/<wnid>/<wnid>_<i>.JPEG: smooth colour fields with shapes and grain, which compress and
    decode like photos (random noise would not). Existing trees of the same shape are reused."""
    root = Path(root)
    done = root / ".complete.json"
    shape = {"classes": classes, "per_class": per_class, "size": list(size), "quality": quality}
    if done.is_file() and {k: v for k, v in json.loads(done.read_text()).items() if k != "mean_kb"} == shape:
        return root
    rng = np.random.default_rng(seed)
    w, h = size
    for c in range(classes):
        wnid = f"n{1440764 + c * 1000:08d}"
        folder = root / "train" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            field = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
            img = Image.fromarray(field).resize(size, Image.BICUBIC)
            draw = ImageDraw.Draw(img)
            for _ in range(6):
                x0, y0 = rng.integers(0, w), rng.integers(0, h)
                box = [x0, y0, x0 + rng.integers(20, w // 2), y0 + rng.integers(20, h // 2)]
                draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
            img = img.filter(ImageFilter.GaussianBlur(1.5))
            grain = rng.normal(0, 18, (h, w, 3))  # ~100 KB a file, like ImageNet's
            img = Image.fromarray(np.clip(np.asarray(img) + grain, 0, 255).astype(np.uint8))
            img.save(folder / f"{wnid}_{i:05d}.JPEG", quality=quality)
    files = list((root / "train").rglob("*.JPEG"))
    shape["mean_kb"] = round(sum(f.stat().st_size for f in files) / len(files) / 1024, 1)
    done.write_text(json.dumps(shape))
    return root


def _images_per_s(loader, batches: int) -> float:
    it = iter(loader)
    next(it)  # warm-up: worker start-up and first-file effects are not throughput
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        x, _ = next(it)
        n += len(x)
    return n / (time.perf_counter() - t0)


def measure(root: Path, decoder: str, workers: int, augment: bool, batch_size: int = 32, batches: int = 10,
            repeats: int = 3) -> dict[str, Any]:
    recipe = load_recipe(RECIPE)
    splits = load_dataset("imagefolder", root, val_fraction=0.01, seed=0)
    pre = make_preprocess(recipe.img_size, 3, splits.info.mean, splits.info.std, resize=recipe.resize,
                          interpolation=recipe.interpolation)
    transform = imagefolder_train_transform(
        pre, size=recipe.train_img_size, scale_min=recipe.crop_scale_min, color_jitter=recipe.color_jitter,
        auto_augment=recipe.auto_augment, random_erasing=recipe.random_erasing) if augment else None
    rates = []
    for r in range(repeats):
        loader, _, _ = make_loaders(splits, batch_size, "cpu", seed=r, num_workers=workers, train_transform=transform,
                                    decoder=decoder)
        rates.append(_images_per_s(loader, batches))
        del loader
    return {"decoder": decoder, "workers": workers, "augment": augment, "images_per_s": statistics.median(rates),
            "runs": rates, "batch_size": batch_size, "batches": batches}


def run(root: str | Path, out_dir: str | Path, repeats: int = 3, beside: str | None = None) -> dict[str, Any]:
    """Every configuration, one process at a time; the main process uses one thread (workers each use one).
    `beside`: what else ran on the machine meanwhile (recorded, and said in the figures block)."""
    tree = write_synthetic_imagenet(root)
    torch.set_num_threads(1)
    load_start = os.getloadavg()[0]
    rows = [measure(tree, d, 0, False, repeats=repeats) for d in ("pil", "torchvision")]
    rows += [measure(tree, d, w, True, repeats=repeats) for d in ("pil", "torchvision") for w in (0, 1, 2)]
    machine = f"{cpu_name()}, {os.cpu_count()} cores"
    result = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine, "torch": torch.__version__,
              "loadavg_start": round(load_start, 2), "loadavg_end": round(os.getloadavg()[0], 2), "recipe": RECIPE,
              "tree": json.loads((tree / ".complete.json").read_text()), "beside": beside, "rows": rows}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"loader-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2))
    result["path"] = str(path)
    return result


def markdown(result: dict[str, Any]) -> str:
    """The figures block of docs/distributed.md, generated from docs/loader.json."""
    rows = ["| decoder | workers | augmentation | images/s |", "|---|---|---|---|"]
    for r in result["rows"]:
        aug = "resnet50_imagenet train transform" if r["augment"] else "none (decode only)"
        rows.append(f"| {r['decoder']} | {r['workers']} | {aug} | {r['images_per_s']:.0f} |")
    one_core = {r["decoder"]: r["images_per_s"] for r in result["rows"] if r["augment"] and r["workers"] == 0}
    best, rate = max(one_core.items(), key=lambda kv: kv[1])
    t = result["tree"]
    lines = [
        f"Measured {result['date']} on {result['machine']} (torch {result['torch']}), load average "
        f"{result['loadavg_start']} at the start and {result['loadavg_end']} at the end; synthetic tree of "
        f"{t['classes']} x {t['per_class']} JPEGs at {t['size'][0]}x{t['size'][1]} (quality {t['quality']}, "
        f"{t['mean_kb']:.0f} KB on average); "
        f"median of {len(result['rows'][0]['runs'])} passes; one thread per process. "
        "Figures: [loader.json](loader.json).", "", *rows, "",
        f"One core decodes and augments about {rate:.0f} images/s ({best}; the other decoder "
        + ", ".join(f"{d}: {v:.0f}" for d, v in one_core.items() if d != best) + "). Feeding a GPU that trains "
        f"at 1000 images/s therefore takes about {1000 / rate:.0f} such cores, and 3000 images/s about "
        f"{3000 / rate:.0f}, before the GPU itself waits.",
    ]
    if result.get("beside"):
        lines += ["", f"Beside the benchmark ran: {result['beside']} (the benchmark at normal priority, "
                  "holding the benchmark lock; the other work at the lowest priority)."]
    load = max(result["loadavg_start"], result["loadavg_end"])
    if load >= BUSY_LOAD:
        lines += ["", f"The machine was busy (load average up to {load:.1f} on {result['machine']}; other work ran "
                  "beside the benchmark, which held the benchmark lock): read these as lower bounds; "
                  "`make bench-loader` on a quiet machine replaces them."]
    return "\n".join(lines)


def wait_for_quiet(max_load: float, timeout_s: float) -> float:
    """Wait (up to timeout_s) until the 1-minute load average is at most max_load; returns the last reading."""
    deadline = time.monotonic() + timeout_s
    while (load := os.getloadavg()[0]) > max_load and time.monotonic() < deadline:
        time.sleep(15)
    return load


def main(argv: list[str] | None = None) -> int:
    import argparse

    from training.docblock import write_doc_block

    p = argparse.ArgumentParser(prog="python -m training.loader_bench", description=__doc__.splitlines()[0])
    p.add_argument("--tree", default="data/synthetic-imagenet")
    p.add_argument("--out-dir", default="reports/loader")
    p.add_argument("--docs", help="also write docs/loader.json and the figures block of docs/distributed.md")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-load", type=float, default=1.0, help="wait for a 1-minute load average at most this")
    p.add_argument("--wait", type=float, default=900, help="seconds to wait for it before giving up")
    p.add_argument("--beside", help="what else ran on the machine meanwhile (e.g. 'niced training, one "
                   "thread'); recorded in the JSON and said in the figures block")
    a = p.parse_args(argv)
    load = wait_for_quiet(a.max_load, a.wait)
    if load > a.max_load:
        print(f"error: load average {load:.2f} > {a.max_load} after {a.wait:.0f} s; throughput figures need a quiet "
              "machine (rerun later, or pass a higher --max-load and say so)", file=sys.stderr)
        return 3
    result = run(a.tree, a.out_dir, repeats=a.repeats, beside=a.beside)
    md = markdown(result)
    print(md)
    if a.docs:
        docs = Path(a.docs)
        (docs / "loader.json").write_text(json.dumps({k: v for k, v in result.items() if k != "path"}, indent=2)
                                          + "\n")
        write_doc_block(docs / "distributed.md", "loader-figures", md)
    print(f"wrote {result['path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
