"""Against a real TorchServe (one server for the module): predictions, versions, scaling, integrity checks,
token auth, allowed URLs, metrics, rollout and rollback. Tests run in file order and share the server's state:
each one says which default version it expects and leaves.
"""

from __future__ import annotations

import base64
import io
import json
import multiprocessing
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from serving.manage import Client, IntegrityError, ServingError, undo_on_failure
from serving.rollout import rollback, rollback_target, rollout
from tests.images import cutout
from tests.torchserve import ROOT, TorchServe, gray_png, metric, resign_archive, tiny_archive, tiny_checkpoint

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java (run make setup)")
MODEL = "tiny"
FAVOUR = {"1.0": 2, "2.0": 7, "3.0": 2}  # the class each version's checkpoint leans towards


# -- rollback bookkeeping (no server) ---------------------------------------------------------------------------
def _h(frm: str, to: str, kind: str = "set-default") -> dict:
    return {"name": MODEL, "from": frm, "to": to, "kind": kind}


def test_rollback_walks_back_through_the_defaults_and_never_forward():
    history = [_h("1.0", "2.0"), _h("2.0", "3.0", "rollout")]
    assert rollback_target(history, MODEL, "3.0", ["1.0", "2.0", "3.0"]) == "2.0"
    history.append(_h("3.0", "2.0", "rollback"))
    assert rollback_target(history, MODEL, "2.0", ["1.0", "2.0", "3.0"]) == "1.0"
    history.append(_h("2.0", "1.0", "rollback"))
    # A third rollback does not flip forward to the version just rolled away from: it is refused.
    with pytest.raises(ServingError, match="1.0 is the earliest default on record; a rollback never goes forward"):
        rollback_target(history, MODEL, "1.0", ["1.0", "2.0", "3.0"])
    # An explicit target must have served as the default; 3.0 did.
    assert rollback_target(history, MODEL, "1.0", ["1.0", "2.0", "3.0"], to="3.0") == "3.0"


def test_rollback_never_picks_a_version_that_did_not_serve_as_default():
    # No history (the first registered version is the default) and a newer version registered: no target.
    with pytest.raises(ServingError, match="no default change to 1.0 is on record"):
        rollback_target([], MODEL, "1.0", ["1.0", "2.0"])
    # Stale history (the default was changed outside the CLI): refused unless a served version is named.
    stale = [_h("1.0", "2.0")]
    with pytest.raises(ServingError, match="changed outside this CLI.*1.0, 2.0"):
        rollback_target(stale, MODEL, "5.0", ["1.0", "2.0", "5.0", "9.0"])
    assert rollback_target(stale, MODEL, "5.0", ["1.0", "2.0", "5.0", "9.0"], to="2.0") == "2.0"
    with pytest.raises(ServingError, match="9.0: it never served as the default"):
        rollback_target(stale, MODEL, "5.0", ["1.0", "2.0", "5.0", "9.0"], to="9.0")


def test_rollback_target_must_still_be_registered():
    with pytest.raises(ServingError, match="to 1.0: it is no longer registered; register it again first"):
        rollback_target([_h("1.0", "2.0")], MODEL, "2.0", ["2.0"])


def test_a_failed_cleanup_keeps_the_original_error_visible():
    def undo() -> None:
        raise ServingError("DELETE /models/tiny/4.0: HTTP 500")

    with pytest.raises(ServingError, match="smoke check failed") as e:
        with undo_on_failure("rollout of tiny 4.0", undo):
            raise ServingError("smoke check failed")
    assert e.value.__notes__ == ["cleanup after the failed rollout of tiny 4.0 also failed: ServingError: "
                                 "DELETE /models/tiny/4.0: HTTP 500"]


def _record_many(runtime_dir: str, worker: int, n: int) -> None:
    client = Client(Path(runtime_dir))
    for i in range(n):
        client._record(f"m{worker}", str(i), str(i + 1), "set-default")


