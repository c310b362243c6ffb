"""Benchmark images: Fashion-MNIST test pictures upscaled to 500x375 RGB JPEGs (quality 90), deterministic.

500x375 is a typical photo size (ImageNet's median is close to it), so decode and resize cost what they cost
for real uploads, while the content stays real pictures of clothes that the 10-class models know.

    python -m load_tests.images --out-dir reports/bench/images --n 64
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (500, 375)  # (width, height)
QUALITY = 90


def to_photo(gray: np.ndarray, size: tuple[int, int] = SIZE) -> Image.Image:
    """A 28x28 uint8 image -> an RGB picture of `size`: the item scaled to the full height, centred on black
    (Fashion-MNIST's own background), so the aspect ratio of the item is kept."""
    w, h = size
    side = min(w, h)
    item = Image.fromarray(gray, "L").resize((side, side), Image.Resampling.BICUBIC).convert("RGB")
    canvas = Image.new("RGB", (w, h))
    canvas.paste(item, ((w - side) // 2, (h - side) // 2))
    return canvas


def write_jpegs(out_dir: str | Path, n: int = 64, size: tuple[int, int] = SIZE, quality: int = QUALITY,
                data_root: str | None = None) -> list[Path]:
    """The first `n` Fashion-MNIST test images as <index>_<class>.jpg under out_dir (existing files are reused
    only if they match the requested size, so a changed --size never mixes two sets)."""
    from training.data import load_dataset
    from training.samples import slug

    splits = load_dataset("fashion_mnist", data_root)
    test, classes = splits.test, splits.info.classes
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(min(n, len(test))):
        path = out / f"{i:04d}_{slug(classes[int(test.labels[i])])}.jpg"
        if not (path.is_file() and _size_of(path) == size):
            to_photo(test.images[i][0].numpy(), size).save(path, "JPEG", quality=quality)
        paths.append(path)
    return paths


def _size_of(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:
            return im.size
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.images", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path("reports/bench/images"))
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--width", type=int, default=SIZE[0])
    p.add_argument("--height", type=int, default=SIZE[1])
    p.add_argument("--quality", type=int, default=QUALITY)
    a = p.parse_args(argv)
    paths = write_jpegs(a.out_dir, a.n, (a.width, a.height), a.quality)
    print(f"{len(paths)} JPEGs ({a.width}x{a.height}, quality {a.quality}) in {a.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
