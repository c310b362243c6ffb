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
                                  "handler": {"max_answer_bytes": 16777216, "topk": 3, "runtime": "eager",
                                              "artifact": "artifact.json"}}


def test_handler_byte_limits_stay_within_the_frontend_limits():
    """A handler limit above the frontend's would never answer (the frontend's empty 413 comes first), and an
    answer above max_response_size would kill the worker: both are config errors."""
    with pytest.raises(ConfigError, match="max_image_bytes .* over the frontend's max_request_size"):
        parse_config(_with(torchserve__handler__max_image_bytes=32 * 1024 * 1024), "m/1.0.yaml")
    with pytest.raises(ConfigError, match="max_answer_bytes .* max_response_size"):
        parse_config(_with(torchserve__handler__max_answer_bytes=1 << 30), "m/1.0.yaml")


@pytest.mark.parametrize("changes, message", [
    ({"batch_size": 4}, "unknown key 'batch_size'"),
    ({"torchserve__maxBatchDelays": 5}, "unknown key 'torchserve.maxBatchDelays'"),
    ({"torchserve__handler__top_k": 5}, "unknown key 'torchserve.handler.top_k'"),
    ({"torchserve__handler__runtime": "eager"}, "torchserve.handler.runtime"),
    ({"torchserve__handler__artifact": "x.json"}, "'torchserve.handler.artifact' is not allowed; the archive step"),
    ({"artifact": {"calibration": "random"}}, "artifact.calibration must be one of dataset, synthetic"),
    ({"artifact": {"max_accuracy_drop": -1}}, "artifact.max_accuracy_drop must be a number of points >= 0, or null"),
    ({"artifact": {"calibration_imgs": 64}}, "unknown key 'artifact.calibration_imgs'"),
    ({"artifact": {"calibration_images": 0}}, "artifact.calibration_images must be an integer >= 1"),
    ({"checkpoint": None}, "missing required key 'checkpoint'"),
    ({"torchserve": None}, "missing required key 'torchserve'"),
    ({"torchserve__batchSize": None}, "missing required key 'torchserve.batchSize'"),
    ({"runtime": "openvino"}, "runtime must be one of eager, compile, onnx, bf16, int8, tensorrt"),
    ({"version": 1.0}, "version must be a quoted string"),
    ({"name": "bad name"}, "name must match"),
    ({"torchserve__deviceType": "tpu"}, "deviceType must be one of cpu, gpu"),
    ({"torchserve__batchSize": 0}, "torchserve.batchSize must be an integer >= 1"),
    ({"torchserve__maxWorkers": 2, "torchserve__minWorkers": 3}, "maxWorkers must be >= torchserve.minWorkers"),
    ({"torchserve__handler__topk": "five"}, "topk"),
    ({"torchserve__handler__max_image_pixels": 80_000_000}, "max_image_pixels (80000000) must be >= 1 and at most"),
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
            ("fmnist-se-resnet18", "1.0"), ("fmnist-vit-tiny", "1.0"), ("fmnist-video-seg-vit-tiny", "1.0"),
            ("fmnist-video-seg-vit-b16", "1.0")} <= names
    for c in configs:  # a video model says so in its name
        video = "video" in c.name
        assert c.handler == ROOT / "handlers" / ("segmenter.py" if video else "classifier.py")
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
    # eager runs the checkpoint itself; its recipe names no dataset, so nothing could be measured here
    assert indexed["artifact"] == {"note": "the checkpoint runs as it is (fp32 PyTorch)"}
    assert indexed["accuracy"] == {"measured": False, "reason": "the checkpoint's recipe names no dataset"}
    assert indexed["created"].endswith("+00:00")


def test_mar_is_self_contained(built):
    tmp, _ = built
    with zipfile.ZipFile(tmp / "store" / "tiny-1.0.mar") as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        model_config = yaml.safe_load(z.read("model-config.yaml"))
    for required in ("classifier.py", "tiny.pt", "model-config.yaml", "artifact.json", "handlers/__init__.py",
                     "handlers/pipeline.py", "handlers/decode.py", "handlers/artifacts.py", "training/__init__.py",
                     "training/checkpoint.py", "training/presets.py", "training/evaluate.py",
                     "training/models/__init__.py", "training/models/_registry.py", "training/models/cnn.py"):
        assert required in names, required
    assert any(n.startswith("training/models/layers/") for n in names)
    # Training-only code (data loading included: a worker never reads training data) and the handlers' second
    # copies stay out of the archive.
    assert not names & {"training/train.py", "training/recipe.py", "training/data.py", "training/calibration.py",
                        "handlers/classifier.py", "handlers/segmenter.py"}
    assert not any("recipes/" in n or "__pycache__" in n for n in names)
    assert manifest["model"] == {**manifest["model"], "modelName": "tiny", "modelVersion": "1.0",
                                 "handler": "classifier.py", "serializedFile": "tiny.pt"}
    assert model_config["batchSize"] == 8
    assert model_config["handler"] == {"max_answer_bytes": 16777216, "topk": 3, "runtime": "eager",
                                       "artifact": "artifact.json"}


def test_same_inputs_give_the_same_archive_bytes(built, tmp_path):
    """Reproducible: another store (another machine, another day) gets a byte-identical .mar."""
    tmp, first = built
    again = tiny_archive(tmp_path / "store", tmp_path / "configs", "tiny", "1.0", tmp / "tiny.pt", batchSize=8)
    assert again["sha256"] == first["sha256"] == sha256_file(tmp_path / "store" / "tiny-1.0.mar")
    with zipfile.ZipFile(tmp_path / "store" / "tiny-1.0.mar") as z:
        assert [i.date_time for i in z.infolist()] == [(1980, 1, 1, 0, 0, 0)] * len(z.infolist())
        assert z.namelist() == sorted(z.namelist())


def test_rearchiving_the_same_inputs_changes_nothing(built):
    tmp, first = built
    mar = tmp / "store" / "tiny-1.0.mar"
    before = mar.stat().st_mtime_ns, (tmp / "store" / "index.json").read_text()
    again = tiny_archive(tmp / "store", tmp / "configs", "tiny", "1.0", tmp / "tiny.pt", batchSize=8)
    assert again["unchanged"] and again["sha256"] == first["sha256"] and again["created"] == first["created"]
    assert (mar.stat().st_mtime_ns, (tmp / "store" / "index.json").read_text()) == before


def test_an_archived_version_is_immutable_unless_replaced(built):
    tmp, first = built
    store = tmp / "store"
    before = sha256_file(store / "tiny-1.0.mar"), (store / "index.json").read_text()
    with pytest.raises(ArchiveError, match=r"tiny 1.0 is already archived .*model-config.*versions are immutable.*"
                                           r"--replace"):
        tiny_archive(store, tmp / "configs", "tiny", "1.0", tmp / "tiny.pt", batchSize=2)
    assert (sha256_file(store / "tiny-1.0.mar"), (store / "index.json").read_text()) == before
    other = tiny_checkpoint(tmp / "other.pt", seed=5)
    with pytest.raises(ArchiveError, match="other inputs \\(checkpoint\\)"):
        tiny_archive(store, tmp / "configs", "tiny", "1.0", other, batchSize=8)

    cfg = load_config(tmp / "configs" / "tiny" / "1.0.yaml")  # still batchSize 8: back to the first inputs
    cfg.torchserve["batchSize"] = 2
    with pytest.raises(ArchiveError, match="registered on the running server"):
        build_archive(cfg, store, replace=True, registered=lambda name, version: True)
    replaced = build_archive(cfg, store, replace=True, registered=lambda name, version: False)
    [indexed] = [e for e in read_index(store) if e["version"] == "1.0"]
    assert indexed == replaced and replaced["sha256"] != first["sha256"]
    assert [(r["sha256"], r["created"]) for r in replaced["replaced"]] == [(first["sha256"], first["created"])]
    tiny_archive(store, tmp / "configs", "tiny", "1.10", tmp / "tiny.pt")
    assert [(e["name"], e["version"]) for e in read_index(store)] == [("tiny", "1.0"), ("tiny", "1.10")]


def test_cli_archive_refuses_a_changed_version_and_replaces_when_told(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "t.pt")
    tiny_archive(tmp_path / "store", tmp_path / "configs", "tiny", "1.0", ckpt)
    tiny_checkpoint(ckpt, seed=3)  # the same path, other weights
    cmd = [sys.executable, "-m", "serving", "archive", "--config", str(tmp_path / "configs" / "tiny" / "1.0.yaml"),
           "--store", str(tmp_path / "store"), "--runtime-dir", str(tmp_path / "no-server")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "already archived" in r.stderr and "--replace" in r.stderr, r.stderr
    r = subprocess.run([*cmd, "--replace"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "; replaced;" in r.stdout, r.stderr
    r = subprocess.run([*cmd, "--replace"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "; unchanged;" in r.stdout, r.stderr


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
    assert r.stderr.strip() == f"error: {path}: unknown key 'maxWorkerz' (allowed: artifact, checkpoint, " \
                               "description, handler, name, runtime, torchserve, version)"
    assert not Path(tmp_path / "store").exists()


def test_archive_configs_cite_only_committed_evidence():
    """A figure quoted in an archive config's comments (e.g. "3.16x") is in a committed docs/*.json, and every
    docs/ file it cites exists."""
    import re

    figures = " ".join((ROOT / "docs" / p).read_text() for p in subprocess.run(
        ["git", "ls-files", "*.json"], cwd=ROOT / "docs", capture_output=True, text=True).stdout.split())
    for path in find_configs():
        comments = " ".join(line for line in path.read_text().splitlines() if line.lstrip().startswith("#"))
        for cited in re.findall(r"docs/[\w.-]+\.(?:md|json)", comments):
            assert (ROOT / cited).is_file(), f"{path}: cites {cited}, which does not exist"
        for figure in re.findall(r"(\d+(?:\.\d+)?)x\b", comments):
            assert re.search(rf'": {re.escape(figure)}\d*[,\n}}]', figures), f"{path}: {figure}x is in no docs/*.json"


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
