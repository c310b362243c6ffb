"""A real 2-node fleet behind a real HAProxy on free loopback ports (serving/fleet.py, serving/fleet_ops.py):
one fleet key, a rollout and a rollback with requests flowing and none failing, a canary and a promote, bad
input that changes nothing, a failed smoke check undone, a crashed node refused and restored. Tests run in
file order on one fleet; the longer fault runs are `make reliability-fleet` (load_tests/fleet_reliability.py).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from types import SimpleNamespace

import psutil
import pytest
import requests

from load_tests.fleet_reliability import DOC, JSON_OUT, _retried, start_fleet, summary_md, under_load
from serving import fleet_ops as ops
from serving import haproxy, server
from serving.fleet import Fleet, down, status
from serving.manage import ServingError
from tests.torchserve import ROOT, gray_png, tiny_archive, tiny_checkpoint

MODEL = "tiny"
HAPROXY_LOG_LINE = ('127.0.0.1:60932 [28/Nov/2026:00:34:33.767] fleet nodes/node-2 0/93/0/15/108 200 602 - - ---- '
                    '8/8/5/5/{retries} 0/0 "POST /predictions/tiny HTTP/1.1"\n')


def test_replayed_requests_are_counted_from_haproxys_log(tmp_path):
    log = tmp_path / "haproxy.log"
    lines = [HAPROXY_LOG_LINE.format(retries=r) for r in ("0", "+1", "2", "+0")]
    log.write_text("Server nodes/node-1 is DOWN, reason: Layer4 connection problem\n" + "".join(lines))
    assert _retried(log, 0) == 2  # "+1": redispatched to another node; "2": two retries
    assert _retried(log, log.stat().st_size) == 0  # only what was logged after the offset


def test_the_docs_figures_are_generated_from_the_committed_json():
    """docs/fleet.md's figures block is exactly what docs/fleet-reliability.json generates, or says it awaits a run."""
    import re

    block = re.search(r"<!-- fleet-figures:begin -->\n(.*?)\n<!-- fleet-figures:end -->", DOC.read_text(), re.S)
    assert block, "docs/fleet.md lost its figures block"
    if not JSON_OUT.is_file():
        assert block.group(1).startswith("Awaiting a run on a quiet machine"), "figures without their JSON"
        pytest.skip("awaits `make reliability-fleet` on a quiet machine")
    assert block.group(1) == summary_md(json.loads(JSON_OUT.read_text()))


def test_the_figures_say_when_the_machine_was_busy():
    row = {"scenario": "rolling rollout", "requests": 900, "rps": 45.0, "failed": 0, "probe_failed": 0, "p99_ms": 80,
           "max_ms": 120, "replayed_by_haproxy": 0, "op_s": 6.1, "probe_versions_after": {"2.0": 30}}
    run = {"date": "2026-11-28", "machine": {"cpus": 2, "cpu": "x"}, "torchserve": "0.12.0", "haproxy": "2.6",
           "users": 8, "seconds": 20, "loadavg_start": 0.4, "loadavg_end": 0.9,
           "planned": [{**row, "loadavg_end": 0.8}], "throughput": [{**row, "nodes": 1, "loadavg_end": 1.1}]}
    assert "busy machine" not in summary_md(run)
    run["throughput"][0]["loadavg_end"] = 6.5
    assert "load average up to 6.5 on 2 cores" in summary_md(run)


@pytest.fixture(scope="module")
def env(tiny_store, tmp_path_factory):
    if shutil.which("java") is None or not (shutil.which("haproxy") or os.path.exists("/usr/sbin/haproxy")):
        pytest.skip("the fleet needs Java and HAProxy (run make setup)")
    tmp = tmp_path_factory.mktemp("fleet")
    store = tmp / "store"
    shutil.copytree(tiny_store, store)  # the tests below change this copy's archives
    # 3.0 loads, but its handler refuses images over 100 pixels: its smoke check fails.
    tiny_archive(store, tmp / "configs", MODEL, "3.0", tiny_checkpoint(tmp / "tiny-3.0.pt", seed=3),
                 handler={"topk": 3, "max_image_pixels": 100})
    images = tmp / "images"
    images.mkdir()
    for i in range(4):
        (images / f"g{i}.png").write_bytes(gray_png(seed=i))
    fleet = start_fleet(store, tmp / "fleet", 2)
    key = json.loads(fleet.key_file.read_text())["inference"]["key"]
    try:
        yield SimpleNamespace(fleet=fleet, store=store, images=images, out=tmp / "out", key=key, tmp=tmp)
    finally:
        down(fleet.root)


def post(env, path=f"/predictions/{MODEL}", key="", **kw) -> requests.Response:
    headers = {"Authorization": f"Bearer {key or env.key}", **kw.pop("headers", {})}
    return requests.post(f"{env.fleet.url}{path}", headers=headers, timeout=30, **kw)


