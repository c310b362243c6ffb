"""What runs is what was archived: the archive step builds the onnx/int8 artifact once (int8 calibrated on a
seeded sample of the training split), measures it on the test split and packs it with a manifest; a worker
checks and loads it, needing neither the training data nor a writable cache. Real TorchServe servers serve it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import handlers.runtimes as runtimes
import training.data
from handlers.artifacts import ArtifactError, require_artifact, verify_artifact
from handlers.image import ImagePipeline
from handlers.runtimes import SYNTHETIC_WARNING
from serving.archive import ArchiveError, build_archive, read_index, sha256_file
from serving.artifacts import ArtifactBuildError, _accuracy
from serving.config import load_config
from serving.manage import ServingError
from tests.torchserve import ROOT, TorchServe, gray_png, resign_archive
from training.calibration import CalibrationError, calibration_set, measure
from training.checkpoint import build_model, load_checkpoint
from training.data import FASHION_MNIST_ROOT

pytestmark = pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).is_dir(), reason="needs the Fashion-MNIST package")
ACCURACY_IMAGES = 2000  # of the 10,000 test images: enough to see a lost point, quick on 2 cores


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """LeNet-5 after one short epoch on 3,000 Fashion-MNIST images (about 70 % test accuracy, seconds on CPU):
    a model whose accuracy int8 could lose, with a recipe that names its dataset."""
    from training.recipe import load_recipe
    from training.train import train

    out = tmp_path_factory.mktemp("trained") / "lenet5.pt"
    train(load_recipe("default", {"epochs": 1, "limit": 3000}), out, log_dir=None, progress=False)
    return out


def write_config(configs: Path, name: str, version: str, checkpoint: Path, runtime: str, **artifact) -> Path:
    path = configs / name / f"{version}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        "name": name, "version": version, "checkpoint": str(checkpoint), "runtime": runtime,
        "artifact": {"accuracy_images": ACCURACY_IMAGES, **artifact},
        "torchserve": {"batchSize": 4, "maxBatchDelay": 5, "minWorkers": 1, "maxWorkers": 1, "responseTimeout": 60,
                       "deviceType": "cpu", "handler": {"topk": 10}}}))
    return path


@pytest.fixture(scope="module")
def archived(trained, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("artifacts")
    store, configs = tmp / "store", tmp / "configs"
    entry = build_archive(load_config(write_config(configs, "fm", "1.0", trained, "int8")), store)
    unpacked = tmp / "unpacked"
    with zipfile.ZipFile(store / entry["mar"]) as z:
        z.extractall(unpacked)
    return SimpleNamespace(store=store, configs=configs, entry=entry, unpacked=unpacked, tmp=tmp, ckpt=trained)


# -- the archive step -------------------------------------------------------------------------------------------
def test_int8_archive_packs_the_calibrated_graph_with_its_measured_accuracy(archived):
    entry, unpacked = archived.entry, archived.unpacked
    manifest = json.loads((unpacked / "artifact.json").read_text())
    assert manifest["file"] == "model.int8.onnx" and manifest["sha256"] == sha256_file(unpacked / "model.int8.onnx")
    assert manifest["checkpoint_sha256"] == sha256_file(archived.ckpt)
    assert not (unpacked / "model.fp32.onnx").exists() and not (unpacked / "training" / "data.py").exists()
    calibration = manifest["calibration"]
    assert (calibration["source"], calibration["images"], calibration["seed"]) == ("fashion_mnist:train", 64, 0)
    # index.json: the int8 figure measured at archive time next to the fp32 one, same images
    acc = entry["accuracy"]
    assert acc["metric"] == "top1" and acc["split"] == "fashion_mnist:test" and acc["images"] == ACCURACY_IMAGES
    assert 0.5 < acc["fp32"] < 1 and acc["runtime"] == "int8" and acc["budget_pt"] == 0.5
    assert acc["drop_pt"] == round(100 * (acc["fp32"] - acc["int8"]), 2) <= 0.5
    assert entry["artifact"] == {"file": "model.int8.onnx", "sha256": manifest["sha256"], "calibration": calibration}
    assert read_index(archived.store)[0]["accuracy"] == acc == manifest["accuracy"]


def test_an_int8_archive_is_reproducible(archived, tmp_path):
    """The same config and checkpoint, archived elsewhere, give the same bytes: calibration, quantization and
    the zip are deterministic, so the sha256 identifies the model on every machine."""
    again = build_archive(load_config(archived.configs / "fm" / "1.0.yaml"), tmp_path / "store")
    assert again["sha256"] == archived.entry["sha256"]


def test_the_recorded_accuracy_is_the_artifacts_own(archived):
    """Measured again here on the unpacked artifact (not on the checkpoint), the figure is the recorded one."""
    pipe = ImagePipeline.from_file(archived.unpacked / archived.ckpt.name, runtime="int8", artifact="artifact.json")
    ckpt = load_checkpoint(archived.ckpt)
    assert measure(pipe.forward, ckpt, limit=ACCURACY_IMAGES)["value"] == archived.entry["accuracy"]["int8"]


def test_an_artifact_over_its_accuracy_budget_is_refused(archived):
    cfg = load_config(write_config(archived.configs, "fm", "9.0", archived.ckpt, "int8"))
    ckpt = load_checkpoint(archived.ckpt)
    worse = build_model(ckpt)
    with torch.no_grad():  # a real model that answers class 0 far more often: many points lost
        worse.classifier[-1].bias[0] += 8.0
    with pytest.raises(ArtifactBuildError, match=r"points lost, over the budget of 0.5 \(artifact.max_accuracy_drop"):
        _accuracy(cfg, ckpt, build_model(ckpt), worse, None)
    cfg.artifact.max_accuracy_drop = None  # "unless the config says otherwise"
    assert _accuracy(cfg, ckpt, build_model(ckpt), worse, None)["drop_pt"] > 10


def test_int8_without_the_training_data_is_refused_at_archive_time(archived, tmp_path):
    cfg = load_config(write_config(tmp_path, "fm", "2.0", archived.ckpt, "int8"))
    with pytest.raises(ArchiveError, match="int8 calibration reads the checkpoint's training data.*--data-root"):
        build_archive(cfg, tmp_path / "store", data_root=str(tmp_path / "no-data"))
    assert not (tmp_path / "store" / "fm-2.0.mar").exists()


def test_calibration_is_a_stated_seeded_sample_of_the_training_split(archived):
    ckpt = load_checkpoint(archived.ckpt)
    a, about_a = calibration_set(ckpt, 64, seed=0)
    b, about_b = calibration_set(ckpt, 64, seed=0)
    c, about_c = calibration_set(ckpt, 64, seed=1)
    assert about_a == about_b and all(torch.equal(x, y) for x, y in zip(a, b))
    assert about_c["indices_sha256"] != about_a["indices_sha256"] and not torch.equal(a[0], c[0])
    assert [len(x) for x in a] == [16] * 4 and a[0].shape[1:] == (1, 28, 28)
    # A task without a source is a clear error, not a silent fallback.
    with pytest.raises(CalibrationError, match="no calibration source for task 'detection'"):
        calibration_set({**ckpt, "task": "detection"}, 64, 0)
    with pytest.raises(CalibrationError, match="no test metric for task 'detection'"):
        measure(lambda x: x, {**ckpt, "task": "detection"})


# -- loading in a worker ----------------------------------------------------------------------------------------
def test_a_worker_loads_the_packed_artifact_without_data_or_cache(archived, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a worker must not read training data or build an artifact")

    for target in (training.data, "load_dataset"), (runtimes, "export_onnx"), (runtimes, "quantize_onnx"):
        monkeypatch.setattr(*target, forbidden)
    (tmp_path / "file").write_text("")  # a cache path below a file: nothing can be written there
    pipe = ImagePipeline.from_file(archived.unpacked / archived.ckpt.name, runtime="int8", artifact="artifact.json",
                                   runtime_cache=str(tmp_path / "file" / "cache"))
    info = pipe.describe()["runtime_info"]
    assert info["artifact"] == "model.int8.onnx" and info["artifact_sha256"] == archived.entry["artifact"]["sha256"]
    assert info["calibration"]["source"] == "fashion_mnist:train" and info["accuracy"] == archived.entry["accuracy"]
    assert "warning" not in info and "version_warning" not in info


def test_a_worker_on_other_software_than_the_archive_says_so(archived, monkeypatch, caplog):
    """The recorded accuracy was measured with the ONNX Runtime in the manifest (`built_with`); a worker running
    another one loads the artifact and says so in its log and in `describe`."""
    versions = runtimes.builder_versions()
    monkeypatch.setattr(runtimes, "builder_versions", lambda: {**versions, "onnxruntime": "9.9.9"})
    with caplog.at_level("WARNING", logger="handlers.runtimes"):
        pipe = ImagePipeline.from_file(archived.unpacked / archived.ckpt.name, runtime="int8", artifact="artifact.json")
    info = pipe.describe()["runtime_info"]
    assert info["built_with"]["onnxruntime"] == versions["onnxruntime"]
    assert info["version_warning"].startswith(f"built and measured with onnxruntime {versions['onnxruntime']}, "
                                              "running on onnxruntime 9.9.9")
    assert info["version_warning"] in caplog.text


def test_a_changed_artifact_or_checkpoint_is_refused_at_load(archived, tmp_path):
    work = tmp_path / "model"
    shutil.copytree(archived.unpacked, work)
    manifest = work / "artifact.json"
    ckpt_sha = sha256_file(work / archived.ckpt.name)
    verify_artifact(manifest, "int8", ckpt_sha)  # intact
    with pytest.raises(ArtifactError, match="built for runtime 'int8', not 'onnx'"):
        verify_artifact(manifest, "onnx", ckpt_sha)
    with pytest.raises(ArtifactError, match="the checkpoint's sha256 .* is not the .* refusing to load"):
        verify_artifact(manifest, "int8", "0" * 64)
    with open(work / "model.int8.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="model.int8.onnx has sha256 .* changed after the archive was built"):
        verify_artifact(manifest, "int8", ckpt_sha)
    (work / "model.int8.onnx").unlink()
    with pytest.raises(ArtifactError, match="model.int8.onnx named in artifact.json is missing"):
        verify_artifact(manifest, "int8", ckpt_sha)
    manifest.unlink()
    with pytest.raises(ArtifactError, match="the archive has no artifact.json"):
        verify_artifact(manifest, "int8", ckpt_sha)
    # An archive with no manifest at all (built before artifacts were packed, or by hand): a worker refuses.
    with pytest.raises(ArtifactError, match="carries no built int8 artifact"):
        require_artifact({"runtime": "int8"})
    require_artifact({"runtime": "eager"})


# -- real TorchServe servers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers(archived, tmp_path_factory):
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java (run make setup)")
    tmp = tmp_path_factory.mktemp("two-servers")
    (tmp / "file").write_text("")
    env = pytest.MonkeyPatch()
    env.setenv("VISION_SERVE_CACHE", str(tmp / "file" / "cache"))  # the workers cannot write a cache
    try:
        with TorchServe(archived.store, tmp / "a", models=[("fm", "1.0")]) as a, \
                TorchServe(archived.store, tmp / "b", models=[("fm", "1.0")]) as b:
            yield a, b
    finally:
        env.undo()


def test_two_servers_from_one_mar_give_identical_answers(servers):
    a, b = servers
    for seed in range(6):
        answers = [ts.infer.post(f"{ts.inference_url}/predictions/fm", data=gray_png(seed=seed), timeout=60)
                   for ts in (a, b)]
        assert [r.status_code for r in answers] == [200, 200], answers[0].text
        assert answers[0].json() == answers[1].json()  # every probability, bit for bit


def test_describe_shows_what_the_worker_loaded_and_its_accuracy(servers, archived):
    a, _ = servers
    [desc] = a.client.describe_full("fm", "1.0")
    worker = desc["customizedMetadata"]["runtime_info"]
    assert worker["artifact_sha256"] == archived.entry["artifact"]["sha256"]
    assert worker["calibration"]["source"] == "fashion_mnist:train"
    assert desc["archive"]["accuracy"]["int8"] == archived.entry["accuracy"]["int8"]
    assert worker["built_with"] == runtimes.builder_versions() and "warning" not in worker


def test_a_tampered_artifact_inside_a_mar_is_refused(servers, archived):
    """The .mar re-signed after its int8 graph was swapped for another (here: the file with one byte changed):
    the register-time sha256 check passes, the worker's artifact check does not, and the version never serves."""
    a, _ = servers
    build_archive(load_config(write_config(archived.configs, "fm", "3.0", archived.ckpt, "int8")), archived.store)
    with zipfile.ZipFile(archived.store / "fm-3.0.mar") as z:
        graph = bytearray(z.read("model.int8.onnx"))
    graph[-1] ^= 0xFF
    resign_archive(archived.store, "fm", "3.0", {"model.int8.onnx": bytes(graph)})
    with pytest.raises(ServingError, match="0/1 workers READY"):
        a.client.register("fm", "3.0", ready_timeout=25)
    assert not a.client.is_registered("fm", "3.0")
    log = (a.runtime_dir / "logs" / "model_log.log").read_text()
    assert "was changed after the archive was built; refusing to load" in log