def test_history_is_written_atomically_under_a_lock(tmp_path):
    """Concurrent CLIs (four processes) lose no default change and never leave a half-written file."""
    from serving.server import render_config

    render_config(tmp_path, tmp_path / "store")
    (tmp_path / "key_file.json").write_text(json.dumps({k: {"key": "x"} for k in ("management", "inference", "API")}))
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_record_many, args=(str(tmp_path), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    history = Client(tmp_path).history()
    assert len(history) == 100 and all(p.exitcode == 0 for p in procs)
    for w in range(4):
        assert [e["to"] for e in history if e["name"] == f"m{w}"] == [str(i + 1) for i in range(25)]
    assert not list(tmp_path.glob("*.tmp"))


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


def test_every_register_is_asynchronous(env):
    """A synchronous register holds a frontend event-loop thread until the workers are up and stalls inference
    requests on it (docs/reliability.md): the server's access log shows only 202 (accepted) registers."""
    log = (env.ts.runtime_dir / "logs" / "access_log.log").read_text()
    registers = [line for line in log.splitlines() if '"POST /models?' in line]
    assert len(registers) >= 2  # serve's register of 1.0, the client's of 2.0
    assert all("synchronous=false" in line and '" 202 ' in line for line in registers), registers


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


def test_answers_are_counted_under_the_version_that_produced_them(env):
    """TorchServe counts requests to /predictions/tiny under model_version="default"; handler_answers_total
    names the version that answered (2.0, the default since the tests above), for every status."""
    assert env.client.default_version(MODEL) == "2.0"

    def counts() -> dict[str, float]:
        text = requests.get(f"{env.ts.metrics_url}/metrics", timeout=10).text
        answers = {f"{v} {s}": metric(text, "handler_answers_total", ModelName=MODEL, ModelVersion=v, Status=s)
                   for v, s in (("2.0", "200"), ("1.0", "200"), ("2.0", "415"))}
        return {**answers, "default": metric(text, "ts_inference_requests_total", model_name=MODEL,
                                             model_version="default")}

    before = counts()
    for _ in range(3):
        assert _predict(env)["version"] == "2.0"
    for _ in range(2):
        _predict(env, "1.0")
    r = env.ts.infer.post(f"{env.ts.inference_url}/predictions/{MODEL}", data=base64.b64encode(gray_png()),
                          headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=60)
    assert r.status_code == 415 and r.json()["type"] == "FormEncodedBody", r.text
    expected, deadline = {"2.0 200": 3, "1.0 200": 2, "2.0 415": 1, "default": 4}, time.monotonic() + 30
    while True:  # the frontend collects worker metrics asynchronously
        delta = {k: v - before[k] for k, v in counts().items()}
        if delta == expected or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert delta == expected


def test_transparent_input_is_composited_on_the_recorded_background(env):
    opaque, transparent = cutout(np.array(Image.open(io.BytesIO(gray_png(seed=4)))))
    on_black = _predict(env, "1.0", topk=10, png=opaque)["predictions"]
    assert _predict(env, "1.0", topk=10, png=transparent)["predictions"] == on_black


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
    back = rollback(env.client, MODEL)
    assert (back["from"], back["to"], back["smoke_check"]["answered_by"]) == ("3.0", "2.0", "2.0")
    assert _predict(env)["version"] == "2.0"
    r = _cli(env, "rollback", MODEL)  # the CLI shares the runtime dir's history: back to the first default
    assert r.returncode == 0 and r.stdout.startswith(f"{MODEL}: default 2.0 -> 1.0 (smoke check passed"), r.stderr
    assert _predict(env)["version"] == "1.0"


def test_rollback_checks_the_target_is_ready_first(env):
    assert env.client.default_version(MODEL) == "1.0"
    env.client.set_default(MODEL, "3.0")
    env.client.scale(MODEL, "1.0", min_workers=0, max_workers=1)  # 1.0 stays registered, with no worker
    with pytest.raises(ServingError, match="1.0 has minWorkers 0"):
        rollback(env.client, MODEL)
    assert _predict(env)["version"] == "3.0"  # the default did not move to a version that cannot answer
    env.client.scale(MODEL, "1.0", min_workers=1, max_workers=1)
    r = _cli(env, "rollback", MODEL, "--dry-run")
    assert r.returncode == 0 and "would set the default 3.0 -> 1.0" in r.stdout, r.stderr
    assert env.client.default_version(MODEL) == "3.0"
    r = _cli(env, "rollback", MODEL)
    assert r.returncode == 0 and r.stdout.startswith(f"{MODEL}: default 3.0 -> 1.0 (smoke check passed"), r.stdout
    assert _predict(env)["version"] == "1.0"


def test_rollout_dry_run_changes_nothing(env):
    r = _cli(env, "rollout", MODEL, "3.0", "--retire-old", "--dry-run")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["dry_run"] and plan["steps"] == ["wait for READY workers", "smoke check", "set default 1.0 -> 3.0",
                                                 "unregister 1.0"]
    assert env.client.default_version(MODEL) == "1.0" and env.client.versions(MODEL) == ["1.0", "2.0", "3.0"]


def test_rollout_with_retire_old_unregisters_the_previous_default(env):
    r = _cli(env, "rollout", MODEL, "3.0", "--retire-old")  # 3.0 is registered already: smoke + switch
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["retired"] == "1.0"
    # The smoke check reads as a check, not as a (meaningless) prediction for the synthetic pattern.
    smoke = out["smoke_check"]
    assert smoke.pop("ms") >= 0
    assert smoke == {"result": "passed", "request": f"POST /predictions/{MODEL}/3.0", "status": 200, "answers": 3,
                     "answered_by": "3.0", "image": "synthetic test pattern (any label passes)"}
    assert env.client.versions(MODEL) == ["2.0", "3.0"] and env.client.default_version(MODEL) == "3.0"


def test_unregister_removes_a_version(env):
    env.client.unregister(MODEL, "2.0")
    assert env.client.versions(MODEL) == ["3.0"]
    r = env.ts.infer.post(f"{env.ts.inference_url}/predictions/{MODEL}/2.0", data=gray_png())
    assert r.status_code == 404
    with pytest.raises(ServingError, match="to 1.0: it is no longer registered"):
        rollback(env.client, MODEL)


def test_an_interrupted_rollout_undoes_its_register(env):
    """SIGTERM while the new version's workers start (they never will: its handler fails at load): the CLI
    unregisters what it registered, says so, and the default stays where it was."""
    tiny_archive(env.store, env.tmp / "configs", MODEL, "4.0", env.ckpts["1.0"])
    resign_archive(env.store, MODEL, "4.0", {"classifier.py": b"raise RuntimeError('this handler never loads')\n"})
    proc = subprocess.Popen([sys.executable, "-m", "serving", "rollout", MODEL, "4.0", "--ready-timeout", "300",
                             "--runtime-dir", str(env.ts.runtime_dir), "--store", str(env.store)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not env.client.is_registered(MODEL, "4.0") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert env.client.is_registered(MODEL, "4.0"), proc.communicate(timeout=60)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, (out, err)
    assert err.splitlines() == ["error: terminated by SIGTERM", f"  cleaned up after the failed rollout of {MODEL} 4.0"]
    assert env.client.versions(MODEL) == ["3.0"] and env.client.default_version(MODEL) == "3.0"


# -- other servers ----------------------------------------------------------------------------------------------
def test_session_fixture_serves_tiny(torchserve):
    r = torchserve.infer.post(f"{torchserve.inference_url}/predictions/tiny", data=gray_png(), timeout=60)
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "v1.0-class2"


def test_expired_tokens_are_renewed_by_the_client(tiny_store, tmp_path):
    with TorchServe(tiny_store, tmp_path, extra_config={"token_expiration_min": 0.05}) as ts:  # 3 s tokens
        old, old_inference = ts.tokens["management"], ts.tokens["inference"]
        time.sleep(3.5)
        assert requests.get(f"{ts.management_url}/models", headers={"Authorization": f"Bearer {old}"},
                            timeout=10).status_code == 400
        assert ts.client.model_names() == []  # renewed through the API key, then answered
        assert ts.client.ep.management_key != old
        # a health probe holding a copy of the inference key fails once it expires; `serving ping` renews it
        assert requests.get(f"{ts.inference_url}/ping", headers={"Authorization": f"Bearer {old_inference}"},
                            timeout=10).status_code == 400
        assert ts.client.ping() == {"status": "Healthy"} and ts.client.ep.inference_key != old_inference