def state(fleet: Fleet) -> dict:
    """What must not change when an operation is refused: per node versions + default, HAProxy states, canary."""
    st = status(fleet)
    return {"nodes": [(r["node"], r["balancer"], r["models"]) for r in st["nodes"]], "canary": st["canary"],
            "archives": json.dumps(fleet.state.get("archives"), sort_keys=True)}


def test_the_fleet_serves_through_haproxy_with_one_key(env):
    st = status(env.fleet)
    assert st["drift"] == [], st
    assert [(r["balancer"][:2], r["models"][MODEL]["default"]) for r in st["nodes"]] == [("UP", "1.0")] * 2
    key_file = env.fleet.key_file
    assert json.loads(key_file.read_text()) == {"inference": {"key": env.key}} and key_file.stat().st_mode & 0o77 == 0
    nodes = set()
    for _ in range(12):
        r = post(env, data=gray_png(), headers={"Content-Type": "image/png"})
        assert r.status_code == 200 and r.json()["version"] == "1.0", r.text
        nodes.add(r.headers["x-fleet-node"])
    assert nodes == {"node-1", "node-2"}
    for bad in ({"key": "wrong"}, {"headers": {"Authorization": ""}}):
        r = post(env, data=gray_png(), **bad)
        assert r.status_code == 401 and r.json()["type"] == "InvalidKeyException"
    assert requests.get(f"{env.fleet.url}/ping", timeout=10).json() == {"status": "Healthy"}  # no key needed
    assert requests.get(f"{env.fleet.url}/models", headers={"Authorization": f"Bearer {env.key}"},
                        timeout=10).status_code == 404  # management stays on the nodes' loopback ports
    for node in env.fleet.nodes:
        props = server.read_properties(node.runtime_dir / server.CONFIG_NAME)
        assert all(props[k].startswith("http://127.0.0.1:") for k in ("inference_address", "management_address"))


def test_a_binary_body_sent_as_a_form_is_served_and_real_forms_pass_unchanged(env):
    form = {"Content-Type": "application/x-www-form-urlencoded"}  # what curl --data-binary sends
    node = env.fleet.nodes[0]
    direct = requests.post(f"http://{node.address}/predictions/{MODEL}", data=gray_png(), headers=form, timeout=30)
    assert direct.status_code == 500  # TorchServe itself refuses it
    r = post(env, data=gray_png(), headers=form)
    assert r.status_code == 200 and r.json()["predictions"], r.text
    # A real URL-encoded form (printable) passes unchanged, to the handler's own answer for forms.
    r = post(env, data={"data": base64.b64encode(gray_png()).decode()})
    assert r.status_code == 415 and r.json()["type"] == "FormEncodedBody", r.text


def test_rollout_and_rollback_under_load_fail_no_request(env):
    def both():
        rolled = ops.rollout(env.fleet, MODEL, "2.0")
        time.sleep(3)
        back = ops.rollback(env.fleet, MODEL)
        return {"switched": rolled["switched"], "back_to": back["to"]}

    r = under_load(env.fleet, env.images, env.out, "rollout and rollback", users=4, action=both, lead=3, tail=3)
    assert r["op_under_load"], "the load ended before the rollback; lengthen `seconds`"
    assert (r["failed"], r["probe_failed"]) == (0, 0), r["failures"]
    assert r["requests"] > 100 and r["switched"] == ["node-1", "node-2"] and r["back_to"] == "1.0"
    assert set(r["probe_versions"]) == {"1.0", "2.0"} and r["last_version"] == "1.0"
    st = status(env.fleet)
    assert st["drift"] == []
    assert all(n["models"][MODEL] == {"default": "1.0", "versions": {"1.0": "1/1", "2.0": "1/1"}}
               for n in st["nodes"]), st
    steps = [(e["op"], e["step"], e.get("node")) for e in env.fleet.history()]
    for op in ("rollout", "rollback"):
        for node in ("node-1", "node-2"):
            assert [(op, s, node) in steps for s in ("drain", "idle", "set-default", "ready-in-haproxy")] == [True] * 4
        assert (op, "done", None) in steps


def test_canary_sends_a_share_to_the_new_version_then_promote_and_rollback(env):
    ops.canary(env.fleet, MODEL, "2.0", 50)
    assert status(env.fleet)["canary"] == {MODEL: {"version": "2.0", "percent": 50}}
    assert "/predictions/tiny 2.0/50" in env.fleet.haproxy.canary_map.read_text()  # kept for a HAProxy restart
    seen = [post(env, data=gray_png()).json()["version"] for _ in range(40)]
    assert 5 <= seen.count("2.0") <= 35, seen  # 50 % in expectation; P(outside) < 1e-5
    assert {post(env, f"/predictions/{MODEL}/1.0", data=gray_png()).json()["version"] for _ in range(5)} == {"1.0"}
    ops.promote(env.fleet, MODEL)
    st = status(env.fleet)
    assert st["canary"] == {} and {n["models"][MODEL]["default"] for n in st["nodes"]} == {"2.0"}
    assert {post(env, data=gray_png()).json()["version"] for _ in range(6)} == {"2.0"}
    assert ops.rollback(env.fleet, MODEL)["to"] == "1.0"
    assert {post(env, data=gray_png()).json()["version"] for _ in range(6)} == {"1.0"}