def test_int8_calibrated_on_synthetic_images_says_so_in_the_worker_log_and_describe(servers, archived, caplog):
    """`artifact.calibration: synthetic` (random-weight benchmark models): warned about when the archive is built,
    recorded in index.json, and at load in the worker's log and in `describe` (its JSON and a line on stderr)."""
    a, _ = servers
    cfg = load_config(write_config(archived.configs, "fm", "4.0", archived.ckpt, "int8", calibration="synthetic",
                                   max_accuracy_drop=None))
    with caplog.at_level("WARNING"):
        entry = build_archive(cfg, archived.store)
    assert "int8 calibrated on synthetic images" in caplog.text
    assert entry["artifact"]["calibration"]["source"] == "synthetic" and entry["accuracy"]["budget_pt"] is None
    a.client.register("fm", "4.0")
    try:
        r = subprocess.run([sys.executable, "-m", "serving", "describe", "fm", "4.0", "--runtime-dir",
                            str(a.runtime_dir), "--store", str(a.store)], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        [desc] = json.loads(r.stdout)
        assert desc["customizedMetadata"]["runtime_info"]["warning"] == SYNTHETIC_WARNING
        assert f"warning: fm 4.0: {SYNTHETIC_WARNING}" in r.stderr
        assert SYNTHETIC_WARNING in (a.runtime_dir / "logs" / "model_log.log").read_text()
    finally:
        a.client.unregister("fm", "4.0")


def test_atomic_write_replaces_whole_or_keeps_the_old_file(tmp_path, monkeypatch):
    """The one writer of JSON records and sha256 files: a reader sees the old file or the new one, mode 0644,
    and a write that fails leaves the old file and no temp file behind."""
    import os

    from handlers.artifacts import atomic_write, write_json

    path = write_json(tmp_path / "sub" / "state.json", {"v": 1})
    assert json.loads(path.read_text()) == {"v": 1} and (path.stat().st_mode & 0o777) == 0o644
    with pytest.raises(TypeError):
        write_json(path, {"v": object()})  # not serialisable: nothing written
    assert json.loads(path.read_text()) == {"v": 1}
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, b"{}")
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]
