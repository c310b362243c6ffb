"""The locked-down defaults, checked against a real TorchServe (one server for the module; tests run in file
order): token auth, loopback-only sockets, allowed_urls, sha256 before register, weights-only checkpoints (in the
archive step and in a worker), request size limit, no keys in the logs, key file permissions.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import requests
import torch
import yaml

from serving import server
from serving.archive import ArchiveError, _archiver, build_archive, stage_sources
from serving.config import load_config
from serving.manage import IntegrityError
from tests.torchserve import ROOT, TorchServe, gray_png, tiny_checkpoint
from training.checkpoint import CheckpointError, load_checkpoint

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java (run make setup)")
MODEL = "tiny"


class _OpensAFile:
    """Unpickling this calls open(marker, "w"): if the marker file exists, pickled code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def pickled_code_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint in the project's format with an object in `metrics` whose unpickling runs code."""
    ckpt = torch.load(tiny_checkpoint(path.with_suffix(".ok.pt")), weights_only=True)
    ckpt["metrics"] = {"payload": _OpensAFile(marker)}
    torch.save(ckpt, path)
    return path


def raw_archive(ckpt: Path, store: Path, work: Path, name: str = "evil") -> str:
    """What the archive step would build, but straight through torch-model-archiver (no checkpoint check)."""
    extra = stage_sources(work / f"{name}-extra")
    config = work / f"{name}-model-config.yaml"
    config.write_text(yaml.safe_dump({"batchSize": 1, "maxBatchDelay": 0, "minWorkers": 1, "maxWorkers": 1,
                                      "responseTimeout": 30, "handler": {"runtime": "eager"}}))
    subprocess.run([_archiver(), "--model-name", name, "--version", "1.0", "--serialized-file", str(ckpt),
                    "--handler", str(ROOT / "handlers" / "classifier.py"), "--extra-files", str(extra),
                    "--config-file", str(config), "--export-path", str(store), "--force"], check=True)
    return f"{name}.mar"


@pytest.fixture(scope="module")
def env(tiny_store, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    store, outside = tmp / "store", tmp / "outside"
    shutil.copytree(tiny_store, store)
    outside.mkdir()
    shutil.copy(store / "tiny-2.0.mar", outside / "only-outside.mar")
    zipfile.ZipFile(store / "tiny-2.0.mar").extractall(outside / "unpacked")
    marker = tmp / "PICKLED-CODE-RAN"
    evil = raw_archive(pickled_code_checkpoint(tmp / "evil.pt", marker), store, tmp)
    with TorchServe(store, tmp, models=[(MODEL, "1.0")]) as ts:
        yield SimpleNamespace(ts=ts, store=store, outside=outside, marker=marker, evil=evil, tmp=tmp)


def _predict(ts: TorchServe, headers: dict | None = None) -> requests.Response:
    return requests.post(f"{ts.inference_url}/predictions/{MODEL}", data=gray_png(), timeout=60,
                         headers=ts.infer.headers if headers is None else headers)


# -- configuration and sockets -----------------------------------------------------------------------------------
def test_rendered_config_is_locked_down(env):
    props = server.read_properties(env.ts.runtime_dir / server.CONFIG_NAME)
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:"), (key, props[key])
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["disable_token_authorization"] == "false"
    assert props["allowed_urls"] == server.allowed_urls_regex(env.store).replace("\\", "\\\\")
    assert props["max_request_size"] == props["max_response_size"] == str(16 * 1024 * 1024)
    assert props["install_py_dep_per_model"] == props["enable_envvars_config"] == "false"
    assert props["load_models"] == ""


def test_every_listening_socket_is_on_loopback(env):
    java = psutil.Process(server.server_pid(env.ts.runtime_dir))
    listening = [c.laddr for c in java.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    ports = env.ts.ports
    assert {a.port for a in listening} == {ports.inference, ports.management, ports.metrics, ports.grpc_inference,
                                            ports.grpc_management}
    for addr in listening:
        ip = ipaddress.ip_address(addr.ip)
        assert (getattr(ip, "ipv4_mapped", None) or ip).is_loopback, addr
    for worker in java.children(recursive=True):  # workers talk to the frontend over unix sockets only
        assert not [c for c in worker.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]


# -- tokens ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("token", ["none", "wrong", "management"])
def test_inference_without_the_inference_token_is_refused(env, token):
    headers = {"none": {}, "wrong": {"Authorization": "Bearer 0123456789abcdef"},
               "management": {"Authorization": f"Bearer {env.ts.tokens['management']}"}}[token]
    r = _predict(env.ts, headers)
    assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"  # TorchServe 0.12: 400, not 401
    assert "predictions" not in r.text
    assert _predict(env.ts).status_code == 200


@pytest.mark.parametrize("token", ["none", "wrong", "inference"])
def test_management_and_token_api_without_their_keys_are_refused(env, token):
    headers = {"none": {}, "wrong": {"Authorization": "Bearer 0123456789abcdef"},
               "inference": {"Authorization": f"Bearer {env.ts.tokens['inference']}"}}[token]
    m = env.ts.management_url
    r = requests.get(f"{m}/models", headers=headers, timeout=30)
    assert r.status_code == 400 and MODEL not in r.text
    r = requests.post(f"{m}/models", params={"url": "tiny-2.0.mar"}, headers=headers, timeout=30)
    assert r.status_code == 400 and env.ts.client.versions(MODEL) == ["1.0"]
    for key in (headers, {"Authorization": f"Bearer {env.ts.tokens['management']}"}):  # /token wants the API key
        r = requests.get(f"{m}/token", params={"type": "inference"}, headers=key, timeout=30)
        assert r.status_code == 400 and "key" not in r.json()


# -- what may be registered --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["http", "file_passwd", "file_outside_store", "bare_path_outside_store",
                                  "dotdot", "file_dotdot"])
