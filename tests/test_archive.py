"""Archive configs are validated strictly, and the archive step produces a self-contained .mar, its checksum
and an index entry."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from serving.archive import ArchiveError, build_archive, read_index, sha256_file
from serving.config import ConfigError, find_configs, load_config, parse_config
from tests.torchserve import ROOT, tiny_archive, tiny_checkpoint

VALID = {
    "name": "m", "version": "1.0", "checkpoint": "checkpoints/x.pt", "runtime": "eager", "description": "d",
    "torchserve": {"batchSize": 4, "maxBatchDelay": 10, "minWorkers": 1, "maxWorkers": 2, "responseTimeout": 30,
                   "deviceType": "cpu", "handler": {"topk": 3}},
}


def _with(**changes) -> dict:
    cfg = json.loads(json.dumps(VALID))
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = cfg
        for p in parents:
            node = node[p]
        if value is None:
            del node[key]
        else:
            node[key] = value
    return cfg


def test_valid_config_builds_model_config():
    cfg = parse_config(VALID, "m/1.0.yaml")
    assert cfg.handler == ROOT / "handlers" / "classifier.py"
    assert cfg.checkpoint == ROOT / "checkpoints" / "x.pt"
    assert cfg.model_config() == {"batchSize": 4, "maxBatchDelay": 10, "minWorkers": 1, "maxWorkers": 2,
                                  "responseTimeout": 30, "deviceType": "cpu",
                                  "handler": {"topk": 3, "runtime": "eager"}}


@pytest.mark.parametrize("changes, message", [
    ({"batch_size": 4}, "unknown key 'batch_size'"),
    ({"torchserve__maxBatchDelays": 5}, "unknown key 'torchserve.maxBatchDelays'"),
    ({"torchserve__handler__top_k": 5}, "unknown key 'torchserve.handler.top_k'"),
    ({"torchserve__handler__runtime": "eager"}, "torchserve.handler.runtime"),
    ({"checkpoint": None}, "missing required key 'checkpoint'"),
    ({"torchserve": None}, "missing required key 'torchserve'"),
    ({"torchserve__batchSize": None}, "missing required key 'torchserve.batchSize'"),
    ({"runtime": "tensorrt"}, "runtime must be one of eager, compile, onnx, bf16, int8"),
    ({"version": 1.0}, "version must be a quoted string"),
    ({"name": "bad name"}, "name must match"),
    ({"torchserve__deviceType": "tpu"}, "deviceType must be one of cpu, gpu"),
    ({"torchserve__batchSize": 0}, "torchserve.batchSize must be an integer >= 1"),
    ({"torchserve__maxWorkers": 2, "torchserve__minWorkers": 3}, "maxWorkers must be >= torchserve.minWorkers"),
    ({"torchserve__handler__topk": "five"}, "topk"),
    ({"handler": "handlers/unknown.py"}, "no pipeline for handler 'unknown.py'"),
])
def test_invalid_configs_name_file_and_key(changes, message):
    with pytest.raises(ConfigError) as e:
        parse_config(_with(**changes), "archive_configs/m/1.0.yaml")
    assert message in str(e.value)
    assert str(e.value).startswith("archive_configs/m/1.0.yaml:")


@pytest.mark.parametrize("runtime", ["eager", "compile", "onnx", "bf16", "int8"])
def test_every_runtime_name_validates(runtime):
    assert parse_config(_with(runtime=runtime)).model_config()["handler"]["runtime"] == runtime


def test_file_location_must_match_name_and_version(tmp_path):
    path = tmp_path / "m" / "2.0.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(VALID))
    with pytest.raises(ConfigError, match="name/version mismatch"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "m" / "9.9.yaml")


def test_shipped_configs_are_valid():
    configs = [load_config(p) for p in find_configs()]
    names = {(c.name, c.version) for c in configs}
    assert {("fmnist-lenet5", "1.0"), ("fmnist-lenet5", "2.0"), ("fmnist-resnet18", "1.0"),
            ("fmnist-se-resnet18", "1.0"), ("fmnist-vit-tiny", "1.0")} <= names
    for c in configs:
        assert c.handler == ROOT / "handlers" / "classifier.py"
        assert c.checkpoint.parent == ROOT / "checkpoints"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("archive")
    ckpt = tiny_checkpoint(tmp / "tiny.pt", seed=0)
    entry = tiny_archive(tmp / "store", tmp / "configs", "tiny", "1.0", ckpt, batchSize=8)
    return tmp, entry


def test_archive_writes_mar_checksum_and_index(built):
    tmp, entry = built
    store = tmp / "store"
    mar = store / "tiny-1.0.mar"
    assert entry["mar"] == mar.name and mar.is_file()
    digest = sha256_file(mar)
    assert (store / "tiny-1.0.mar.sha256").read_text() == f"{digest}  tiny-1.0.mar\n"  # sha256sum -c format
    [indexed] = read_index(store)
    assert indexed == entry
    assert indexed["sha256"] == digest and indexed["arch"] == "lenet5" and indexed["runtime"] == "eager"
    assert indexed["metrics"] == {"test_acc": 0.1, "seed": 0}
    assert indexed["created"].endswith("+00:00")


def test_mar_is_self_contained(built):
    tmp, _ = built
    with zipfile.ZipFile(tmp / "store" / "tiny-1.0.mar") as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        model_config = yaml.safe_load(z.read("model-config.yaml"))
    for required in ("classifier.py", "tiny.pt", "model-config.yaml", "handlers/__init__.py", "handlers/pipeline.py",
                     "handlers/decode.py", "training/__init__.py", "training/checkpoint.py", "training/presets.py",
                     "training/evaluate.py", "training/data.py", "training/models/__init__.py",
                     "training/models/_registry.py", "training/models/cnn.py"):
        assert required in names, required
    assert any(n.startswith("training/models/layers/") for n in names)
    # Training-only code and the handler's second copy stay out of the archive.
    assert not names & {"training/train.py", "training/recipe.py", "handlers/classifier.py"}
    assert not any("recipes/" in n or "__pycache__" in n for n in names)
    assert manifest["model"] == {**manifest["model"], "modelName": "tiny", "modelVersion": "1.0",
                                 "handler": "classifier.py", "serializedFile": "tiny.pt"}
    assert model_config["batchSize"] == 8 and model_config["handler"] == {"topk": 3, "runtime": "eager"}


def test_rearchive_replaces_the_index_entry(built):
    tmp, first = built
    entry = tiny_archive(tmp / "store", tmp / "configs", "tiny", "1.0", tmp / "tiny.pt", batchSize=2)
    tiny_archive(tmp / "store", tmp / "configs", "tiny", "1.10", tmp / "tiny.pt")
    index = read_index(tmp / "store")
    assert [(e["name"], e["version"]) for e in index] == [("tiny", "1.0"), ("tiny", "1.10")]
    assert index[0]["sha256"] == entry["sha256"] != first["sha256"]  # a different model-config, a different .mar


def test_pickled_code_checkpoint_is_refused(tmp_path):
    torch.save({"arch": "lenet5", "args": argparse.Namespace(x=1)}, tmp_path / "evil.pt")
    cfg = parse_config(_with(checkpoint=str(tmp_path / "evil.pt")), "m/1.0.yaml")
    with pytest.raises(ArchiveError, match="not usable.*weights-only"):
        build_archive(cfg, tmp_path / "store")
    assert not (tmp_path / "store" / "m-1.0.mar").exists()


def test_cli_reports_config_errors_in_one_line(tmp_path):
    path = tmp_path / "m" / "1.0.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(_with(maxWorkerz=2)))
    r = subprocess.run([sys.executable, "-m", "serving", "archive", "--config", str(path), "--store",
                        str(tmp_path / "store")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: {path}: unknown key 'maxWorkerz' (allowed: checkpoint, description, " \
                               "handler, name, runtime, torchserve, version)"
    assert not Path(tmp_path / "store").exists()


def test_hints_for_an_untrained_or_unarchived_version_are_commands(tmp_path):
    """Every hint names the exact command, recipe and paths filled in; never a literal `...`."""
    from serving.archive import archive_all
    from serving.config import archive_hint
    from training.commands import python_command

    py = python_command()
    configs, ck = tmp_path / "configs", tmp_path / "ck" / "vit_tiny-fashion_mnist.pt"
    path = configs / "m" / "1.0.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(_with(checkpoint=str(ck))))
    train = f"{py} -m training train --recipe vit_tiny_fmnist --out {ck}"
    assert archive_hint("m", "1.0", tmp_path / "store", configs) == (
        f"train and archive it: {train} && {py} -m serving archive --config {path} --store {tmp_path / 'store'}")
    assert archive_hint("m", None, None, configs).endswith(f"-m serving archive --config {path}")  # highest
    built, skipped = archive_all([path], tmp_path / "store", skip_missing=True)
    assert built == [] and skipped == [f"skipped m 1.0: no checkpoint {ck}; train it first: {train}"]
    with pytest.raises(ArchiveError, match=f"not found; train it first: {re.escape(train)}$"):
        archive_all([path], tmp_path / "store")
    tiny_checkpoint(ck)
    assert archive_hint("m", "1.0", None, configs) == f"archive it: {py} -m serving archive --config {path}"
    assert archive_hint("m", "2.0", None, configs) == "m has no archive config for version 2.0 (configured: 1.0)"
    assert archive_hint("x", "1.0", None, configs).endswith("(configured models: m)")
    # The CLI: serving a model that has no archive names the commands that build it.
    r = subprocess.run([sys.executable, "-m", "serving", "serve", "--models", "fmnist-lenet5", "--store",
                        str(tmp_path / "store")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "..." not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"it: {py} -m " in r.stderr
    assert f"-m serving archive --config archive_configs/fmnist-lenet5/2.0.yaml --store {tmp_path / 'store'}" \
        in r.stderr
