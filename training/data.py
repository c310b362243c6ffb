"""Datasets: Fashion-MNIST (IDX files), CIFAR-10 (python-format batches) and any ImageFolder tree.

Small datasets are held in memory as uint8 tensors and batched by `TensorLoader` (no worker processes, no
per-sample Python); photo folders are decoded lazily with PIL and batched by a DataLoader. Both yield uint8
images: normalisation and augmentation live in training/presets.py, so training and serving share them.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2.functional import pil_to_tensor

DATASETS = ("fashion_mnist", "cifar10", "imagefolder")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
CIFAR10_ROOT = "data"  # holds cifar-10-batches-py/ (git-ignored)
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
DECODERS = ("pil", "torchvision")
_TORCHVISION_DECODES = {".jpg", ".jpeg", ".png", ".gif", ".webp"}  # torchvision.io; the rest go through PIL
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_FILES = ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")
_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


class DatasetError(Exception):
    """A dataset that is missing, in the wrong place or not in the expected format; the message says what to do."""


@dataclass
class DatasetInfo:
    name: str                 # one of DATASETS
    classes: list[str]
    channels: int
    size: int                 # model input side; in-memory images keep their stored size (28 / 32)
    mean: list[float]         # per channel, 0..1 units
    std: list[float]
    in_memory: bool           # splits are TensorSplit (uint8 tensors) rather than ImageFolderSplit
    background: tuple[int, int, int] = (255, 255, 255)  # RGB behind the objects (served alpha goes on it)


@dataclass
class TensorSplit:
    images: torch.Tensor      # uint8 (N, C, H, W)
    labels: torch.Tensor      # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)


class ImageFolderSplit(Dataset):
    """(uint8 tensor (3, H, W) at the file's own size, label) per image. `transform` (a callable on that
    tensor) is set by the trainer on the training split for per-sample augmentation; `decoder` is pil or
    torchvision (torchvision.io for JPEG/PNG/GIF/WebP, PIL for the other formats)."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str],
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None, decoder: str = "pil"):
        self.samples, self.classes, self.transform, self.decoder = samples, classes, transform, decoder

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        try:
            if self.decoder == "torchvision" and os.path.splitext(path)[1].lower() in _TORCHVISION_DECODES:
                from torchvision.io import ImageReadMode, decode_image

                x = decode_image(path, mode=ImageReadMode.RGB)
            else:
                with Image.open(path) as img:
                    x = pil_to_tensor(img.convert("RGB"))  # grayscale/palette/RGBA photos all become 3 channels
        except (OSError, ValueError, RuntimeError) as e:
            raise DatasetError(f"cannot decode image {path}: {e}") from None
        return (self.transform(x) if self.transform is not None else x), label


@dataclass
class Splits:
    info: DatasetInfo
    train: TensorSplit | ImageFolderSplit
    val: TensorSplit | ImageFolderSplit
    test: TensorSplit | ImageFolderSplit


UNLABELED = -100  # a hidden label (torch's cross-entropy ignore_index): the image is for the teacher's term only


def with_unlabeled(splits: Splits, limit: int, extra: int) -> Splits:
    """Splits loaded without a limit -> every split capped at `limit` (the same images a limited load gives), the
    training split followed by `extra` more of its images with their labels hidden (UNLABELED): distillation's
    transfer set, which only the teacher labels. In-memory datasets only."""
    if not splits.info.in_memory:
        raise DatasetError(f"kd_unlabeled needs an in-memory dataset; {splits.info.name} is read from folders")
    train = splits.train
    if limit + extra > len(train):
        raise DatasetError(f"kd_unlabeled {extra} + limit {limit} exceed the {len(train)} training images of "
                           f"{splits.info.name}")
    labels = train.labels[:limit + extra].clone()
    labels[limit:] = UNLABELED
    return Splits(splits.info, TensorSplit(train.images[:limit + extra], labels),
                  *(TensorSplit(s.images[:limit], s.labels[:limit]) for s in (splits.val, splits.test)))


