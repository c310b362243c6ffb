"""Shared pytest setup: the repo root on sys.path so `training`, `handlers` and `serving` import."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# -- a real TorchServe for integration, load and reliability tests (see tests/torchserve.py) --------------------
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """A model store with two archived versions of a random-weight LeNet-5 named "tiny": 1.0 leans to class 2,
    2.0 to class 7 (labels "v1.0-class<i>" / "v2.0-class<i>"), so answers show which version served them."""
    from tests.torchserve import tiny_archive, tiny_checkpoint

    tmp = tmp_path_factory.mktemp("tiny-store")
    for version, favour in (("1.0", 2), ("2.0", 7)):
        ckpt = tiny_checkpoint(tmp / f"tiny-{version}.pt", seed=int(float(version)), favour=favour,
                               classes=[f"v{version}-class{i}" for i in range(10)])
        tiny_archive(tmp / "store", tmp / "configs", "tiny", version, ckpt)
    return tmp / "store"


@pytest.fixture(scope="session")
def torchserve(tiny_store, tmp_path_factory):
    """One real TorchServe for the session with tiny 1.0 registered (and default). Tests that change versions
    or workers must put them back; tests that need their own state start their own `TorchServe`."""
    import shutil

    from tests.torchserve import TorchServe

    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java (run make setup)")
    with TorchServe(tiny_store, tmp_path_factory.mktemp("torchserve"), models=[("tiny", "1.0")]) as ts:
        yield ts