def test_registering_anything_outside_the_store_is_refused(env, kind):
    o, s = env.outside, env.store
    url = {"http": "http://127.0.0.1:9/tiny-1.0.mar", "file_passwd": "file:///etc/passwd",
           "file_outside_store": f"file://{o}/only-outside.mar", "bare_path_outside_store": f"{o}/only-outside.mar",
           "dotdot": "../outside/only-outside.mar", "file_dotdot": f"file://{s}/../outside/only-outside.mar"}[kind]
    before = sorted(p.name for p in s.iterdir())
    r = env.ts.mgmt.post(f"{env.ts.management_url}/models", params={"url": url, "model_name": "intruder",
                                                                    "synchronous": "true"}, timeout=60)
    assert r.status_code == 404, r.text
    assert any(t in r.json()["message"] for t in ("allowed URL", "Relative path", "Model not found at"))
    assert sorted(p.name for p in s.iterdir()) == before  # nothing was downloaded or copied into the store
    assert env.ts.client.model_names() == [MODEL]


@pytest.mark.xfail(strict=True, reason="TorchServe 0.12 loads a bare absolute *directory* path (an unpacked "
                   "archive) without checking allowed_urls; only the management token guards it")
def test_an_unpacked_archive_directory_outside_the_store_is_refused(env):
    r = env.ts.mgmt.post(f"{env.ts.management_url}/models", timeout=120, params={
        "url": str(env.outside / "unpacked"), "model_name": "intruder", "synchronous": "true"})
    if r.status_code == 200:
        env.ts.mgmt.delete(f"{env.ts.management_url}/models/intruder")
    assert r.status_code == 404, r.text


def test_a_tampered_archive_never_reaches_the_server(env):
    mar = env.store / "tiny-2.0.mar"
    mar.write_bytes(mar.read_bytes() + b"\0")
    access_log = env.ts.runtime_dir / "logs" / "access_log.log"
    before = access_log.read_text()
    with pytest.raises(IntegrityError, match="sha256 mismatch for tiny-2.0.mar"):
        env.ts.client.register(MODEL, "2.0")
    assert access_log.read_text() == before  # not a single request was sent
    assert env.ts.client.versions(MODEL) == ["1.0"]


# -- weights-only checkpoints ------------------------------------------------------------------------------------
def test_load_checkpoint_refuses_pickled_code(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(CheckpointError, match="not a weights-only checkpoint"):
        load_checkpoint(pickled_code_checkpoint(tmp_path / "evil.pt", marker))
    assert not marker.exists()


def test_the_archive_step_refuses_a_pickled_checkpoint(tmp_path):
    marker = tmp_path / "ran"
    ckpt = pickled_code_checkpoint(tmp_path / "evil.pt", marker)
    cfg = tmp_path / "configs" / "evil" / "1.0.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(yaml.safe_dump({"name": "evil", "version": "1.0", "checkpoint": str(ckpt), "runtime": "eager",
                                   "torchserve": {"batchSize": 1, "maxBatchDelay": 0, "minWorkers": 1,
                                                  "maxWorkers": 1, "responseTimeout": 30, "deviceType": "cpu"}}))
    with pytest.raises(ArchiveError, match="not a weights-only checkpoint"):
        build_archive(load_config(cfg), tmp_path / "store")
    assert not marker.exists() and not (tmp_path / "store" / "evil-1.0.mar").exists()


def test_a_worker_refuses_a_pickled_checkpoint_and_the_server_keeps_serving(env):
    m = env.ts.management_url
    r = env.ts.mgmt.post(f"{m}/models", params={"url": env.evil, "synchronous": "true"}, timeout=180)
    assert r.status_code == 500 and "Failed to start workers for model evil" in r.json()["message"]
    assert env.ts.mgmt.get(f"{m}/models/evil", timeout=30).status_code == 404  # not left registered
    assert not env.marker.exists()
    log = (env.ts.runtime_dir / "logs" / "model_log.log").read_text()
    assert "evil.pt: it is not a weights-only checkpoint" in log
    assert _predict(env.ts).status_code == 200


# -- limits, logs, key file --------------------------------------------------------------------------------------
def test_an_oversized_request_is_refused_by_the_frontend(env):
    r = requests.post(f"{env.ts.inference_url}/predictions/{MODEL}", data=b"\0" * (16 * 1024 * 1024 + 1),
                      headers=env.ts.infer.headers, timeout=60)
    assert (r.status_code, r.content) == (413, b"")
    assert _predict(env.ts).status_code == 200


def test_no_key_appears_in_the_logs(env):
    for _ in range(3):
        assert _predict(env.ts).status_code == 200
    env.ts.client.describe(MODEL)
    keys = json.loads((env.ts.runtime_dir / server.KEY_FILE).read_text())
    secrets = [keys["management"]["key"], keys["inference"]["key"], keys["API"]["key"]]
    files = [p for p in (env.ts.runtime_dir / "logs").rglob("*") if p.is_file()]
    files.append(env.ts.runtime_dir / server.CONFIG_NAME)
    assert any(p.name == "access_log.log" for p in files) and any(p.suffix == ".cfg" for p in files)
    for path in files:
        text = path.read_text(errors="replace")
        assert not [k for k in secrets if k in text], f"a token appears in {path}"


def test_the_key_file_is_readable_by_its_owner_only(env):
    mode = (env.ts.runtime_dir / server.KEY_FILE).stat().st_mode
    assert mode & 0o077 == 0, oct(mode)