def load_dataset(name: str, root: str | os.PathLike | None = None, *, val_fraction: float = 0.1, seed: int = 0,
                 image_size: int | None = None, limit: int | None = None) -> Splits:
    """Load a dataset's train/val/test splits. `limit` caps every split (fast tests and demos)."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be a positive number of samples, got {limit}")
    loaders = {"fashion_mnist": _load_fashion_mnist, "cifar10": _load_cifar10, "imagefolder": _load_imagefolder}
    return loaders[name](root, val_fraction, seed, image_size, limit)


# ---- IDX (Fashion-MNIST) ----

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzip or plain: two zero bytes, a dtype code, ndim, ndim big-endian uint32 dims, data.
    Every field is checked so a wrong or cut-short file fails here with its name, not mid-training."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"  # sniff instead of trusting the suffix
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut gzip stream is an EOFError
        raise DatasetError(f"cannot read {path}: {e}; the file is damaged, reinstall or re-download it") from None
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DatasetError(f"{path} is not an IDX file (magic number 0x{raw[:4].hex() or 'missing'}; expected "
                           "0x0000, a dtype code such as 08 for uint8, and the number of dimensions)")
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else ()
    expected = header + math.prod(dims) * dtype.itemsize
    if not dims or len(raw) != expected:
        what = "truncated" if len(raw) < expected or not dims else "longer than its header says"
        raise DatasetError(f"{path} is {what}: header promises shape {dims} ({expected} bytes), file has "
                           f"{len(raw)} bytes; reinstall or re-download it")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(root: Path, stem: str) -> Path | None:
    # Official names, plus the "train-images.idx3-ubyte" spelling some mirrors use.
    for s in (stem, stem.replace("-idx", ".idx")):
        for name in (f"{s}-ubyte.gz", f"{s}-ubyte"):
            if (root / name).is_file():
                return root / name
    return None


def fashion_mnist_arrays(root: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The four IDX arrays by stem: train-images-idx3 (60000, 28, 28) uint8, train-labels-idx1, t10k-..."""
    root = Path(root or FASHION_MNIST_ROOT)
    paths = {stem: _find_idx(root, stem) for stem in _IDX_FILES}
    missing = [f"{stem}-ubyte.gz" for stem, p in paths.items() if p is None]
    if missing:
        raise DatasetError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}). Install it with "
            "`apt-get install -y dataset-fashion-mnist` (or `make setup` as root), or pass --data-root pointing "
            "to a folder with the four IDX files (train-/t10k-images-idx3-ubyte.gz, train-/t10k-labels-idx1-ubyte.gz).")
    return {stem: read_idx(p) for stem, p in paths.items()}


def _load_fashion_mnist(root, val_fraction, seed, image_size, limit) -> Splits:
    root = Path(root or FASHION_MNIST_ROOT)
    arrays = fashion_mnist_arrays(root)
    full = _tensor_split(arrays["train-images-idx3"][:, None], arrays["train-labels-idx1"], 10, root / "train-*")
    test = _tensor_split(arrays["t10k-images-idx3"][:, None], arrays["t10k-labels-idx1"], 10, root / "t10k-*")
    info = DatasetInfo("fashion_mnist", list(FASHION_MNIST_CLASSES), 1, image_size or full.images.shape[-1],
                       [0.2860], [0.3530], True,  # mean/std measured on the 60k training images
                       background=(0, 0, 0))  # white-on-black items
    return _split_in_memory(info, full, test, val_fraction, seed, limit)


# ---- CIFAR-10 (python-format pickles) ----