@pytest.mark.parametrize("call, message", [
    (lambda f: ops.rollout(f, MODEL, "9.9"), "tiny 9.9 is not in"),
    (lambda f: ops.rollout(f, "nope", "1.0"), "nope 1.0 is not in"),
    (lambda f: ops.canary(f, MODEL, "2.0", 0), "--percent must be an integer from 1 to 99"),
    (lambda f: ops.canary(f, MODEL, "2.0", 100), "--percent must be an integer from 1 to 99"),
    (lambda f: ops.canary(f, MODEL, "1.0", 10), "already the default"),
    (lambda f: ops.promote(f, MODEL), "no canary of tiny is active"),
    (lambda f: ops.rollback(f, MODEL, to="3.0"), "never served as the default"),
    (lambda f: ops.rollback(f, "nope"), "not registered on the fleet"),
])
def test_bad_input_ends_with_one_message_and_changes_nothing(env, call, message):
    before = state(env.fleet)
    with pytest.raises(ServingError, match=message):
        call(env.fleet)
    assert state(env.fleet) == before


def test_the_cli_reports_bad_input_in_one_line(env, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "serving", "fleet", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)

    r = cli("rollout", MODEL, "9.9", "--fleet-dir", str(env.fleet.root), "--store", str(env.store))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: tiny 9.9 is not in")
    r = cli("status", "--fleet-dir", str(tmp_path / "none"))
    assert r.returncode == 1 and "no fleet in" in r.stderr and "Traceback" not in r.stderr
    r = cli("up", "--nodes", "0", "--models", "tiny", "--fleet-dir", str(tmp_path / "f"), "--store", str(env.store))
    assert r.returncode == 1 and "--nodes must be between 1 and" in r.stderr
    r = cli("up", "--models", "tiny:7.0", "--fleet-dir", str(tmp_path / "f"), "--store", str(env.store))
    assert r.returncode == 1 and "tiny 7.0 is not archived" in r.stderr and not (tmp_path / "f").exists()


def test_a_failed_smoke_check_stops_the_rollout_and_leaves_the_old_version(env):
    before = state(env.fleet)
    with pytest.raises(ServingError, match="smoke check on tiny 3.0 failed") as err:
        ops.rollout(env.fleet, MODEL, "3.0", ready_timeout=60)
    assert any("cleaned up" in note for note in getattr(err.value, "__notes__", []))
    assert state(env.fleet) == before  # 3.0 unregistered on every node again, defaults untouched
    assert env.fleet.history()[-1]["step"] == "undone"


def test_a_crashed_node_is_refused_then_restored_with_the_fleets_versions(env):
    node = env.fleet.node("node-2")
    java = psutil.Process(server.server_pid(node.runtime_dir))
    for p in [java, *java.children(recursive=True)]:
        p.send_signal(signal.SIGKILL)
    deadline = time.time() + 15
    while haproxy.servers(env.fleet.haproxy)["node-2"]["status"].startswith("UP") and time.time() < deadline:
        time.sleep(0.1)
    assert post(env, data=gray_png()).status_code == 200  # node-1 serves alone
    assert any("node-2" in d for d in status(env.fleet)["drift"])
    with pytest.raises(ServingError, match="node-2 is DOWN in HAProxy"):
        ops.rollout(env.fleet, MODEL, "2.0")
    restored = ops.restart_node(env.fleet, "node-2")
    assert restored["defaults"] == {MODEL: "1.0"} and sorted(restored["restored"]) == ["tiny/1.0", "tiny/2.0"]
    st = status(env.fleet)
    assert st["drift"] == [] and st["nodes"][1]["models"][MODEL]["default"] == "1.0", st


def test_mismatched_archives_across_nodes_are_refused(env):
    from tests.torchserve import resign_archive

    before = state(env.fleet)
    manifest = "MAR-INF/MANIFEST.json"
    with zipfile.ZipFile(env.store / f"{MODEL}-2.0.mar") as z:
        changed = z.read(manifest) + b"\n"
    resign_archive(env.store, MODEL, "2.0", {manifest: changed})  # the store changed after the nodes registered it
    with pytest.raises(ServingError, match="nodes would serve different bytes under one version"):
        ops.rollout(env.fleet, MODEL, "2.0")
    assert state(env.fleet) == before
