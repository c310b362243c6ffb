"""Write test-split images as PNG files named <index>_<class>.png (demo predictions, load tests)."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from training.data import load_dataset


def slug(name: str) -> str:
    """A class name as a file or folder name: 'T-shirt/top' -> 't-shirt-top'."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def export_samples(dataset: str, out_dir: str | Path, n: int = 8, data_root: str | None = None) -> list[Path]:
    splits = load_dataset(dataset, data_root)
    test = splits.test
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(min(n, len(test))):
        img = test.images[i].numpy()  # (C, H, W) uint8
        pil = Image.fromarray(img[0]) if img.shape[0] == 1 else Image.fromarray(img.transpose(1, 2, 0))
        path = out / f"{i:04d}_{slug(splits.info.classes[int(test.labels[i])])}.png"
        pil.save(path)
        paths.append(path)
    return paths
