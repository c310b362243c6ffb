"""Against a real TorchServe (one server for the module): predictions, versions, scaling, integrity checks,
token auth, allowed URLs, metrics, rollout and rollback. Tests run in file order and share the server's state:
each one says which default version it expects and leaves.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from serving.manage import IntegrityError, ServingError
from serving.rollout import rollback, rollback_target, rollout
from tests.torchserve import ROOT, TorchServe, gray_png, tiny_archive, tiny_checkpoint

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java (run make setup)")
MODEL = "tiny"
FAVOUR = {"1.0": 2, "2.0": 7, "3.0": 2}  # the class each version's checkpoint leans towards


# -- rollback bookkeeping (no server) ---------------------------------------------------------------------------
def _h(frm: str, to: str, kind: str = "set-default") -> dict:
    return {"name": MODEL, "from": frm, "to": to, "kind": kind}


def test_rollback_target_unwinds_the_default_history():
    history = [_h("1.0", "2.0"), _h("2.0", "3.0", "rollout")]
    assert rollback_target(history, MODEL, "3.0", ["1.0", "2.0", "3.0"]) == "2.0"
    history.append(_h("3.0", "2.0", "rollback"))
    assert rollback_target(history, MODEL, "2.0", ["1.0", "2.0", "3.0"]) == "1.0"
    # No usable history (default changed elsewhere, or previous version gone): the highest other version.
    assert rollback_target([], MODEL, "2.0", ["1.0", "2.0", "10.0"]) == "10.0"
    assert rollback_target([_h("1.0", "2.0")], MODEL, "2.0", ["2.0", "3.0"]) == "3.0"


def test_rollback_target_refuses_without_another_version():
    with pytest.raises(ServingError, match="no other version is registered besides 2.0.*previous default 1.0"):
        rollback_target([_h("1.0", "2.0")], MODEL, "2.0", ["2.0"])


def test_cli_without_a_server_fails_in_one_line(tmp_path):
    (tmp_path / "store").mkdir()
    common = ["--runtime-dir", str(tmp_path / "rt"), "--store", str(tmp_path / "store")]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "serving", *args, *common], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)

    r = cli("serve", "--models", "no-such-model")
    assert r.returncode == 1 and "no-such-model has no archive" in r.stderr
    r = cli("models")
    assert r.returncode == 1 and r.stderr.startswith("error: no ") and "start the server first" in r.stderr
    r = cli("stop")
    assert r.returncode == 0 and "no TorchServe running" in r.stdout


# -- one real server ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    store, configs = tmp / "store", tmp / "configs"
    ckpts = {v: tiny_checkpoint(tmp / f"tiny-{v}.pt", seed=int(float(v)), favour=f, classes=[
        f"v{v}-class{i}" for i in range(10)]) for v, f in FAVOUR.items()}
    for version, ckpt in ckpts.items():
        tiny_archive(store, configs, MODEL, version, ckpt)
    tiny_archive(store, configs, MODEL, "9.0", ckpts["1.0"])  # tampered with in a test below
    with TorchServe(store, tmp, models=[(MODEL, "1.0")]) as ts:
        yield SimpleNamespace(ts=ts, client=ts.client, store=store, ckpts=ckpts, tmp=tmp)


def _predict(env, version: str | None = None, topk: int | None = None, png: bytes | None = None) -> dict:
    png = png or gray_png(seed=1)
    data = png if topk is None else json.dumps({"image": base64.b64encode(png).decode(), "topk": topk}).encode()
    url = f"{env.ts.inference_url}/predictions/{MODEL}" + (f"/{version}" if version else "")
    r = env.ts.infer.post(url, data=data, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _cli(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving", *args, "--runtime-dir", str(env.ts.runtime_dir),
                           "--store", str(env.store)], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_predict_default_and_versioned(env):
    for version in (None, "1.0"):
        body = _predict(env, version)
        assert (body["model"], body["version"]) == (MODEL, "1.0")
        assert len(body["predictions"]) == 3  # topk from the archive's handler options
        top = body["predictions"][0]
        assert set(top) == {"label", "index", "probability"}
        assert (top["index"], top["label"]) == (2, "v1.0-class2")


def test_served_probabilities_equal_predict_probs(env):
    from training.checkpoint import build_model, load_checkpoint
    from training.evaluate import predict_probs

    png = gray_png(seed=5)
    body = _predict(env, "1.0", topk=10, png=png)
    ckpt = load_checkpoint(env.ckpts["1.0"])
    image = torch.from_numpy(np.array(Image.open(io.BytesIO(png)))).unsqueeze(0)  # (1, 28, 28) uint8
    expected = predict_probs(build_model(ckpt), ckpt["preprocess"], [image])[0]
    served = torch.zeros(10)
    for p in body["predictions"]:
        served[p["index"]] = p["probability"]
    assert torch.allclose(served, expected, atol=1e-4), (served, expected)


def test_register_second_version_then_set_default_switches_answers(env):
    env.client.register(MODEL, "2.0")
    assert env.client.versions(MODEL) == ["1.0", "2.0"]
    assert _predict(env)["version"] == "1.0"  # registering does not change the default
    assert _predict(env, "2.0")["predictions"][0]["label"] == "v2.0-class7"
    env.client.set_default(MODEL, "2.0")
    body = _predict(env)
    assert (body["version"], body["predictions"][0]["index"]) == ("2.0", 7)


def test_scale_workers_shows_in_describe(env):
    env.client.scale(MODEL, "2.0", min_workers=2, max_workers=2)
    [desc] = env.client.describe(MODEL, "2.0")
    assert (desc["minWorkers"], desc["maxWorkers"], len(desc["workers"])) == (2, 2, 2)
    env.client.scale(MODEL, "2.0", min_workers=1, max_workers=1)
    deadline = time.monotonic() + 30
    while len(env.client.describe(MODEL, "2.0")[0]["workers"]) != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(env.client.describe(MODEL, "2.0")[0]["workers"]) == 1


def test_cli_lists_versions_and_reports_errors_in_one_line(env):
    r = _cli(env, "models")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[1:]]
    assert [MODEL, "1.0", "1/1"] in rows and [MODEL, "2.0", "*", "1/1"] in rows
    r = _cli(env, "describe", "no-such-model")
    assert r.returncode == 1 and r.stderr.startswith("error: GET /models/no-such-model: HTTP 404: Model not found")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_tampered_archive_is_refused_before_the_server_sees_it(env):
    mar = env.store / "tiny-9.0.mar"
    with open(mar, "ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError, match="sha256 mismatch for tiny-9.0.mar"):
        env.client.register(MODEL, "9.0")
    r = _cli(env, "register", MODEL, "9.0")
    assert r.returncode == 1 and "sha256 mismatch" in r.stderr and "Traceback" not in r.stderr
    assert not env.client.is_registered(MODEL, "9.0")
    assert "tiny-9.0.mar" not in (env.ts.runtime_dir / "logs" / "ts_log.log").read_text()


def test_requests_without_or_with_a_wrong_token_are_rejected(env):
    png, ts = gray_png(), env.ts
    predictions = f"{ts.inference_url}/predictions/{MODEL}"
    # No token, a wrong one, and the other API's token: TorchServe 0.12 answers 400 InvalidKeyException.
    for headers in ({}, {"Authorization": "Bearer wrong-token"},
                    {"Authorization": f"Bearer {ts.tokens['management']}"}):
        r = requests.post(predictions, data=png, headers=headers, timeout=30)
        assert r.status_code in (400, 401) and "Token Authorization failed" in r.text
    for headers in ({}, {"Authorization": "Bearer wrong-token"},
                    {"Authorization": f"Bearer {ts.tokens['inference']}"}):
        r = requests.get(f"{ts.management_url}/models", headers=headers, timeout=30)
        assert r.status_code in (400, 401) and "Token Authorization failed" in r.text


def test_metrics_are_prometheus_text(env):
    r = requests.get(f"{env.ts.metrics_url}/metrics", timeout=10)
    assert r.status_code == 200 and "# TYPE" in r.text
    assert "ts_inference_requests_total" in r.text or "Requests2XX" in r.text


@pytest.mark.parametrize("url", ["http://example.invalid/x.mar", "file:///etc/passwd", "../store/tiny-1.0.mar"])
def test_register_from_outside_the_store_is_refused(env, url):
    before = sorted(p.name for p in env.store.iterdir())
    r = env.ts.mgmt.post(f"{env.ts.management_url}/models", params={"url": url, "synchronous": "true"})
    assert r.status_code == 404 and ("allowed URL" in r.text or "not allowed" in r.text), r.text
    assert sorted(p.name for p in env.store.iterdir()) == before
    assert env.client.versions(MODEL) == ["1.0", "2.0"]


def test_rollout_then_rollback_switch_the_default(env):
    assert env.client.default_version(MODEL) == "2.0"
    result = rollout(env.client, MODEL, "3.0")
    assert (result["previous"], result["retired"]) == ("2.0", None)
    body = _predict(env)
    assert (body["version"], body["predictions"][0]["index"]) == ("3.0", 2)
    assert rollback(env.client, MODEL) == {"name": MODEL, "from": "3.0", "to": "2.0"}
    assert _predict(env)["version"] == "2.0"
    r = _cli(env, "rollback", MODEL)  # the CLI shares the runtime dir's history: back to the first default
    assert r.returncode == 0 and r.stdout.strip() == f"{MODEL}: default 2.0 -> 1.0", r.stderr
    assert _predict(env)["version"] == "1.0"


def test_rollout_with_retire_old_unregisters_the_previous_default(env):
    r = _cli(env, "rollout", MODEL, "3.0", "--retire-old")  # 3.0 is registered already: smoke + switch
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["retired"] == "1.0"
    # The smoke check reads as a check, not as a (meaningless) prediction for the synthetic pattern.
    assert out["smoke_check"] == {"result": "passed", "request": f"POST /predictions/{MODEL}/3.0", "status": 200,
                                  "answers": 3, "image": "synthetic test pattern (any label passes)"}
    assert env.client.versions(MODEL) == ["2.0", "3.0"] and env.client.default_version(MODEL) == "3.0"


def test_unregister_removes_a_version(env):
    env.client.unregister(MODEL, "2.0")
    assert env.client.versions(MODEL) == ["3.0"]
    r = env.ts.infer.post(f"{env.ts.inference_url}/predictions/{MODEL}/2.0", data=gray_png())
    assert r.status_code == 404
    with pytest.raises(ServingError, match="no other version is registered besides 3.0"):
        rollback(env.client, MODEL)


# -- other servers ----------------------------------------------------------------------------------------------
def test_session_fixture_serves_tiny(torchserve):
    r = torchserve.infer.post(f"{torchserve.inference_url}/predictions/tiny", data=gray_png(), timeout=60)
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "v1.0-class2"


def test_expired_tokens_are_renewed_by_the_client(tiny_store, tmp_path):
    with TorchServe(tiny_store, tmp_path, extra_config={"token_expiration_min": 0.05}) as ts:  # 3 s tokens
        old = ts.tokens["management"]
        time.sleep(3.5)
        assert requests.get(f"{ts.management_url}/models", headers={"Authorization": f"Bearer {old}"},
                            timeout=10).status_code == 400
        assert ts.client.model_names() == []  # renewed through the API key, then answered
        assert ts.client.ep.management_key != old
