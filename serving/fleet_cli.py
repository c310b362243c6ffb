"""`python -m serving fleet ...`: a local TorchServe fleet behind HAProxy (serving/fleet.py, serving/fleet_ops.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from serving.server import DEFAULT_STORE, ServingError

DEFAULT_PORT, DEFAULT_STATS_PORT = 8090, 8091


def add_parser(sub: Any) -> None:
    from serving.fleet import DEFAULT_FLEET, MAX_NODES

    fleet = sub.add_parser("fleet", help="a local fleet of TorchServe nodes behind HAProxy (docs/fleet.md)",
                           description=__doc__)
    cmds = fleet.add_subparsers(dest="fleet_cmd", required=True, metavar="FLEET_COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = cmds.add_parser(name, help=help_, description=help_)
        p.add_argument("--fleet-dir", type=Path, default=DEFAULT_FLEET, help="fleet state dir (default: .fleet/)")
        p.add_argument("--store", type=Path, default=DEFAULT_STORE, help="model store (default: model_store/)")
        return p

    p = add("up", "start N TorchServe nodes on loopback and HAProxy in front; print the balancer's URL")
    p.add_argument("--nodes", type=int, default=2, help=f"number of nodes, 1..{MAX_NODES} (default 2)")
    p.add_argument("--models", default="fmnist-lenet5", help="comma-separated name[:version] (default version: "
                   "the highest archived one; default: fmnist-lenet5)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"the balancer's port (default {DEFAULT_PORT})")
    p.add_argument("--stats-port", type=int, default=DEFAULT_STATS_PORT,
                   help=f"HAProxy's /metrics and /stats (default {DEFAULT_STATS_PORT})")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each node")
    add("down", "stop the fleet's HAProxy and nodes (nothing else)")
    p = add("status", "per node: health, versions, default, workers; and any drift between nodes")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = add("rollout", "register everywhere -> READY -> smoke on every node -> switch defaults node by node, "
            "each node drained in HAProxy while it switches")
    _model_version(p)
    _gates(p)
    p = add("canary", "send PERCENT %% of the default path's requests to VERSION (on every node)")
    _model_version(p)
    p.add_argument("--percent", type=int, required=True, help="1..99")
    _gates(p)
    p = add("promote", "make the canary version the default on every node (a rollout), then end the canary")
    p.add_argument("model")
    _gates(p)
    p = add("rollback", "end a canary, or make the previous default the default again on every node")
    p.add_argument("model")
    p.add_argument("--to", help="a version that served as the default before (default: the previous one)")
    _gates(p)
    p = add("restart", "restart one node (drained first) and restore the fleet's versions and default on it")
    p.add_argument("node")
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p = add("history", "the recorded steps of fleet operations")
    p.add_argument("-n", type=int, default=30, help="last N steps")
    _manifests_parser(sub)


def _manifests_parser(sub: Any) -> None:
    from serving.manifests import DEPLOY_DIR, Options

    d = Options()
    p = sub.add_parser("manifests", help="write the Kubernetes manifests (deploy/) from the archive configs",
                       description="Kustomize base + overlays for one model: the stable version in deploy/base, "
                       "a canary variant in deploy/overlays/canary (docs/fleet.md, \"Kubernetes\").")
    p.add_argument("--model", default=d.model)
    p.add_argument("--stable", default=d.stable, help=f"version served by the base Deployment (default {d.stable})")
    p.add_argument("--canary", default=d.canary, help=f"version of the canary overlay (default {d.canary}; "
                   "'' for none)")
    p.add_argument("--canary-percent", type=int, default=d.canary_percent, help="1..99")
    p.add_argument("--replicas", type=int, default=d.replicas, help="stable replicas (the HPA's minimum)")
    p.add_argument("--max-replicas", type=int, default=d.max_replicas)
    p.add_argument("--cpu", type=int, default=d.cpu, help="whole CPUs per pod (requests = limits)")
    p.add_argument("--memory", default=d.memory)
    p.add_argument("--image", default=d.image, help="serving image (default vision-serve:<project version>)")
    p.add_argument("--out", type=Path, default=DEPLOY_DIR)


def _model_version(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("version")


def _gates(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ready-timeout", type=float, default=180.0, help="seconds for workers to become READY")
    p.add_argument("--smoke-image", type=Path, help="image for the smoke checks (default: a synthetic PNG)")
    p.add_argument("--dry-run", action="store_true", help="check and print the plan; change nothing")


def run(a: argparse.Namespace) -> int:
    if a.cmd == "manifests":
        return run_manifests(a)
    from serving import fleet as fl

    if a.fleet_cmd == "up":
        from serving.cli import _parse_models

        models = _parse_models(a.models, a.store)
        f = fl.up(a.fleet_dir, a.store, a.nodes, models, a.port, a.stats_port, a.timeout)
        print(f"fleet up: {a.nodes} node(s) behind HAProxy at {f.url}")
        print(f"key (clients): {f.key_file}  (\"inference\" key; send it as 'Authorization: Bearer <key>')")
        print(f"models: {', '.join(f'{n} {v}' for n, v in models)}; status: python -m serving fleet status")
        return 0
    if a.fleet_cmd == "down":
        stopped = fl.down(a.fleet_dir)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    fleet = fl.Fleet.load(a.fleet_dir)
    if a.fleet_cmd == "status":
        st = fl.status(fleet)
        print(json.dumps(st, indent=2) if a.json else format_status(st))
        return 1 if st["drift"] else 0
    if a.fleet_cmd == "history":
        for e in fleet.history()[-a.n:]:
            print(json.dumps(e))
        return 0
    from serving import fleet_ops as ops

    image = a.smoke_image.read_bytes() if getattr(a, "smoke_image", None) else None
    gates = {"ready_timeout": a.ready_timeout, "image": image, "dry_run": a.dry_run} if hasattr(a, "dry_run") else {}
    if a.fleet_cmd == "rollout":
        result = ops.rollout(fleet, a.model, a.version, **gates)
    elif a.fleet_cmd == "canary":
        result = ops.canary(fleet, a.model, a.version, a.percent, **gates)
    elif a.fleet_cmd == "promote":
        result = ops.promote(fleet, a.model, **gates)
    elif a.fleet_cmd == "rollback":
        result = ops.rollback(fleet, a.model, to=a.to, **gates)
    elif a.fleet_cmd == "restart":
        result = ops.restart_node(fleet, a.node, ready_timeout=a.ready_timeout)
    else:
        raise ServingError(f"unknown fleet command {a.fleet_cmd}")
    print(json.dumps(result, indent=2))
    return 0


def run_manifests(a: argparse.Namespace) -> int:
    from serving.config import ConfigError
    from serving.manifests import Options, generate, write

    o = Options(model=a.model, stable=a.stable, canary=a.canary, canary_percent=a.canary_percent,
                replicas=a.replicas, max_replicas=max(a.max_replicas, a.replicas), cpu=a.cpu, memory=a.memory,
                image=a.image)
    if o.cpu < 1 or o.replicas < 1:
        raise ServingError("--cpu and --replicas must be at least 1")
    try:
        files = generate(o)
    except ValueError as e:  # ConfigError is a ValueError
        raise ConfigError(str(e)) from None
    for path in write(files, a.out):
        print(path)
    return 0


def format_status(st: dict[str, Any]) -> str:
    lines = [f"balancer {st['url']}  (key: {st['key_file']})"]
    width = max([len(r["node"]) for r in st["nodes"]] + [4]) + 2
    lines.append(f"{'NODE':<{width}}{'ADDRESS':<18}{'HAPROXY':<12}{'IN FLIGHT':<11}"
                 "MODELS (version ready/all, * default)")
    for r in st["nodes"]:
        models = "; ".join(
            f"{name} " + " ".join(f"{v}{'*' if v == m['default'] else ''} {w}" for v, w in m["versions"].items())
            for name, m in r["models"].items()) or r.get("error", "none")
        lines.append(f"{r['node']:<{width}}{r['address']:<18}{r['balancer']:<12}{r['in_flight']:<11}{models}")
    for model, c in st["canary"].items():
        lines.append(f"canary: {c['percent']} % of /predictions/{model} -> {model} {c['version']}")
    lines.append("drift: " + ("none" if not st["drift"] else "\n  " + "\n  ".join(st["drift"])))
    return "\n".join(lines)
