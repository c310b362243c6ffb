"""Kubernetes manifests, serving image and pod helpers (serving/manifests.py, serving/pod.py, deploy/): generated
from the archive configs and identical to what is committed, valid against the Kubernetes schemas
(kubernetes-validate, strict) and, for the Gateway API HTTPRoute (a CRD), against the schema in deploy/schemas/;
consistent with deploy/Dockerfile; the pod's config.properties really starts TorchServe with the archive
config's batch settings, and the probes work with token auth on.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from serving import manifests as mf
from serving import pod, server
from serving.config import CONFIG_DIR, load_config
from serving.manage import IntegrityError, ServingError
from tests.torchserve import ROOT

DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests target (preStop `sleep` is GA-on from 1.30)
HAND_WRITTEN = {"Dockerfile", "Dockerfile.dockerignore", "schemas/httproute-v1.json"}


def objects(directory: Path) -> list[dict]:
    """Every object a Kustomization directory produces, without kustomize: its resources (files and other
    kustomizations) and its configMapGenerator ConfigMaps. The overlays use no patches."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    out = []
    for res in k.get("resources", []):
        path = (directory / res).resolve()
        out += objects(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for gen in k.get("configMapGenerator", []):
        data = {Path(f).name: (directory / f).read_text() for f in gen["files"]}
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    return out


def validate(obj: dict) -> None:
    if obj["kind"] == "HTTPRoute":
        jsonschema.validate(obj, json.loads((DEPLOY / "schemas" / "httproute-v1.json").read_text()))
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _try(check):
    try:
        return check()
    except RuntimeError:
        return None


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def test_the_committed_manifests_are_exactly_what_the_generator_writes():
    files = {rel: mf.render(content) for rel, content in mf.generate(mf.Options()).items()}
    committed = {str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*") if p.is_file()}
    assert committed - HAND_WRITTEN == set(files), "regenerate: python -m serving manifests"
    for rel, text in files.items():
        assert (DEPLOY / rel).read_text() == text, f"deploy/{rel} differs from the generator's; regenerate"


@pytest.mark.parametrize("overlay", ["stable", "canary"])
def test_every_object_validates(overlay):
    objs = objects(DEPLOY / "overlays" / overlay)
    assert {o["kind"] for o in objs} >= {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget",
                                         "HorizontalPodAutoscaler", "NetworkPolicy", "HTTPRoute"}
    for obj in objs + [yaml.safe_load((DEPLOY / "cluster" / "prometheus-adapter.yaml").read_text())]:
        validate(obj)


def test_validation_catches_mistakes():
    objs = objects(DEPLOY / "overlays" / "canary")
    dep = copy.deepcopy(by_kind(objs, "Deployment")[0])
    dep["spec"]["replica"] = dep["spec"].pop("replicas")  # a typo
    route = copy.deepcopy(by_kind(objs, "HTTPRoute")[0])
    route["spec"]["rules"][0]["backendRefs"][0]["weight"] = -1
    for broken in (dep, route):
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)


def threads_in_pod(tmp: Path, cpus: int, workers: int) -> int:
    """Threads per worker the handler's CPU budget gives in a pod whose cgroup v2 quota is `cpus` CPUs."""
    from handlers.cpu import cgroup_cpu_limit
    from tests.test_cpu import fake_proc

    fs = tmp / "cgroup" / "kubepods" / "pod"
    fs.mkdir(parents=True)
    (fs / "cpu.max").write_text(f"{cpus * 100000} 100000\n")  # what the kubelet writes for limits.cpu
    limit = cgroup_cpu_limit(fake_proc(tmp, "0::/kubepods/pod\n", [(str(tmp / "cgroup"), "/", "cgroup2", "rw")]))
    return max(1, int(limit) // max(1, workers))


def test_names_versions_and_batch_settings_come_from_the_archive_configs(tmp_path):
    o = mf.Options()
    objs = objects(DEPLOY / "overlays" / "canary")
    maps = {m["metadata"]["name"]: m["data"]["config.properties"] for m in by_kind(objs, "ConfigMap")}
    for dep in by_kind(objs, "Deployment"):
        version = dep["metadata"]["labels"]["app.kubernetes.io/version"]
        cfg = load_config(CONFIG_DIR / o.model / f"{version}.yaml")
        spec = dep["spec"]["template"]["spec"]
        text = maps[spec["volumes"][0]["configMap"]["name"]]
        props = dict(ln.split("=", 1) for ln in text.splitlines() if ln and not ln.startswith("#"))
        block = json.loads(props["models"])[cfg.name][cfg.version]
        assert props["load_models"] == block["marName"] == cfg.mar_name and block["defaultVersion"] is True
        assert {k: block[k] for k in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")} \
            == {k: cfg.torchserve[k] for k in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay",
                                               "responseTimeout")}
        assert spec["initContainers"][0]["args"][-1] == f"{cfg.name}:{cfg.version}"  # stages exactly this archive
        (ts,) = spec["containers"]
        limits = ts["resources"]["limits"]
        assert ts["resources"]["requests"] == limits  # Guaranteed QoS: the limit is the CPU budget
        # Worker threads come from the CPU limit: it becomes the pod's cgroup quota (cpu.max), which the handler's
        # CPU budget reads and shares among maxWorkers; an OMP_NUM_THREADS here would override it.
        assert "OMP_NUM_THREADS" not in {e["name"] for e in ts.get("env", [])}
        assert threads_in_pod(tmp_path / version, int(limits["cpu"]), cfg.torchserve["maxWorkers"]) == \
            max(1, int(limits["cpu"]) // cfg.torchserve["maxWorkers"])
        assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        assert props["management_address"].startswith("http://127.0.0.1:")  # never reachable from outside
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert ts[probe]["exec"]["command"][:4] == ["python", "-m", "serving.pod", "probe"]
    (route,) = by_kind(objs, "HTTPRoute")
    split = route["spec"]["rules"][0]
    assert split["matches"][0]["path"] == {"type": "Exact", "value": f"/predictions/{o.model}"}
    assert [b["weight"] for b in split["backendRefs"]] == [100 - o.canary_percent, o.canary_percent]
    services = {s["metadata"]["name"] for s in by_kind(objs, "Service")}
    assert {b["name"] for r in route["spec"]["rules"] for b in r["backendRefs"]} == services
    (hpa,) = by_kind(objs, "HorizontalPodAutoscaler")
    adapter = yaml.safe_load(yaml.safe_load((DEPLOY / "cluster" / "prometheus-adapter.yaml").read_text())["data"][
        "config.yaml"])
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == adapter["rules"][0]["name"]["as"]


def test_generation_refuses_bad_input():
    with pytest.raises(ValueError, match="archive config not found"):
        mf.generate(mf.Options(stable="9.9"))
    with pytest.raises(ValueError, match="must differ"):
        mf.generate(mf.Options(canary="1.0"))
    with pytest.raises(ValueError, match="1..99"):
        mf.generate(mf.Options(canary_percent=100))


def test_the_dockerfile_matches_the_manifests():
    text = (DEPLOY / "Dockerfile").read_text()
    (dep,) = by_kind(objects(DEPLOY / "base"), "Deployment")
    spec = dep["spec"]["template"]["spec"]
    (ts,) = spec["containers"]
    assert re.search(r"^USER (\d+)$", text, re.M).group(1) == str(spec["securityContext"]["runAsUser"])
    assert re.search(r"^WORKDIR (\S+)$", text, re.M).group(1) == mf.WORKDIR
    assert re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split() == [str(p["containerPort"]) for p in ts["ports"]]
    assert json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1)) == ts["args"]
    version = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', text).group(1)
    assert ts["image"] == f"vision-serve:{version}" and version == mf.project_version()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    copied = [src for line in re.findall(r"^COPY (.+) \S+$", text, re.M) for src in line.split()]
    assert {"pyproject.toml", "requirements.txt"} <= set(copied)
    for src in copied:
        assert (ROOT / src).exists() and f"!{src}" in ignore, src
    from tests.test_packaging import SOURCES  # what `pip install .` is built from

    assert {s.rstrip("/") for s in copied} == set(SOURCES)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")
