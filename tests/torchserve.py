"""A real TorchServe for tests, load tests and reliability checks (no pytest needed).

    with TorchServe(store, tmpdir, models=[("fmnist-lenet5", "1.0")]) as ts:  # free ports, own runtime dir
        ts.client.register("fmnist-lenet5", "2.0")  # serving.manage.Client (sha256-checked register)
        r = ts.infer.post(f"{ts.inference_url}/predictions/fmnist-lenet5", data=png_bytes)
        ts.mgmt.get(f"{ts.management_url}/models")

`infer` / `mgmt` are requests sessions carrying the inference / management bearer token. The server (Java
frontend and its Python workers) is stopped on exit, also when the body raised.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from load_tests.report import metric  # noqa: E402, F401  (the tests read Prometheus text with it)
from serving import server  # noqa: E402
from serving.manage import Client  # noqa: E402
from serving.server import free_ports  # noqa: E402


class TorchServe:
    """Start a real TorchServe on free (or given) ports with its runtime dir under `tmpdir`."""

    def __init__(self, store: str | Path, tmpdir: str | Path, ports: tuple[int, ...] | None = None,
                 extra_config: dict[str, Any] | None = None, timeout: float = 120.0,
                 models: list[tuple[str, str]] | None = None):
        """ports: (inference, management, metrics[, grpc_inference, grpc_management]); missing ones are free
        ports picked here. models: [(name, version)] registered from the store once the server is up."""
        self.models = models
        self.store = Path(store).resolve()
        self.runtime_dir = Path(tmpdir).resolve() / "ts-runtime"
        ports = tuple(ports or ())
        self.ports = server.Ports(*(ports + tuple(free_ports(5 - len(ports)))))
        self.extra_config, self.timeout = extra_config, timeout
        self.ep: server.Endpoints | None = None

    def start(self) -> TorchServe:
        self.ep = server.start(self.store, self.runtime_dir, self.ports, self.extra_config, self.timeout,
                               self.models)
        self.infer = self._session(self.ep.inference_key)
        self.mgmt = self._session(self.ep.management_key)
        self.client = Client(self.runtime_dir, self.store)
        return self

    def stop(self) -> None:
        server.stop(self.runtime_dir)
        for s in (getattr(self, "infer", None), getattr(self, "mgmt", None)):
            if s is not None:
                s.close()

    def __enter__(self) -> TorchServe:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def _session(token: str) -> requests.Session:
        s = requests.Session()
        s.headers["Authorization"] = f"Bearer {token}"
        return s

    @property
    def inference_url(self) -> str:
        return self.ep.inference_url

    @property
    def management_url(self) -> str:
        return self.ep.management_url

    @property
    def metrics_url(self) -> str:
        return self.ep.metrics_url

    @property
    def tokens(self) -> dict[str, str]:
        return {"inference": self.ep.inference_key, "management": self.ep.management_key, "api": self.ep.api_key}

    def log_tail(self, n: int = 40) -> str:
        return server.log_tail(self.runtime_dir, n)


# -- tiny archives for tests ------------------------------------------------------------------------------------
def tiny_checkpoint(path: str | Path, seed: int = 0, favour: int | None = None, classes: list[str] | None = None,
                    bias: float = 3.0) -> Path:
    """A random-weight LeNet-5 checkpoint for 28x28 gray images. `favour` adds `bias` to one class's logit so
    two checkpoints give different top-1 answers while their probabilities stay far from 0 and 1."""
    import torch

    from training.checkpoint import save_checkpoint
    from training.models import get_model
    from training.presets import make_preprocess

    torch.manual_seed(seed)
    args = {"num_classes": 10, "in_channels": 1, "img_size": 28}
    model = get_model("lenet5", **args)
    if favour is not None:
        with torch.no_grad():
            model.classifier[-1].bias[favour] += bias
    ckpt = {"arch": "lenet5", "model_args": args, "state_dict": model.state_dict(),
            "classes": classes or [f"class{i}" for i in range(10)],
            "preprocess": make_preprocess(28, 1, [0.2860], [0.3530], background=(0, 0, 0)),  # as Fashion-MNIST
            "metrics": {"test_acc": 0.1, "seed": seed},
            "recipe": {"name": "tiny-test"}}
    return save_checkpoint(ckpt, path)


def tiny_archive(store: str | Path, configs_dir: str | Path, name: str, version: str, checkpoint: str | Path,
                 handler_file: str = "handlers/classifier.py", **torchserve: Any) -> dict[str, Any]:
    """Write <configs_dir>/<name>/<version>.yaml for `checkpoint` and build its .mar into `store` (the
    repository's handler entry file `handler_file`). `torchserve` overrides the model-config (defaults: batch 4
    / 10 ms, one worker)."""
    import yaml

    from serving.archive import build_archive
    from serving.config import load_config

    block = {"batchSize": 4, "maxBatchDelay": 10, "minWorkers": 1, "maxWorkers": 2, "responseTimeout": 60,
             "deviceType": "cpu", "handler": {"topk": 3}, **torchserve}
    path = Path(configs_dir) / name / f"{version}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"name": name, "version": version, "checkpoint": str(Path(checkpoint).resolve()),
                                    "handler": handler_file, "runtime": "eager", "description": "tiny test model",
                                    "torchserve": block}))
    return build_archive(load_config(path), store)


def gray_png(seed: int = 0, size: int = 28) -> bytes:
    """A Fashion-MNIST-like 28x28 grayscale PNG: a bright blob on a dark background plus noise."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    blob = 220 * np.exp(-(((x - size / 2) / (size / 4)) ** 2 + ((y - size / 2) / (size / 3)) ** 2))
    img = np.clip(blob + rng.normal(0, 12, (size, size)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img, "L").save(buf, "PNG")
    return buf.getvalue()


def resign_archive(store: str | Path, name: str, version: str, changes: dict[str, bytes]) -> str:
    """Replace members of <name>-<version>.mar and record the new sha256 in its .sha256 file and index.json, as
    someone with write access to the store could: the register-time check passes, so whatever still guards the
    archive's contents must be inside it. Returns the new sha256."""
    import json
    import zipfile

    from serving.archive import INDEX_NAME, sha256_file

    store = Path(store)
    mar = store / f"{name}-{version}.mar"
    tmp = mar.with_suffix(".tmp")
    with zipfile.ZipFile(mar) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info, changes.get(info.filename, zin.read(info.filename)))
    tmp.replace(mar)
    sha = sha256_file(mar)
    (store / f"{mar.name}.sha256").write_text(f"{sha}  {mar.name}\n")
    index = json.loads((store / INDEX_NAME).read_text())
    for e in index:
        if (e["name"], e["version"]) == (name, version):
            e["sha256"] = sha
    (store / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return sha
