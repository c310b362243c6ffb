"""Writers for tiny datasets in the real on-disk formats (IDX, CIFAR-10 python batches, ImageFolder trees),
so loader tests exercise the same parsing as the real files."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
              np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def idx_bytes(array: np.ndarray) -> bytes:
    """Header (0, 0, dtype code, ndim, big-endian dims) followed by big-endian data."""
    header = bytes([0, 0, _IDX_CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write `array` as an IDX file; gzip-compressed when the name ends in .gz."""
    path = Path(path)
    data = idx_bytes(np.asarray(array))
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_fashion_mnist(root: str | Path, n_train: int = 20, n_test: int = 8, gz: bool = True) -> Path:
    """Four IDX files; image i of a split is filled with the value i (so splits can be told apart) and
    labelled i % 10."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 28, 28)).copy()
        write_idx(root / f"{split}-images-idx3-ubyte{ext}", images)
        write_idx(root / f"{split}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8))
    return root


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` opcodes, as in the official CIFAR-10 files (pickled by Python 2)."""
    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump(obj: object, path: Path, py2: bool) -> None:
    if not py2:
        path.write_bytes(pickle.dumps(obj))
        return
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy < 2 (which wrote the official files) named its module numpy.core
    path.write_bytes(buf.getvalue().replace(b"cnumpy._core.", b"cnumpy.core."))


def write_cifar_batches(folder: str | Path, n_per_batch: int = 4, n_test: int = 6, py2: bool = False) -> Path:
    """data_batch_1..5, test_batch and batches.meta. Row k of batch b is filled with 10 * b + k in channel 0,
    channel 1 = 1, channel 2 = 2; labels run 0..9 cyclically. py2=True writes Python 2 style pickles."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = (lambda s: s.encode()) if py2 else (lambda s: s)
    names = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    for b, name in enumerate(names):
        n = n_test if name == "test_batch" else n_per_batch
        data = np.zeros((n, 3, 32, 32), np.uint8)
        data[:, 0] = (10 * b + np.arange(n))[:, None, None]
        data[:, 1], data[:, 2] = 1, 2
        batch = {key("batch_label"): key(name), key("labels"): [(b * n + k) % 10 for k in range(n)],
                 key("data"): data.reshape(n, -1), key("filenames"): [key(f"{name}_{k}.png") for k in range(n)]}
        _dump(batch, folder / name, py2)
    meta = {key("label_names"): [key(c) for c in CIFAR_CLASSES], key("num_cases_per_batch"): n_per_batch,
            key("num_vis"): 3072}
    _dump(meta, folder / "batches.meta", py2)
    return folder


def write_image(path: str | Path, size: tuple[int, int] = (12, 10), mode: str = "RGB", value: int = 128) -> Path:
    """A flat image of `size` (width, height) in PIL `mode`; the format follows the suffix (.png, .jpg)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value,) * len(mode)
    Image.new(mode, size, color).save(path)
    return path


def write_imagefolder(root: str | Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), per_class: int = 10,
                      size: tuple[int, int] = (12, 10)) -> Path:
    """<root>/<class>/<i>.png; image i of class c is filled with 20 * c + i so samples can be identified."""
    root = Path(root)
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{i:03d}.png", size, value=20 * c + i)
    return root