@pytest.mark.parametrize("overlay", ["stable", "canary"])
def test_kustomize_builds_the_overlays(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    for obj in built:
        validate(obj)
    names = {d["metadata"]["name"] for d in by_kind(built, "ConfigMap")}
    mounted = {d["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] for d in by_kind(built, "Deployment")}
    assert mounted == names  # the hashed ConfigMap names are wired into the Deployments


def test_stage_copies_only_verified_archives(tiny_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    assert pod.stage(store, tmp_path / "models", [("tiny", "1.0")]) == ["tiny-1.0.mar"]
    assert (tmp_path / "models" / "tiny-1.0.mar").read_bytes() == (store / "tiny-1.0.mar").read_bytes()
    with open(store / "tiny-2.0.mar", "r+b") as f:  # one flipped byte in the store
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        pod.stage(store, tmp_path / "models", [("tiny", "2.0")])
    with pytest.raises(ServingError, match="not in"):
        pod.stage(store, tmp_path / "models", [("tiny", "9.9")])
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny-1.0.mar"]
    assert pod.main(["stage", "--store", str(store), "--dest", str(tmp_path / "m2"), "tiny:2.0"]) == 1


@pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java (run make setup)")
def test_the_pod_config_loads_the_version_with_its_batch_settings_and_the_probes_pass(tiny_store, tmp_path):
    cfg = load_config(tiny_store.parent / "configs" / "tiny" / "2.0.yaml")
    props = dict(ln.split("=", 1) for ln in mf.pod_config(cfg).splitlines() if ln and not ln.startswith("#"))
    runtime = tmp_path / "rt"
    ports = server.Ports(*server.free_ports(5))
    # The pod's model block, on this machine's store and ports; token auth stays on (TorchServe's default).
    server.start(tiny_store, runtime, ports, extra={k: props[k] for k in ("load_models", "models")})
    config = runtime / server.CONFIG_NAME
    try:
        from serving.manage import Client

        desc = Client(runtime, tiny_store).describe("tiny", "2.0")[0]
        assert {k: desc[k] for k in ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers")} == \
            {k: cfg.torchserve[k] for k in ("batchSize", "maxBatchDelay", "minWorkers", "maxWorkers")}
        assert pod.probe("live", config, runtime) == "live: /ping 200"
        deadline = time.monotonic() + 60
        while (ready := _try(lambda: pod.probe("ready", config, runtime))) is None:  # workers come up after
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.5)
        assert ready == "ready: tiny"
        keys = json.loads((runtime / server.KEY_FILE).read_text())
        (tmp_path / "key_file.json").write_text(json.dumps({**keys, "inference": {"key": "wrong"}}))
        with pytest.raises(RuntimeError, match="/ping answered HTTP 400"):
            pod.probe("live", config, tmp_path)  # token auth on: the probe must send the right key
    finally:
        server.stop(runtime)
    with pytest.raises(RuntimeError, match="token auth is on but"):
        pod.probe("live", config, runtime)  # TorchServe removed its key file on stop
    assert pod.main(["probe", "live", "--config", str(config), "--workdir", str(tmp_path)]) == 1
