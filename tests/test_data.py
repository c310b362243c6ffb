"""Dataset loaders on tiny files written in the real formats, plus one check against the real Fashion-MNIST."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.datagen import (
    CIFAR_CLASSES,
    idx_bytes,
    write_cifar_batches,
    write_fashion_mnist,
    write_idx,
    write_image,
    write_imagefolder,
)
from training.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    DatasetError,
    ImageFolderSplit,
    TensorLoader,
    TensorSplit,
    collate_uint8,
    load_dataset,
    make_loaders,
    read_idx,
)


def _values(split: TensorSplit) -> list[int]:
    """The fill value identifying each image written by tests.datagen."""
    return split.images[:, 0, 0, 0].tolist()


# ---- IDX / Fashion-MNIST ----

@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
@pytest.mark.parametrize("suffix", [".gz", ""])
def test_read_idx_roundtrip(tmp_path: Path, dtype: type, suffix: str) -> None:
    array = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4) if dtype != np.uint8 \
        else np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    out = read_idx(write_idx(tmp_path / f"a-idx3-ubyte{suffix}", array))
    assert out.dtype == array.dtype and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_idx_files(tmp_path: Path, gz: bool) -> None:
    splits = load_dataset("fashion_mnist", write_fashion_mnist(tmp_path, n_train=20, n_test=8, gz=gz))
    info = splits.info
    assert info.classes == FASHION_MNIST_CLASSES and info.channels == 1 and info.size == 28 and info.in_memory
    assert len(info.mean) == len(info.std) == 1
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 2, 8)
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape[1:] == (1, 28, 28)
    assert splits.train.labels.dtype == torch.int64
    # val is carved out of train: disjoint, together exactly the 20 training images, labels kept with images
    assert sorted(_values(splits.train) + _values(splits.val)) == list(range(20))
    assert all(v % 10 == lbl for v, lbl in zip(_values(splits.train), splits.train.labels.tolist()))
    assert _values(splits.test) == list(range(8))


def test_fashion_mnist_split_is_seeded(tmp_path: Path) -> None:
    root = write_fashion_mnist(tmp_path, n_train=50)
    val = [_values(load_dataset("fashion_mnist", root, seed=s, val_fraction=0.2).val) for s in (0, 0, 1)]
    assert len(val[0]) == 10 and val[0] == val[1] and val[0] != val[2]


def test_limit_caps_every_split(tmp_path: Path) -> None:
    splits = load_dataset("fashion_mnist", write_fashion_mnist(tmp_path, n_train=50, n_test=20), limit=4)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4, 4, 4)
    assert not set(_values(splits.train)) & set(_values(splits.val))


def test_missing_fashion_mnist_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion_mnist", tmp_path / "nowhere")
    assert "apt-get install -y dataset-fashion-mnist" in str(e.value) and "--data-root" in str(e.value)


def test_idx_wrong_magic(tmp_path: Path) -> None:
    root = write_fashion_mnist(tmp_path)
    path = root / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x1f\x00\x08\x01" + bytes(30)))
    with pytest.raises(DatasetError, match="not an IDX file.*magic number"):
        load_dataset("fashion_mnist", root)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_truncated(tmp_path: Path, suffix: str) -> None:
    data = idx_bytes(np.zeros((10, 28, 28), np.uint8))[:-100]
    path = tmp_path / f"x-idx3-ubyte{suffix}"
    path.write_bytes(gzip.compress(data) if suffix else data)
    with pytest.raises(DatasetError, match=r"truncated.*\(10, 28, 28\)"):
        read_idx(path)
    if suffix:  # a gzip stream cut short is reported too, naming the file
        path.write_bytes(gzip.compress(idx_bytes(np.zeros((10, 28, 28), np.uint8)))[:-30])
        with pytest.raises(DatasetError, match="x-idx3-ubyte.gz"):
            read_idx(path)


def test_idx_label_count_must_match(tmp_path: Path) -> None:
    root = write_fashion_mnist(tmp_path, n_train=20)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(19, np.uint8))
    with pytest.raises(DatasetError, match="20 images"):
        load_dataset("fashion_mnist", root)


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(DatasetError, match="fashion_mnist, cifar10, imagefolder"):
        load_dataset("mnist")


# ---- CIFAR-10 ----

@pytest.mark.parametrize("py2", [False, True])
@pytest.mark.parametrize("point_at_batches_folder", [False, True])
def test_cifar10_python_batches(tmp_path: Path, py2: bool, point_at_batches_folder: bool) -> None:
    folder = write_cifar_batches(tmp_path / "cifar-10-batches-py", n_per_batch=4, n_test=6, py2=py2)
    splits = load_dataset("cifar10", folder if point_at_batches_folder else tmp_path, val_fraction=0.25)
    info = splits.info
    assert info.classes == CIFAR_CLASSES and info.channels == 3 and info.size == 32 and len(info.mean) == 3
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, 6)
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape[1:] == (3, 32, 32)
    # rows are 3072 bytes channel-major: channel 0 identifies the image, channels 1 and 2 are constant
    expected = sorted(10 * b + k for b in range(5) for k in range(4))
    assert sorted(_values(splits.train) + _values(splits.val)) == expected
    assert (splits.test.images[:, 1] == 1).all() and (splits.test.images[:, 2] == 2).all()
    assert _values(splits.test) == [50 + k for k in range(6)] and splits.test.labels.tolist() == list(range(6))


def test_cifar10_missing_names_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cifar-10-batches-py.*data_batch_1..5, test_batch and batches.meta"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_incomplete_folder(tmp_path: Path) -> None:
    folder = write_cifar_batches(tmp_path / "cifar-10-batches-py")
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="missing data_batch_3"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_refuses_pickled_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = write_cifar_batches(tmp_path / "cifar-10-batches-py")
    (folder / "test_batch").write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(DatasetError, match="refusing to load builtins.print"):
        load_dataset("cifar10", tmp_path)


# ---- ImageFolder ----

def test_imagefolder_single_tree_stratified_split(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path, classes=("cat", "dog", "fox"), per_class=10)
    (root / "cat" / "notes.txt").write_text("not an image")
    splits = load_dataset("imagefolder", root, val_fraction=0.2, image_size=64)
    info = splits.info
    assert info.classes == ["cat", "dog", "fox"] and info.channels == 3 and info.size == 64 and not info.in_memory
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 6, 6)
    for part in (splits.val, splits.test):  # every class is represented in each held-out part
        assert sorted(lbl for _, lbl in part.samples) == [0, 0, 1, 1, 2, 2]
    paths = [{p for p, _ in s.samples} for s in (splits.train, splits.val, splits.test)]
    assert sum(map(len, paths)) == 30 and len(set.union(*paths)) == 30
    x, label = splits.train[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 10, 12)
    assert int(x[0, 0, 0]) == 20 * label + int(Path(splits.train.samples[0][0]).stem)


def test_imagefolder_split_is_seeded(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path, per_class=10)
    val = [load_dataset("imagefolder", root, seed=s, val_fraction=0.3).val.samples for s in (3, 3, 4)]
    assert val[0] == val[1] and val[0] != val[2]


def test_imagefolder_train_val_layout_and_mixed_formats(tmp_path: Path) -> None:
    write_image(tmp_path / "train" / "a" / "0.png", (12, 10))
    write_image(tmp_path / "train" / "a" / "1.jpg", (16, 8))
    write_image(tmp_path / "train" / "b" / "sub" / "0.PNG", (9, 9), mode="RGBA")
    write_image(tmp_path / "val" / "a" / "0.png", (7, 5), mode="L", value=77)  # grayscale must come out RGB
    write_image(tmp_path / "val" / "b" / "0.jpeg", (6, 6))
    splits = load_dataset("imagefolder", tmp_path)
    assert splits.info.classes == ["a", "b"] and len(splits.train) == 3 and len(splits.val) == 2
    assert splits.test.samples == splits.val.samples  # val/ doubles as the test set when there is no test/
    gray, label = splits.val[0]
    assert label == 0 and gray.shape == (3, 5, 7) and (gray == 77).all()
    assert [splits.train[i][0].shape for i in range(3)] == [(3, 10, 12), (3, 8, 16), (3, 9, 9)]


def test_imagefolder_val_class_must_exist_in_train(tmp_path: Path) -> None:
    write_image(tmp_path / "train" / "a" / "0.png")
    write_image(tmp_path / "val" / "zebra" / "0.png")
    with pytest.raises(DatasetError, match="zebra"):
        load_dataset("imagefolder", tmp_path)


def test_imagefolder_bad_roots(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("imagefolder", tmp_path / "missing")
    with pytest.raises(DatasetError, match="--data-root"):
        load_dataset("imagefolder", None)
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"no images found.*<class>/<image>"):
        load_dataset("imagefolder", tmp_path)


def test_imagefolder_corrupt_image_names_file(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, per_class=3)
    (tmp_path / "cat" / "000.png").write_bytes(b"not a png")
    ds = ImageFolderSplit([(str(tmp_path / "cat" / "000.png"), 0)], ["cat"])
    with pytest.raises(DatasetError, match="000.png"):
        ds[0]


def test_collate_uint8_stacks_or_lists() -> None:
    a, b = torch.zeros(3, 4, 5, dtype=torch.uint8), torch.ones(3, 6, 5, dtype=torch.uint8)
    stacked, labels = collate_uint8([(a, 1), (a, 2)])
    assert stacked.shape == (2, 3, 4, 5) and labels.tolist() == [1, 2] and labels.dtype == torch.int64
    listed, _ = collate_uint8([(a, 0), (b, 1)])
    assert isinstance(listed, list) and [t.shape[1] for t in listed] == [4, 6]


def test_make_loaders_imagefolder(tmp_path: Path) -> None:
    write_imagefolder(tmp_path / "train", per_class=4, size=(12, 10))
    write_imagefolder(tmp_path / "val", per_class=1, size=(12, 10))
    write_image(tmp_path / "val" / "cat" / "odd.png", (20, 14))
    splits = load_dataset("imagefolder", tmp_path)
    train, val, _ = make_loaders(splits, batch_size=5, device="cpu", seed=0,
                                 train_transform=lambda x: x[:, :8, :8])
    batches = list(train)
    assert len(batches) == 2 and all(x.shape == (5, 3, 8, 8) for x, _ in batches)  # drop_last on 12 images
    assert {i for _, y in batches for i in y.tolist()} <= {0, 1, 2}
    (images, labels), = list(val)
    assert isinstance(images, list) and len(images) == 4 and labels.dtype == torch.int64
    assert splits.val.transform is None  # augmentation only on the training split


# ---- TensorLoader ----

def _split(n: int) -> TensorSplit:
    return TensorSplit(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone(),
                       torch.arange(n, dtype=torch.int64))


def _epoch(loader: TensorLoader) -> list[int]:
    out = []
    for x, y in loader:
        assert x.dtype == torch.uint8 and torch.equal(x[:, 0, 0, 0].long(), y)  # images stay paired with labels
        out += y.tolist()
    return out


def test_tensor_loader_covers_every_sample_once() -> None:
    loader = TensorLoader(_split(23), 5, shuffle=True, seed=1)
    first, second = _epoch(loader), _epoch(loader)
    assert len(loader) == 5 and sorted(first) == sorted(second) == list(range(23))
    assert first != second  # reshuffled each epoch
    assert _epoch(TensorLoader(_split(23), 5)) == list(range(23))  # no shuffle: file order


def test_tensor_loader_drop_last() -> None:
    loader = TensorLoader(_split(23), 5, shuffle=True, drop_last=True)
    assert len(loader) == 4 and len(_epoch(loader)) == 20


def test_tensor_loader_order_depends_on_seed_and_epoch_only() -> None:
    a, b, c = (TensorLoader(_split(50), 8, shuffle=True, seed=s) for s in (7, 7, 8))
    first, second = _epoch(a), _epoch(a)
    assert first == _epoch(b) and first != _epoch(c)
    resumed = TensorLoader(_split(50), 8, shuffle=True, seed=7)
    resumed.set_epoch(1)  # a resumed run sees the same order as an uninterrupted one
    assert _epoch(resumed) == second


def test_make_loaders_in_memory(tmp_path: Path) -> None:
    splits = load_dataset("fashion_mnist", write_fashion_mnist(tmp_path, n_train=20, n_test=8))
    train, val, test = make_loaders(splits, batch_size=4, device="cpu", seed=0)
    assert all(isinstance(loader, TensorLoader) for loader in (train, val, test))
    assert len(train) == 4 and len(val) == 1 and len(test) == 2
    with pytest.raises(ValueError, match="train_batch"):
        make_loaders(splits, 4, "cpu", 0, train_transform=lambda x: x)


# ---- the real files ----

@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST not at {FASHION_MNIST_ROOT} (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist() -> None:
    splits = load_dataset("fashion_mnist")
    assert len(splits.train) + len(splits.val) == 60000 and len(splits.val) == 6000 and len(splits.test) == 10000
    assert splits.test.images.shape == (10000, 1, 28, 28) and len(splits.info.classes) == 10
    for part in (splits.train, splits.test):
        assert part.labels.min() == 0 and part.labels.max() == 9 and len(part.labels.unique()) == 10
    pixels = torch.cat([splits.train.images, splits.val.images]).float() / 255
    assert pixels.mean().item() == pytest.approx(splits.info.mean[0], abs=1e-3)
    assert pixels.std().item() == pytest.approx(splits.info.std[0], abs=1e-3)