class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what dicts of numpy arrays need, so a tampered file cannot run code
    (the same stance as torch.load(weights_only=True) for checkpoints)."""
    _ALLOWED = frozenset({("numpy", "ndarray"), ("numpy", "dtype"), ("numpy._core.multiarray", "_reconstruct"),
                          ("numpy._core.multiarray", "scalar"), ("numpy._core.numeric", "_frombuffer"),
                          ("_codecs", "encode")})  # how Python 3 writes bytes at pickle protocol 2

    def find_class(self, module: str, name: str) -> Any:
        module = module.replace("numpy.core.", "numpy._core.")  # files pickled by numpy < 2
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="latin1").load()  # latin1: the official files are Python 2 pickles
    except Exception as e:  # noqa: BLE001 -- a damaged pickle can fail in many ways; all mean "wrong format"
        raise DatasetError(f"cannot read CIFAR-10 file {path}: {e}; expected the official python format") from None
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if "data" not in d or "labels" not in d:
        raise DatasetError(f"{path}: expected keys 'data' and 'labels', found {sorted(d)}")
    data = np.asarray(d["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    return data.reshape(-1, 3, 32, 32), np.asarray(d["labels"], dtype=np.int64)


def _load_cifar10(root, val_fraction, seed, image_size, limit) -> Splits:
    root = Path(root or CIFAR10_ROOT)
    folder = next((d for d in (root / "cifar-10-batches-py", root) if (d / "batches.meta").is_file()), None)
    if folder is None:
        tarball = " (cifar-10-python.tar.gz is there: extract it with `tar xzf`)" \
            if (root / "cifar-10-python.tar.gz").is_file() else ""
        raise DatasetError(
            f"CIFAR-10 not found at {root}{tarball}: expected {root}/cifar-10-batches-py/ (or --data-root pointing "
            "at that folder itself) holding data_batch_1..5, test_batch and batches.meta in the official python "
            "format (cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extracted).")
    missing = [n for n in _CIFAR_FILES if not (folder / n).is_file()]
    if missing:
        raise DatasetError(f"CIFAR-10 folder {folder} is incomplete: missing {', '.join(missing)}")
    classes = [c.decode() if isinstance(c, bytes) else str(c)
               for c in _unpickle(folder / "batches.meta").get("label_names", [])]
    if len(classes) != 10:
        raise DatasetError(f"{folder / 'batches.meta'}: expected 10 label_names, found {len(classes)}")
    parts = [_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    full = _tensor_split(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), 10, folder)
    test = _tensor_split(*_cifar_batch(folder / "test_batch"), 10, folder / "test_batch")
    info = DatasetInfo("cifar10", classes, 3, image_size or 32, [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616],
                       True)
    return _split_in_memory(info, full, test, val_fraction, seed, limit)


# ---- shared in-memory helpers ----

def _tensor_split(images: np.ndarray, labels: np.ndarray, num_classes: int, source: Path) -> TensorSplit:
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DatasetError(f"{source}: images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DatasetError(f"{source}: {len(images)} images but labels of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{source}: labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    return TensorSplit(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)))


def _split_in_memory(info: DatasetInfo, full: TensorSplit, test: TensorSplit, val_fraction: float, seed: int,
                     limit: int | None) -> Splits:
    """Carve val out of the training set with a seeded permutation; `limit` caps each split afterwards."""
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    n_val = round(len(full) * val_fraction)
    parts = [perm[n_val:], perm[:n_val], torch.arange(len(test))]
    train, val, test = (TensorSplit(s.images[idx[:limit]], s.labels[idx[:limit]])
                        for s, idx in zip((full, full, test), parts))
    return Splits(info, train, val, test)


# ---- ImageFolder ----

def _scan(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = found
    elif unknown := sorted(set(found) - set(classes)):
        raise DatasetError(f"{folder} has class folders {unknown} that the training folder lacks")
    samples = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(folder / name, followlinks=True):
            dirnames.sort()  # os.walk order is filesystem order; sort so splits are reproducible
            samples += [(os.path.join(dirpath, f), label) for f in sorted(filenames)
                        if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    if not samples:
        raise DatasetError(f"no images found under {folder}: expected {folder}/<class>/<image> (one sub-folder "
                           f"per class; extensions {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return classes, samples


def _split_samples(samples: list[tuple[str, int]], fractions: tuple[float, ...], seed: int) -> list[list]:
    """Stratified seeded split: each class contributes round(n * fraction) samples to each held-out part."""
    g = torch.Generator().manual_seed(seed)
    out: list[list] = [[] for _ in range(len(fractions) + 1)]
    for label in sorted({s[1] for s in samples}):
        items = [s for s in samples if s[1] == label]
        items = [items[i] for i in torch.randperm(len(items), generator=g).tolist()]
        start = 0
        for part, frac in enumerate(fractions, start=1):
            n = min(round(len(items) * frac), len(items) - start - 1)  # keep at least one for training
            out[part] += items[start:start + max(n, 0)]
            start += max(n, 0)
        out[0] += items[start:]
    return out


def _cap(samples: list[tuple[str, int]], limit: int | None, seed: int) -> list[tuple[str, int]]:
    if limit is None or len(samples) <= limit:
        return samples
    keep = sorted(torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:limit].tolist())
    return [samples[i] for i in keep]  # a random subset keeps the class mix of a class-sorted list


def _load_imagefolder(root, val_fraction, seed, image_size, limit) -> Splits:
    layout = "<root>/<class>/<image> or <root>/{train,val[,test]}/<class>/<image>"
    if root is None or not Path(root).is_dir():
        where = "needs --data-root" if root is None else f"root {root} does not exist or is not a folder"
        raise DatasetError(f"imagefolder {where}: expected a folder laid out as {layout}")
    root = Path(root)
    if (root / "train").is_dir():
        classes, train = _scan(root / "train")
        val, test = (_scan(root / n, classes)[1] if (root / n).is_dir() else None for n in ("val", "test"))
        if val is None and test is None:
            train, val, test = _split_samples(train, (val_fraction, val_fraction), seed)
        elif val is None:
            train, val = _split_samples(train, (val_fraction,), seed)
        elif test is None:
            test = val  # the usual train/ + val/ layout: val/ is the held-out set for both
    else:  # one tree: val and test each take val_fraction of every class
        classes, samples = _scan(root)
        train, val, test = _split_samples(samples, (val_fraction, val_fraction), seed)
    if empty := [c for i, c in enumerate(classes) if not any(lbl == i for _, lbl in train)]:
        raise DatasetError(f"classes {empty} have no training images under {root}")
    parts = [ImageFolderSplit(_cap(s, limit, seed), classes) for s in (train, val, test)]
    info = DatasetInfo("imagefolder", classes, 3, image_size or 224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225],
                       False)
    return Splits(info, *parts)


# ---- loaders ----

def collate_uint8(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
    """Stack when every image has the same shape, else keep a list (eval images keep their own size;
    presets.resize_crop accepts either)."""
    images = [b[0] for b in batch]
    labels = torch.tensor([b[1] for b in batch], dtype=torch.int64)
    same = all(x.shape == images[0].shape for x in images)
    return (torch.stack(images) if same else images), labels


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch `epoch`: a function of (seed, epoch) only, the same in every process."""
    state = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    return torch.randperm(n, generator=torch.Generator().manual_seed(state))


