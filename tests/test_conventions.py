"""Ecosystem conventions against the session's real TorchServe (`torchserve` fixture: "tiny" 1.0): TorchServe's
{"data": b64} and KServe v1 {"instances": [...]} bodies, gRPC with stubs generated from TorchServe's own protos,
health checks with token auth, `howto` without the key, and the handler's per-stage metrics on Prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import grpc
import pytest
import requests

from serving.grpc_client import GrpcClient, body_status
from tests.images import b64
from tests.torchserve import ROOT, gray_png

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java (run make setup)")
MODEL = "tiny"


def _post(ts, body, ctype: str = "application/json") -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return ts.infer.post(f"{ts.inference_url}/predictions/{MODEL}", data=data, headers={"Content-Type": ctype},
                         timeout=60)


def _top(predictions: list[dict]) -> list[tuple[int, float]]:
    return [(p["index"], round(p["probability"], 4)) for p in predictions]


# -- request bodies ---------------------------------------------------------------------------------------------
def test_a_data_body_is_answered_like_raw_bytes(torchserve):
    raw = _post(torchserve, gray_png(seed=1), "application/octet-stream").json()
    r = _post(torchserve, {"data": b64(gray_png(seed=1))})
    assert r.status_code == 200, r.text
    assert _top(r.json()["predictions"]) == _top(raw["predictions"])


def test_kserve_v1_instances_get_one_prediction_each_in_order(torchserve):
    alone = [_top(_post(torchserve, gray_png(seed=i), "image/png").json()["predictions"]) for i in range(3)]
    r = _post(torchserve, {"instances": [{"data": b64(gray_png(seed=0))}, {"data": b64(gray_png(seed=1))},
                                         b64(gray_png(seed=2))]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["version"]) == (MODEL, "1.0") and "results" not in body
    assert [_top(p) for p in body["predictions"]] == alone
    bad = _post(torchserve, {"instances": [{"data": b64(gray_png())}, {"data": b64(b"not an image")}]})
    assert bad.status_code == 400 and bad.json()["type"] == "InvalidImage"
    assert bad.json()["message"].startswith("instances[1]: ")


# -- gRPC -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grpc_target(torchserve):
    return f"127.0.0.1:{torchserve.ports.grpc_inference}"


@pytest.fixture(scope="module")
def stub_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("grpc-stubs")


def test_grpc_predictions_with_stubs_from_torchserves_own_proto(torchserve, grpc_target, stub_cache):
    rest = _post(torchserve, gray_png(seed=4), "image/png").json()
    with GrpcClient(grpc_target, torchserve.tokens["inference"], stub_cache) as client:
        status, body = client.predict(MODEL, gray_png(seed=4))
        assert status == 200 and "code" not in body and _top(body["predictions"]) == _top(rest["predictions"])
        assert client.predict(MODEL, gray_png(seed=4), "1.0")[1]["version"] == "1.0"
        # TorchServe 0.12 answers a handler error with gRPC status OK: the body's "code" carries the status
        reply = client.stub.Predictions(client.pb2.PredictionsRequest(model_name=MODEL, input={"data": b"junk"}),
                                        metadata=client.metadata, timeout=60)
        body = json.loads(reply.prediction)
        assert (body["code"], body["type"]) == (400, "InvalidImage") and body_status(body) == 400
        assert client.predict(MODEL, b"junk") == (400, body)
        assert client.ping() == "Healthy"
    with GrpcClient(grpc_target, None, stub_cache) as anonymous:
        for call in (lambda: anonymous.predict(MODEL, gray_png()), anonymous.ping):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_cli_predict_over_grpc_exits_non_zero_on_an_error_body(torchserve, tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    good.write_bytes(gray_png(seed=5))
    bad.write_bytes(b"not an image")
    ok = _cli(torchserve, "predict", str(good), "--model", MODEL, "--grpc", "--topk", "2")
    assert ok.returncode == 0 and len(json.loads(ok.stdout)["predictions"]) == 2, ok.stderr
    both = _cli(torchserve, "predict", str(good), str(bad), "--model", MODEL, "--grpc")
    lines = [json.loads(line) for line in both.stdout.splitlines()]
    assert both.returncode == 1 and [x["status"] for x in lines] == [200, 400]
    assert lines[1]["type"] == "InvalidImage"


# -- health checks with token auth ------------------------------------------------------------------------------
def test_ping_needs_the_inference_key(torchserve):
    url = f"{torchserve.inference_url}/ping"
    for token in (None, "wrong", torchserve.tokens["management"]):
        r = requests.get(url, headers={"Authorization": f"Bearer {token}"} if token else {}, timeout=10)
        assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"
    r = requests.get(url, headers=torchserve.infer.headers, timeout=10)
    assert (r.status_code, r.json()) == (200, {"status": "Healthy"})
    probe = _cli(torchserve, "ping")
    assert (probe.returncode, probe.stdout.strip()) == (0, "Healthy"), probe.stderr


def test_howto_never_prints_a_key_and_its_commands_work(torchserve):
    r = _cli(torchserve, "howto", "--model", MODEL)
    assert r.returncode == 0, r.stderr
    for key in torchserve.tokens.values():
        assert key not in r.stdout
    read_key = next(line.strip() for line in r.stdout.splitlines() if line.strip().startswith("KEY=$("))
    ping = next(line.split(": ", 1)[1] for line in r.stdout.splitlines() if line.startswith("Health"))
    out = subprocess.run(["bash", "-c", f"{read_key} && {ping}"], capture_output=True, text=True, timeout=30)
    assert json.loads(out.stdout) == {"status": "Healthy"}, out.stderr


# -- per-stage metrics ------------------------------------------------------------------------------------------
_SAMPLE = re.compile(r'^(\w+)\{(.*)\}\s+(\S+)$')


def _samples(ts, name: str) -> dict[frozenset, float]:
    out = {}
    for line in requests.get(f"{ts.metrics_url}/metrics", timeout=10).text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) == name:
            labels = frozenset((k, v) for k, v in re.findall(r'(\w+)="([^"]*)"', m.group(2)) if k != "Hostname")
            out[labels] = float(m.group(3))
    return out


def _delta(after: dict, before: dict, **labels: str) -> float:
    want = set(labels.items())
    return sum(v - before.get(k, 0.0) for k, v in after.items() if want <= k)


def test_stage_times_and_errors_by_type_reach_prometheus(torchserve):
    names = ("handler_stage_milliseconds", "handler_batches", "handler_errors")
    _post(torchserve, gray_png(), "image/png")  # the first batch registers the metrics
    time.sleep(1)
    before = {n: _samples(torchserve, n) for n in names}
    for i in range(3):
        assert _post(torchserve, gray_png(seed=i), "image/png").status_code == 200
    assert _post(torchserve, b"junk", "image/png").status_code == 400
    assert _post(torchserve, {"images": []}).status_code == 400
    deadline = time.time() + 20  # the frontend reads the worker's metric lines asynchronously
    while time.time() < deadline:
        after = {n: _samples(torchserve, n) for n in names}
        if _delta(after["handler_errors"], before["handler_errors"], type="MissingImage") >= 1:
            break
        time.sleep(0.5)
    version = {"model_name": MODEL, "model_version": "1.0"}
    assert _delta(after["handler_batches"], before["handler_batches"], **version) >= 1
    for stage in ("decode", "preprocess", "inference", "postprocess"):
        assert _delta(after["handler_stage_milliseconds"], before["handler_stage_milliseconds"], stage=stage,
                      **version) > 0, stage
    errors = after["handler_errors"]
    assert _delta(errors, before["handler_errors"], code="400", type="InvalidImage", **version) == 1
    assert _delta(errors, before["handler_errors"], code="400", type="MissingImage", **version) == 1


def _cli(ts, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving", *args, "--runtime-dir", str(ts.runtime_dir),
                           "--store", str(ts.store)], cwd=ROOT, capture_output=True, text=True, timeout=120)
