"""Ecosystem conventions against the session's real TorchServe (`torchserve` fixture: "tiny" 1.0): TorchServe's
{"data": b64} and KServe v1 {"instances": [...]} bodies, gRPC with stubs generated from TorchServe's own protos,
health checks with token auth, `howto` without the key, and the handler's per-stage metrics on Prometheus.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import grpc
import pytest
import requests

from serving.grpc_client import GrpcClient, body_status
from tests.images import b64
from tests.torchserve import ROOT, gray_png, metric

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
        with pytest.raises(grpc.RpcError) as unknown:  # TorchServe's own refusals are real gRPC errors
            client.predict("no-such-model", gray_png())
        assert unknown.value.code() == grpc.StatusCode.INTERNAL and "Model not found" in unknown.value.details()
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


def test_howto_never_prints_a_key_and_its_key_command_reads_it(torchserve):
    r = _cli(torchserve, "howto", "--model", MODEL, "--image", str(ROOT / "README.md"))
    assert r.returncode == 0, r.stderr
    for key in torchserve.tokens.values():
        assert key not in r.stdout
    lines = [line.strip() for line in r.stdout.splitlines()]
    read_key = next(line for line in lines if line.startswith("KEY=$("))
    ping = next(line for line in lines if line.startswith("curl ") and line.endswith("/ping"))
    out = subprocess.run(["bash", "-c", f'{read_key} && echo "$KEY" && {ping}'], capture_output=True, text=True,
                         timeout=30)
    key, answer = out.stdout.split("\n", 1)
    assert key == torchserve.tokens["inference"] and json.loads(answer) == {"status": "Healthy"}, out.stderr


# -- per-stage metrics ------------------------------------------------------------------------------------------
def test_stage_times_and_errors_by_type_reach_prometheus(torchserve):
    def scrape() -> str:
        return requests.get(f"{torchserve.metrics_url}/metrics", timeout=10).text

    version = {"ModelName": MODEL, "ModelVersion": "1.0"}
    stages = ("decode", "preprocess", "inference", "postprocess")
    before = scrape()
    for i in range(3):
        assert _post(torchserve, gray_png(seed=i), "image/png").status_code == 200
    assert _post(torchserve, b"junk", "image/png").status_code == 400
    assert _post(torchserve, {"images": []}).status_code == 400

    def delta(text: str, name: str, **labels: str) -> float:
        return metric(text, name, **version, **labels) - metric(before, name, **version, **labels)

    deadline = time.time() + 30  # the frontend reads the worker's metric lines asynchronously
    while True:
        after = scrape()
        if delta(after, "handler_errors_total", Type="MissingImage") >= 1 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert delta(after, "handler_batches_total") >= 1
    for stage in stages:
        assert delta(after, "handler_stage_milliseconds_total", Stage=stage) > 0, stage
    assert delta(after, "handler_errors_total", Status="400", Type="InvalidImage") == 1
    assert delta(after, "handler_errors_total", Status="400", Type="MissingImage") == 1


def _cli(ts, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving", *args, "--runtime-dir", str(ts.runtime_dir),
                           "--store", str(ts.store)], cwd=ROOT, capture_output=True, text=True, timeout=120)