def shard_bounds(n: int, batch_size: int, drop_last: bool, rank: int = 0, world_size: int = 1
                 ) -> Iterator[tuple[int, int]]:
    """(start, end) positions, in the epoch's order, of process `rank`'s share of each global batch of
    `batch_size`: a contiguous 1/world_size of it, so N processes together see exactly the batches one process
    would. Empty shares (a last batch smaller than world_size) are skipped."""
    n_batches = n // batch_size if drop_last else math.ceil(n / batch_size)
    for b in range(n_batches):
        start, length = b * batch_size, min(batch_size, n - b * batch_size)
        lo, hi = start + length * rank // world_size, start + length * (rank + 1) // world_size
        if hi > lo:
            yield lo, hi


class TensorLoader:
    """Mini-batches (uint8 images, int64 labels) sliced straight from in-memory tensors. The tensors move to
    `device` once, so an epoch on a GPU is index ops only. Epoch e is shuffled by a generator seeded from
    (seed, e), so a rerun, or a resumed run after `set_epoch`, sees the same order. With world_size > 1 this
    process gets its share (see shard_bounds) of every global batch of `batch_size`."""

    def __init__(self, split: TensorSplit, batch_size: int, *, shuffle: bool = False, drop_last: bool = False,
                 device: torch.device | str | None = None, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = split
        self.images = split.images.to(device) if device is not None else split.images
        self.labels = split.labels.to(device) if device is not None else split.labels
        self.batch_size, self.shuffle, self.drop_last, self.seed, self.epoch = batch_size, shuffle, drop_last, seed, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(len(self.labels), self.seed, self.epoch).to(self.images.device) if self.shuffle else None
        self.epoch += 1
        for lo, hi in shard_bounds(len(self.labels), self.batch_size, self.drop_last, self.rank, self.world_size):
            idx = slice(lo, hi) if order is None else order[lo:hi]
            yield self.images[idx], self.labels[idx]


class ShardedBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices for a DataLoader, in the same order and with the same sharding as
    TensorLoader: epoch e's shuffle depends on (seed, e) only, and `set_epoch` makes resuming exact."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.n, self.batch_size, self.shuffle, self.drop_last, self.seed = n, batch_size, shuffle, drop_last, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.n, self.seed, self.epoch).tolist() if self.shuffle else range(self.n)
        self.epoch += 1
        for lo, hi in shard_bounds(self.n, self.batch_size, self.drop_last, self.rank, self.world_size):
            yield list(order[lo:hi])


class FolderLoader(DataLoader):
    """A DataLoader over a ShardedBatchSampler, with TensorLoader's `set_epoch`."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


def make_loaders(splits: Splits, batch_size: int, device: torch.device | str | None, seed: int,
                 num_workers: int = 0, train_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 decoder: str = "pil", rank: int = 0, world_size: int = 1) -> tuple[Iterable, Iterable, Iterable]:
    """(train, val, test) loaders yielding (uint8 images, int64 labels). In-memory data -> TensorLoader on
    `device` (augment batches with presets.train_batch); ImageFolder -> FolderLoader whose training split
    applies `train_transform` per sample (e.g. presets.imagefolder_train_transform); its batches stay on the CPU
    (pinned for CUDA) and may be lists of differently sized images outside training (see collate_uint8).
    `batch_size` is the global batch: with world_size processes, each loads batch_size / world_size of it."""
    if world_size > 1 and batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world_size} processes")
    if world_size > 1 and len(splits.train) < world_size:
        raise DatasetError(f"{len(splits.train)} training images cannot be shared by {world_size} processes")

    def drop(split) -> bool:  # never drop the only (partial) batch of a tiny training set
        return len(split) > batch_size

    shard = {"rank": rank, "world_size": world_size}
    if splits.info.in_memory:
        if train_transform is not None:
            raise ValueError("train_transform is for imagefolder; augment in-memory batches with presets.train_batch")
        return (TensorLoader(splits.train, batch_size, shuffle=True, drop_last=drop(splits.train), device=device,
                             seed=seed, **shard),
                TensorLoader(splits.val, batch_size, device=device, **shard),
                TensorLoader(splits.test, batch_size, device=device, **shard))
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if train_transform is not None:
        splits.train.transform = train_transform
    for split in (splits.train, splits.val, splits.test):
        split.decoder = decoder
    pin = device is not None and torch.device(device).type == "cuda"
    common: dict[str, Any] = {"num_workers": num_workers, "collate_fn": collate_uint8, "pin_memory": pin,
                              "persistent_workers": num_workers > 0}

    def loader(split, train: bool) -> FolderLoader:
        batches = ShardedBatchSampler(len(split), batch_size, shuffle=train, drop_last=train and drop(split),
                                      seed=seed, **shard)
        return FolderLoader(split, batch_sampler=batches, **common)

    return loader(splits.train, True), loader(splits.val, False), loader(splits.test, False)
